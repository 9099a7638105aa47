/*
 * tcplife-trace kernel side: TCP state changes and the events that explain
 * them, from tracepoints only, into one ring buffer.
 *
 * No kernel header is included. probes/program.py prepends the settings:
 *   TLT_MAX_CONNS, TLT_RB_PAGES                     map sizes
 *   OFF_*                                           struct offsets from BTF (absent = unknown)
 *   TLT_HAVE_<TP>                                   tracepoints present on this kernel
 *   TLT_FILTER_*, TLT_PID_OK(p), TLT_LPORT_OK(p),
 *   TLT_RPORT_OK(p)                                 kernel-side filters
 *   TLT_EVSZ, TLT_EVOFF_<field>                     the layout Python expects
 */
#include "event.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_LISTEN 10

#define TLT_CHECK(f) _Static_assert(__builtin_offsetof(struct tlt_event, f) == TLT_EVOFF_##f, \
	"struct tlt_event." #f " differs from probes/event_layout.py")
_Static_assert(sizeof(struct tlt_event) == TLT_EVSZ, "struct tlt_event size differs from probes/event_layout.py");
TLT_CHECK(ts_ns); TLT_CHECK(skaddr); TLT_CHECK(gen); TLT_CHECK(tx_b); TLT_CHECK(rx_b);
TLT_CHECK(netns); TLT_CHECK(pid); TLT_CHECK(tid); TLT_CHECK(uid); TLT_CHECK(value);
TLT_CHECK(sport); TLT_CHECK(dport); TLT_CHECK(family); TLT_CHECK(kind); TLT_CHECK(oldstate);
TLT_CHECK(newstate); TLT_CHECK(flags); TLT_CHECK(saddr); TLT_CHECK(daddr); TLT_CHECK(comm);
TLT_CHECK(seq);

/* keep decision for a connection under the kernel filters */
#define KEEP_UNDECIDED 0
#define KEEP_YES 1
#define KEEP_NO 2

struct conn {
	u64 gen;
	u32 netns;
	u32 uid;
	u32 io_pid;
	u8 keep;
	u8 emitted;  /* something of this connection reached user space */
	u8 eof;
	u8 flags;    /* TLT_F_NETNS | TLT_F_UID */
	u8 closed;   /* its CLOSE reached user space: the destroy that follows need not */
	u8 _pad;
	u16 seq;     /* events emitted for this connection */
	u8 _pad2[4];
};

/* The CLOSEs most recently seen on this CPU: inet_sk_error_report carries no socket
 * pointer but runs right after its CLOSE, on the same CPU, sometimes with another
 * socket's CLOSE in between (an abort over loopback closes the peer first). */
#define LAST_CLOSES 4
struct last_close {
	u64 skaddr;
	u64 gen;
	u16 sport;
	u16 dport;
	u8 keep;
};
struct last_closes {
	struct last_close c[LAST_CLOSES];
	u32 next;
};

BPF_RINGBUF_OUTPUT(events, TLT_RB_PAGES);
BPF_PERF_OUTPUT(overflow);
BPF_PERCPU_ARRAY(scratch, struct tlt_event, 1);
BPF_HASH(conns, u64, struct conn, TLT_MAX_CONNS);
BPF_ARRAY(generation, u64, 1);
BPF_PERCPU_ARRAY(stats, u64, TLT_STAT_NSLOTS);
BPF_PERCPU_ARRAY(last_close_cpu, struct last_closes, 1);

static __always_inline void stat_inc(int slot)
{
	u64 *v = stats.lookup(&slot);
	if (v)
		*v += 1;
}

static __always_inline u64 next_gen(void)
{
	int zero = 0;
	u64 *g = generation.lookup(&zero);
	if (!g)
		return 0;
	return __sync_fetch_and_add(g, 1) + 1;
}

