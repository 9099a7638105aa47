/* Stub: bcc's ring buffer macros size buffers in pages; the loader passes the real size. */
#ifndef _ASM_PAGE_H
#define _ASM_PAGE_H
#ifdef TLT_PAGE_SIZE
#define PAGE_SIZE TLT_PAGE_SIZE
#else
#define PAGE_SIZE 4096
#endif
#endif
