/*
 * The one definition of what crosses the kernel boundary.
 * probes/event_layout.py declares the same layout for Python; tcplife.bpf.c
 * static-asserts every offset against the numbers Python computed, and
 * tests/test_event_layout.py compiles this header with gcc and compares again.
 */
#ifndef TLT_EVENT_H
#define TLT_EVENT_H

/* event kinds */
#define TLT_EV_STATE      1 /* sock:inet_sock_set_state: oldstate -> newstate */
#define TLT_EV_DESTROY    2 /* tcp:tcp_destroy_sock, for a socket whose CLOSE was not reported */
#define TLT_EV_RECV_RESET 3 /* tcp:tcp_receive_reset */
#define TLT_EV_SEND_RESET 4 /* tcp:tcp_send_reset: value = reason, oldstate = state */
#define TLT_EV_ERROR      5 /* sock:inet_sk_error_report: value = errno */
#define TLT_EV_IO_OWNER   6 /* sock:sock_{recv,send}_length by a new task: value = ret */
#define TLT_EV_EOF        7 /* first recv() that returned 0, by the known owner (F_EOF set) */
#define TLT_EV_FILTERED   8 /* a kernel filter dropped the rest of this connection */
#define TLT_EV_SYNACK     9 /* tcp:tcp_retransmit_synack: skaddr = listener, tx_b = request sock */
#define TLT_EV_NKINDS     10

/* flags */
#define TLT_F_BIRTH_UNSEEN 0x01 /* first event of a socket born before the trace */
#define TLT_F_NO_ENTRY     0x02 /* connection map full: no generation for this socket */
#define TLT_F_NETNS        0x04 /* netns is valid */
#define TLT_F_UID          0x08 /* uid is valid */
#define TLT_F_BYTES        0x10 /* tx_b/rx_b are valid */
#define TLT_F_RECV         0x20 /* IO_OWNER/EOF came from a receive */
#define TLT_F_EOF          0x40 /* IO_OWNER/EOF: that receive returned 0, the peer's FIN was read */

/* per-CPU statistics slots */
#define TLT_STAT_EMITTED   0                    /* + kind */
#define TLT_STAT_DROPPED   TLT_EV_NKINDS        /* + kind: lost (ring and overflow both refused) */
#define TLT_STAT_MAP_FULL  (2 * TLT_EV_NKINDS)  /* connection map full */
#define TLT_STAT_SPILLED   (2 * TLT_EV_NKINDS + 1) /* + kind: sent through the overflow perf buffer */
#define TLT_STAT_NSLOTS    (3 * TLT_EV_NKINDS + 1)

struct tlt_event {
	__u64 ts_ns;     /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 skaddr;
	__u64 gen;       /* connection generation, unique per tracer run; 0 = none */
	__u64 tx_b;      /* tcp_sock.bytes_acked, at -> CLOSE */
	__u64 rx_b;      /* tcp_sock.bytes_received, at -> CLOSE */
	__u32 netns;     /* network namespace inode */
	__u32 pid;       /* tgid of the current task: NOT the owner in softirq context */
	__u32 tid;
	__u32 uid;       /* sk_uid */
	__s32 value;
	__u16 sport;     /* host order, local port */
	__u16 dport;     /* host order, remote port */
	__u16 family;
	__u8 kind;
	__u8 oldstate;
	__u8 newstate;
	__u8 flags;
	__u8 saddr[16];  /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	char comm[16];
	__u16 seq;       /* per-connection event counter: orders events that took the overflow path */
};

#endif