/* The socket's network namespace inode (sk->__sk_common.skc_net->ns.inum): TLT_F_NETNS or 0. */
static __always_inline u8 read_netns(u64 skaddr, u32 *netns)
{
#if defined(OFF_SKC_NET) && defined(OFF_NET_NS_INUM)
	void *net = 0;
	if (bpf_probe_read_kernel(&net, sizeof(net), (void *)skaddr + OFF_SKC_NET) == 0 && net &&
	    bpf_probe_read_kernel(netns, sizeof(*netns), net + OFF_NET_NS_INUM) == 0)
		return TLT_F_NETNS;
#endif
	return 0;
}

static __always_inline void read_sock_ids(u64 skaddr, struct conn *c)
{
	c->flags |= read_netns(skaddr, &c->netns);
#ifdef OFF_SK_UID
	if (bpf_probe_read_kernel(&c->uid, sizeof(c->uid), (void *)skaddr + OFF_SK_UID) == 0)
		c->flags |= TLT_F_UID;
#endif
}

/* New generation for a socket being born (or first seen); NULL if the map is full. */
static __always_inline struct conn *conn_start(u64 skaddr, u8 keep)
{
	struct conn c;
	__builtin_memset(&c, 0, sizeof(c));
	c.gen = next_gen();
	c.keep = keep;
	read_sock_ids(skaddr, &c);
	if (conns.update(&skaddr, &c) != 0) {
		stat_inc(TLT_STAT_MAP_FULL);
		return 0;
	}
	return conns.lookup(&skaddr);
}

