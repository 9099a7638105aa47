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
#define TLT_EV_DESTROY    2 /* tcp:tcp_destroy_sock, for a socket whose CLOSE was not reported;
                             value 1: no destroy seen, its address was born again */
#define TLT_EV_RECV_RESET 3 /* tcp:tcp_receive_reset */
#define TLT_EV_SEND_RESET 4 /* tcp:tcp_send_reset: value = reason, oldstate = state */
#define TLT_EV_ERROR      5 /* sock:inet_sk_error_report: value = errno */
#define TLT_EV_IO_OWNER   6 /* sock:sock_{recv,send}_length by a new task: value = ret */
#define TLT_EV_EOF        7 /* first recv() that returned 0, by the known owner (F_EOF set) */
#define TLT_EV_FILTERED   8 /* a kernel filter dropped the rest of this connection */
#define TLT_EV_SYNACK     9 /* tcp:tcp_retransmit_synack: skaddr = listener, tx_b = request sock */
#define TLT_EV_LIFE       10 /* one whole connection, folded (struct tlt_life, in the lives ring) */
#define TLT_EV_NKINDS     11

/* flags */
#define TLT_F_BIRTH_UNSEEN 0x01 /* first event of a socket born before the trace */
#define TLT_F_NO_ENTRY     0x02 /* connection map full: no generation for this socket */
#define TLT_F_NETNS        0x04 /* netns is valid */
#define TLT_F_UID          0x08 /* uid is valid */
#define TLT_F_BYTES        0x10 /* tx_b/rx_b are valid */
#define TLT_F_RECV         0x20 /* IO_OWNER/EOF came from a receive */
#define TLT_F_EOF          0x40 /* IO_OWNER/EOF: that receive returned 0, the peer's FIN was read */
#define TLT_F_AGG          0x80 /* an event the aggregated mode sends as well: its connection is not
                                 folded (a listener, or no map entry), the Tracker follows it */

/* struct tlt_event.xflags: what the kernel's fold adds to each event */
#define TLT_X_FOLDED    0x01 /* the connection has a map entry: dur_ns, owner_*, role are the kernel's */
#define TLT_X_DUR       0x02 /* dur_ns is valid: time spent in oldstate (a STATE event, no gap) */
#define TLT_X_TIME_WAIT 0x04 /* a CLOSE from FIN_WAIT2 or CLOSING, no reset received: TIME_WAIT */
#define TLT_X_LISTENER  0x08 /* passive: the listener's owner was found (owner_src "listener" or stronger) */

/* struct tlt_event.role: Lifecycle.role after the event */
#define TLT_ROLE_UNKNOWN  0
#define TLT_ROLE_ACTIVE   1
#define TLT_ROLE_PASSIVE  2
#define TLT_ROLE_LISTENER 3

/* struct tlt_agg.lflags */
#define TLT_L_RST_RECEIVED 0x01 /* tcp_receive_reset seen */
#define TLT_L_RST_SENT     0x02 /* tcp_send_reset seen before the CLOSE: rst_reason, rst_state */
#define TLT_L_DESTROYED    0x04 /* tcp_destroy_sock came with no CLOSE before it */
#define TLT_L_REUSED       0x08 /* with DESTROYED: not destroyed, its address was born again */
#define TLT_L_LISTENER     0x10 /* passive: listener_pid/listener_comm hold its listener's owner */
#define TLT_L_RETRANS      0x20 /* retrans/syn_retrans were counted (tcp:tcp_retransmit_skb is traced) */
#define TLT_L_CONG         0x40 /* recoveries/losses were counted (tcp:tcp_cong_state_set is traced) */

/* struct tlt_agg.owner_src: index into OWNER_SOURCES (analysis/lifecycle.py) */
#define TLT_SRC_CONNECT  0
#define TLT_SRC_LISTEN   1
#define TLT_SRC_IO       2
#define TLT_SRC_CLOSE    3
#define TLT_SRC_LISTENER 4
#define TLT_SRC_NONE     5

/* struct tlt_agg.health[i]: struct tcp_sock fields read at CLOSE, in the order of
 * probes/btf.py TCP_SOCK_HEALTH (the raw values, as tcp_get_info() takes them) */
