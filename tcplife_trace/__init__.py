"""tcplife-trace: eBPF TCP connection lifecycle tracer."""
__version__ = "0.1.0"