static __always_inline int v4mapped(const u8 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 &&
	       a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

/* Filter verdict from what this event shows. Ports are 0 until known (SYN_SENT has no
 * local port yet, a disconnected socket has no remote port): those stay undecided, and
 * user space applies the same filters to the finished connection. */
static __always_inline u8 verdict(u16 family, const u8 *daddr6, u16 sport, u16 dport,
				  int listener, int pid_known, u32 tgid)
{
	u8 undecided = 0;
#if defined(TLT_FILTER_IPV4) || defined(TLT_FILTER_IPV6)
	int is4 = family == AF_INET || (family == AF_INET6 && v4mapped(daddr6));
#ifdef TLT_FILTER_IPV4
	if (!is4)
		return KEEP_NO;
#else
	if (is4)
		return KEEP_NO;
#endif
#endif
#ifdef TLT_FILTER_PID
	if (pid_known) {
		if (!TLT_PID_OK(tgid))
			return KEEP_NO;
	} else {
		undecided = 1;
	}
#endif
#ifdef TLT_FILTER_LPORT
	if (sport) {
		if (!TLT_LPORT_OK(sport))
			return KEEP_NO;
	} else {
		undecided = 1;
	}
#endif
#ifdef TLT_FILTER_RPORT
	if (listener)
		return KEEP_NO;
	if (dport) {
		if (!TLT_RPORT_OK(dport))
			return KEEP_NO;
	} else {
		undecided = 1;
	}
#endif
	return undecided ? KEEP_UNDECIDED : KEEP_YES;
}

/* Events are built in a per-CPU scratch slot, then copied into the ring buffer. A
 * reservation can fail with the ring far from full (seen on 6.18 with producers on
 * every CPU): then the event goes to a per-CPU perf buffer instead, and user space
 * merges it back in timestamp order. Only if both fail is the event lost (counted). */
static __always_inline struct tlt_event *ev_new(u8 kind)
{
	int zero = 0;
	struct tlt_event *e = scratch.lookup(&zero);
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->kind = kind;
	e->pid = id >> 32;
	e->tid = (u32)id;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	return e;
}

static __always_inline void ev_send(void *ctx, struct tlt_event *e)
{
	u8 kind = e->kind;
	if (events.ringbuf_output(e, sizeof(*e), 0) == 0 ||
	    events.ringbuf_output(e, sizeof(*e), 0) == 0) {
		stat_inc(TLT_STAT_EMITTED + kind);
	} else if (overflow.perf_submit(ctx, e, sizeof(*e)) == 0) {
		stat_inc(TLT_STAT_EMITTED + kind);
		stat_inc(TLT_STAT_SPILLED + kind);
	} else {
		stat_inc(TLT_STAT_DROPPED + kind);
	}
}

/* The tuple of tracepoints that carry ports and both an IPv4 and an IPv6 address pair. */
static __always_inline void ev_tuple(struct tlt_event *e, u16 sport, u16 dport, u16 family,
				     const u8 *s4, const u8 *d4, const u8 *s6, const u8 *d6)
{
	e->sport = sport;
	e->dport = dport;
	e->family = family;
	if (family == AF_INET) {
		__builtin_memcpy(e->saddr, s4, 4);
		__builtin_memcpy(e->daddr, d4, 4);
	} else {
		__builtin_memcpy(e->saddr, s6, 16);
		__builtin_memcpy(e->daddr, d6, 16);
	}
}

static __always_inline void ev_conn(struct tlt_event *e, u64 skaddr, struct conn *c)
{
	e->skaddr = skaddr;
	if (c) {
		e->gen = c->gen;
		e->netns = c->netns;
		e->uid = c->uid;
		e->flags |= c->flags;
		e->seq = c->seq++;
		c->emitted = 1;
	} else {
		e->flags |= TLT_F_NO_ENTRY;
	}
}

/* The connection's entry, created for a socket first seen mid-life. */
static __always_inline struct conn *conn_get(u64 skaddr, u8 *unseen)
{
	struct conn *c = conns.lookup(&skaddr);
	if (c)
		return c;
	*unseen = TLT_F_BIRTH_UNSEEN;
	return conn_start(skaddr, KEEP_UNDECIDED);
}

static __always_inline void emit_filtered(void *ctx, u64 skaddr, struct conn *c)
{
	struct tlt_event *e = ev_new(TLT_EV_FILTERED);
	if (!e)
		return;
	ev_conn(e, skaddr, c);
	ev_send(ctx, e);
}

/* Apply a fresh verdict to a connection; returns nonzero if its events should go out. */
static __always_inline int conn_keep(void *ctx, u64 skaddr, struct conn *c, u8 v)
{
	if (!c)
		return v != KEEP_NO;
	if (c->keep == KEEP_UNDECIDED && v != KEEP_UNDECIDED) {
		c->keep = v;
		if (v == KEEP_NO && c->emitted)
			emit_filtered(ctx, skaddr, c);
	}
	return c->keep != KEEP_NO;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != IPPROTO_TCP)
		return 0;
	int oldstate = args->oldstate, newstate = args->newstate;
	u64 skaddr = (u64)args->skaddr;
	u16 family = args->family, sport = args->sport, dport = args->dport;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	int listener = newstate == TCP_LISTEN || (oldstate == TCP_LISTEN && newstate == TCP_CLOSE);
	int active_birth = oldstate == TCP_CLOSE && (newstate == TCP_SYN_SENT || newstate == TCP_LISTEN);
	int birth = active_birth || (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV);
	/* current is the owner only in connect(), listen() and a listener's close() */
	int pid_known = active_birth || (oldstate == TCP_LISTEN && newstate == TCP_CLOSE);
	u8 daddr6[16] = {};
	if (family == AF_INET6)
		__builtin_memcpy(daddr6, args->daddr_v6, 16);
	u8 v = verdict(family, daddr6, sport, dport, listener, pid_known, tgid);

	u8 unseen = 0;
	struct conn *c;
	if (birth)
		c = conn_start(skaddr, KEEP_UNDECIDED);
	else
		c = conn_get(skaddr, &unseen);
	int keep = conn_keep(args, skaddr, c, v);
	if (c && active_birth)
		c->io_pid = tgid; /* the owner's own reads and writes say nothing new */

	if (newstate == TCP_CLOSE) {
		int zero = 0;
		struct last_closes *lcs = last_close_cpu.lookup(&zero);
		if (lcs) {
			struct last_close *lc = &lcs->c[lcs->next & (LAST_CLOSES - 1)];
			lc->skaddr = skaddr;
			lc->gen = c ? c->gen : 0;
			lc->sport = sport;
			lc->dport = dport;
			lc->keep = keep;
			lcs->next++;
		}
	}
	if (!keep)
		return 0;

	struct tlt_event *e = ev_new(TLT_EV_STATE);
	if (!e)
		return 0;
	ev_conn(e, skaddr, c);
	e->flags |= unseen;
	e->oldstate = oldstate;
	e->newstate = newstate;
	e->sport = sport;
	e->dport = dport;
	e->family = family;
	if (family == AF_INET) {
		__builtin_memcpy(e->saddr, args->saddr, 4);
		__builtin_memcpy(e->daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(e->saddr, args->saddr_v6, 16);
		__builtin_memcpy(e->daddr, daddr6, 16);
	}
#if defined(OFF_TP_BYTES_ACKED) && defined(OFF_TP_BYTES_RECEIVED)
	if (newstate == TCP_CLOSE && !listener &&
	    bpf_probe_read_kernel(&e->tx_b, 8, (void *)skaddr + OFF_TP_BYTES_ACKED) == 0 &&
	    bpf_probe_read_kernel(&e->rx_b, 8, (void *)skaddr + OFF_TP_BYTES_RECEIVED) == 0)
		e->flags |= TLT_F_BYTES;
#endif
	ev_send(args, e);
	if (c && newstate == TCP_CLOSE)
		c->closed = 1;
	return 0;
}

#ifdef TLT_HAVE_TCP_DESTROY_SOCK
TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
	u64 skaddr = (u64)args->skaddr;
	struct conn *c = conns.lookup(&skaddr);
	if (!c)
		return 0; /* never traced (e.g. socket() then close()): nothing to end */
	if (c->keep != KEEP_NO && !c->closed) {
		struct tlt_event *e = ev_new(TLT_EV_DESTROY);
		if (e) {
			ev_conn(e, skaddr, c);
			ev_send(args, e);
		}
	}
	conns.delete(&skaddr);
	return 0;
}
#endif

