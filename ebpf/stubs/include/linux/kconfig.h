/* Stub: tcplife-trace compiles against no kernel header (see ebpf/README). */
#ifndef __LINUX_KCONFIG_H
#define __LINUX_KCONFIG_H
#define CONFIG_BPF_SYSCALL 1
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#endif
