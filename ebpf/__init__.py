"""The kernel half: tcplife.bpf.c, its event header, and the stub header tree bcc compiles against."""
import os

EBPF_DIR = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(EBPF_DIR, "tcplife.bpf.c")
EVENT_HEADER = os.path.join(EBPF_DIR, "event.h")
STUB_KERNEL_SOURCE = os.path.join(EBPF_DIR, "stubs")