#ifdef TLT_HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	u64 skaddr = (u64)args->skaddr;
	u8 unseen = 0;
	struct conn *c = conn_get(skaddr, &unseen);
	if (c && c->keep == KEEP_NO)
		return 0;
	struct tlt_event *e = ev_new(TLT_EV_RECV_RESET);
	if (!e)
		return 0;
	ev_conn(e, skaddr, c);
	e->flags |= unseen;
	e->sport = args->sport;
	e->dport = args->dport;
	e->family = args->family;
	ev_send(args, e);
	return 0;
}
#endif

#ifdef TLT_HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
	u64 skaddr = (u64)args->skaddr;
	struct conn *c = 0;
	if (skaddr) {
		c = conns.lookup(&skaddr);
		if (c && c->keep == KEEP_NO)
			return 0;
	}
	struct tlt_event *e = ev_new(TLT_EV_SEND_RESET);
	if (!e)
		return 0;
	if (skaddr)
		ev_conn(e, skaddr, c);
	e->oldstate = args->state;
#ifdef TLT_HAVE_TCP_SEND_RESET_REASON
	e->value = args->reason;
#else
	e->value = -1;
#endif
	/* saddr/daddr hold a sockaddr_in or sockaddr_in6 */
	u16 fam = 0;
	__builtin_memcpy(&fam, args->saddr, 2);
	e->family = fam;
	e->sport = (args->saddr[2] << 8) | args->saddr[3];
	e->dport = (args->daddr[2] << 8) | args->daddr[3];
	if (fam == AF_INET) {
		__builtin_memcpy(e->saddr, &args->saddr[4], 4);
		__builtin_memcpy(e->daddr, &args->daddr[4], 4);
	} else if (fam == AF_INET6) {
		__builtin_memcpy(e->saddr, &args->saddr[8], 16);
		__builtin_memcpy(e->daddr, &args->daddr[8], 16);
	}
	ev_send(args, e);
	return 0;
}
#endif

