/* Stub: bcc's helpers use roundup_pow_of_two on constants only. */
#ifndef __LINUX_LOG2_H
#define __LINUX_LOG2_H
#define __tlt_rup(n) ((n) <= 1 ? 1 : (n) <= 2 ? 2 : (n) <= 4 ? 4 : (n) <= 8 ? 8 : (n) <= 16 ? 16 : \
	(n) <= 32 ? 32 : (n) <= 64 ? 64 : (n) <= 128 ? 128 : (n) <= 256 ? 256 : (n) <= 512 ? 512 : \
	(n) <= 1024 ? 1024 : (n) <= 2048 ? 2048 : (n) <= 4096 ? 4096 : (n) <= 8192 ? 8192 : \
	(n) <= 16384 ? 16384 : (n) <= 32768 ? 32768 : (n) <= 65536 ? 65536 : (n) <= 131072 ? 131072 : \
	(n) <= 262144 ? 262144 : (n) <= 524288 ? 524288 : (n) <= 1048576 ? 1048576 : 2097152)
#define roundup_pow_of_two(n) __tlt_rup(n)
#endif
