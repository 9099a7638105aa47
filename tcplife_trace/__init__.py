"""tcplife-trace: eBPF TCP connection lifecycle tracer."""
__version__ = "0.1.0"


def load(path, text_import=None, all_recorded=False):
    """Load a recording made with `tcplife-trace --record FILE` (pandas and pyarrow load on demand);
    text_import: the day, time zone and host of tcpstates text (tcpstates_import.TextImport);
    all_recorded: every connection the file holds, not only those its recorded filters keep."""
    from .recording import load as _load
    return _load(path, text_import, all_recorded)
