/* Stub: the running kernel's version is passed in as -DTLT_LINUX_VERSION_CODE. */
#ifndef __LINUX_VERSION_H
#define __LINUX_VERSION_H
#define KERNEL_VERSION(a, b, c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))
#ifdef TLT_LINUX_VERSION_CODE
#define LINUX_VERSION_CODE TLT_LINUX_VERSION_CODE
#else
#define LINUX_VERSION_CODE KERNEL_VERSION(6, 0, 0)
#endif
#endif