#ifdef TLT_HAVE_INET_SK_ERROR_REPORT
TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
	if (args->protocol != IPPROTO_TCP)
		return 0;
	u64 skaddr = 0, gen = 0;
	int zero = 0;
	struct last_closes *lcs = last_close_cpu.lookup(&zero);
	if (lcs) {
		/* newest first: the CLOSE this report belongs to */
#pragma unroll
		for (int i = 1; i <= LAST_CLOSES; i++) {
			struct last_close *lc = &lcs->c[(lcs->next - i) & (LAST_CLOSES - 1)];
			if (lc->skaddr && lc->sport == args->sport &&
			    (lc->dport == args->dport || args->dport == 0 || lc->dport == 0)) {
				if (!lc->keep)
					return 0;
				skaddr = lc->skaddr;
				gen = lc->gen;
				break;
			}
		}
	}
	struct tlt_event *e = ev_new(TLT_EV_ERROR);
	if (!e)
		return 0;
	e->skaddr = skaddr;
	e->gen = gen;
	e->value = args->error;
	ev_tuple(e, args->sport, args->dport, args->family, args->saddr, args->daddr,
		 args->saddr_v6, args->daddr_v6);
	ev_send(args, e);
	return 0;
}
#endif

/* Owner attribution for accepted sockets: the first task that reads or writes. */
static __always_inline int io_seen(void *ctx, u64 skaddr, u16 family, u16 protocol, int ret, u8 recv)
{
	if (protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6))
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u8 unseen = 0;
	struct conn *c = conns.lookup(&skaddr);
	if (c && c->io_pid == tgid && (!recv || ret != 0 || c->eof))
		return 0; /* the hot path: nothing new */
	if (!c)
		c = conn_get(skaddr, &unseen);
	if (!c || c->keep == KEEP_NO)
		return 0;
	u8 eof = recv && ret == 0 && !c->eof;
	if (eof)
		c->eof = 1;
	if (c->io_pid != tgid || eof) {
		/* one event says both "new owner" and "EOF seen" when they happen together */
		u8 kind = c->io_pid != tgid ? TLT_EV_IO_OWNER : TLT_EV_EOF;
		c->io_pid = tgid;
		struct tlt_event *e = ev_new(kind);
		if (e) {
			ev_conn(e, skaddr, c);
			e->flags |= unseen | (recv ? TLT_F_RECV : 0) | (eof ? TLT_F_EOF : 0);
			e->value = ret;
			ev_send(ctx, e);
		}
	}
	return 0;
}

#ifdef TLT_HAVE_SOCK_RECV_LENGTH
TRACEPOINT_PROBE(sock, sock_recv_length)
{
	return io_seen(args, (u64)args->sk, args->family, args->protocol, args->ret, 1);
}
#endif

#ifdef TLT_HAVE_SOCK_SEND_LENGTH
TRACEPOINT_PROBE(sock, sock_send_length)
{
	return io_seen(args, (u64)args->sk, args->family, args->protocol, args->ret, 0);
}
#endif

#ifdef TLT_HAVE_TCP_RETRANSMIT_SYNACK
/* The only tracepoint that sees request sockets (half-open handshakes): skaddr is the
 * listener, req the request socket. A SYN flood shows up here per listener. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	u64 skaddr = (u64)args->skaddr;
	struct conn *c = conns.lookup(&skaddr);
	if (c && c->keep == KEEP_NO)
		return 0;
#ifdef TLT_FILTER_LPORT
	if (!TLT_LPORT_OK(args->sport))
		return 0;
#endif
	struct tlt_event *e = ev_new(TLT_EV_SYNACK);
	if (!e)
		return 0;
	e->skaddr = skaddr;
	if (c) {
		e->gen = c->gen;
		e->netns = c->netns;
		e->flags |= c->flags & TLT_F_NETNS;
	} else {
		e->flags |= read_netns(skaddr, &e->netns);
	}
	e->tx_b = (u64)args->req;
	ev_tuple(e, args->sport, args->dport, args->family, args->saddr, args->daddr,
		 args->saddr_v6, args->daddr_v6);
	ev_send(args, e);
	return 0;
}
#endif
