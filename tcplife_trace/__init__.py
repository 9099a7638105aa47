"""tcplife-trace: eBPF TCP connection lifecycle tracer."""
__version__ = "0.1.0"


def load(path):
    """Load a recording made with `tcplife-trace --record FILE` (pandas and pyarrow load on demand)."""
    from .recording import load as _load
    return _load(path)
