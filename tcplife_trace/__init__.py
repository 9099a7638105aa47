"""tcplife-trace: eBPF TCP connection lifecycle tracer."""
__version__ = "0.1.0"


def load(path, text_import=None):
    """Load a recording made with `tcplife-trace --record FILE` (pandas and pyarrow load on demand);
    text_import: the day, time zone and host of tcpstates text (tcpstates_import.TextImport)."""
    from .recording import load as _load
    return _load(path, text_import)