#define TLT_H_SRTT_US          0
#define TLT_H_MDEV_US          1
#define TLT_H_RTT_MIN          2
#define TLT_H_TOTAL_RETRANS    3
#define TLT_H_BYTES_RETRANS    4
#define TLT_H_SEGS_IN          5
#define TLT_H_SEGS_OUT         6
#define TLT_H_DATA_SEGS_IN     7
#define TLT_H_DATA_SEGS_OUT    8
#define TLT_H_LOST_OUT         9
#define TLT_H_REORDERING       10
#define TLT_H_DELIVERED        11
#define TLT_H_RATE_DELIVERED   12
#define TLT_H_RATE_INTERVAL_US 13
#define TLT_H_MSS_CACHE        14
#define TLT_H_SND_CWND         15
#define TLT_H_RCV_RTT_US       16
#define TLT_H_ICSK_RETRANSMITS 17
#define TLT_HEALTH_N           18

#define TLT_PATH_MAX 32 /* states kept; past it the last two slots hold the latest two */
#define TLT_PIDS_MAX 4

/* per-CPU statistics slots (user space adds the programs' recursion misses: hits that
 * never ran, so never reach these slots) */
#define TLT_STAT_EMITTED   0                    /* + kind: every event a program tried to send */
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
	/* appended (positions 0-20 above never move): the connection's fold after this event,
	 * as analysis/lifecycle.py's Tracker has it; valid if xflags & TLT_X_FOLDED */
	__u64 dur_ns;    /* time spent in oldstate (Transition.dur_ns), if xflags & TLT_X_DUR */
	__u32 owner_pid; /* Lifecycle.owner_pid/comm/source after this event */
	char owner_comm[16];
	__u8 owner_src;  /* TLT_SRC_*: index into OWNER_SOURCES; TLT_SRC_NONE = no owner yet */
	__u8 role;       /* TLT_ROLE_* */
	__u8 xflags;     /* TLT_X_* */
	__u8 _pad;
	__u64 cgroup_id; /* Lifecycle.cgroup_id after this event: the owner's cgroup v2 id (tlt_agg.cgroup_id);
	                    0 = no owner yet, or no fold */
};

/* What the kernel folds per connection (every mode): the lifecycle the Python
 * state machine would build from that connection's events (analysis/lifecycle.py). */
struct tlt_agg {
	__u64 start_ns;       /* first transition seen (the birth, unless TLT_F_BIRTH_UNSEEN) */
	__u64 eof_ns;         /* first recv() that returned 0; 0 = none */
	__u64 enter_ns;       /* when it entered its current state */
	__u64 last_ns;        /* its last transition or reset received */
	__u64 state_ns[16];   /* time spent in each state, indexed by state */
	__u32 owner_pid;
	__u32 pids[TLT_PIDS_MAX]; /* distinct tasks that connected, closed, read or wrote */
	__s32 rst_reason;
	char owner_comm[16];
	__u16 state_mask;     /* bit s: state_ns[s] holds a time */
	__u8 owner_src;       /* TLT_SRC_* */
	__u8 npids;           /* distinct tasks seen (may exceed TLT_PIDS_MAX) */
	__u8 path_len;        /* states seen (may exceed TLT_PATH_MAX) */
	__u8 rst_state;
	__u8 lflags;          /* TLT_L_* */
	__u8 gaps;            /* transitions whose old state was not the one we had */
	__u8 gap_had;         /* the first gap: state we had ... */
	__u8 gap_got;         /* ... and the old state the transition reported */
	__u8 path[TLT_PATH_MAX];
	__u32 listener_pid;   /* passive, if lflags & TLT_L_LISTENER: the listener's owner at SYN_RECV */
	char listener_comm[16];
	/* appended (issue 15): the owner's home, retransmits as they happened, health at CLOSE */
	__u64 cgroup_id;      /* cgroup v2 id of the task the owner was taken from (with owner_pid;
	                         a listener's owner's for a passive socket); 0 = no owner yet */
	__u32 retrans;        /* tcp:tcp_retransmit_skb out of SYN_SENT, sent (if lflags & TLT_L_RETRANS) */
	__u16 syn_retrans;    /* tcp:tcp_retransmit_skb in SYN_SENT: SYN retries */
	__u16 recoveries;     /* tcp:tcp_cong_state_set into TCP_CA_Recovery (if lflags & TLT_L_CONG) */
	__u16 losses;         /* tcp:tcp_cong_state_set into TCP_CA_Loss (a retransmit timeout) */
	__u16 _hpad;
	__u32 health_mask;    /* bit i: health[i] was read at the end (TLT_H_*); 0 = none read */
	__u64 health[TLT_HEALTH_N]; /* zero-extended raw values of the tcp_sock fields, TLT_H_* */
};

/* A LIFE record: the closing transition as an event, and the folded rest. They have a ring
 * buffer of their own ("lives"); the "events" ring holds struct tlt_event only. */
struct tlt_life {
	struct tlt_event ev;
	struct tlt_agg agg;
};

#endif
