/*
 * tcplife-trace kernel side: TCP state changes and the events that explain
 * them, from tracepoints only, into one ring buffer.
 *
 * No kernel header is included. probes/program.py prepends the settings:
 *   TLT_MAX_CONNS, TLT_RB_PAGES                     map sizes
 *   OFF_*                                           struct offsets from BTF (absent = unknown)
 *   TLT_HAVE_<TP>                                   tracepoints present on this kernel
 *   TLT_FILTER_*, TLT_PID_OK(p), TLT_LPORT_OK(p),
 *   TLT_RPORT_OK(p), TLT_CGROUP_OK()                kernel-side filters
 *   TLT_EVSZ, TLT_EVOFF_<field>, TLT_AGGSZ,
 *   TLT_AGGOFF_<field>                              the layout Python expects
 *   TLT_LIVES_PAGES                                 pages of the lives ring buffer
 *   OFF_TP_<NAME>, SZ_TP_<NAME>                     struct tcp_sock health fields (TLT_H_*)
 *   TLT_HEALTH_BASE, TLT_HEALTH_SPAN                the byte range of tcp_sock they lie in
 *   TLT_STREAM                                      send every transition as an event
 *   TLT_AGGREGATE                                   (always set) fold each connection into its
 *                                                   map entry and send one TLT_EV_LIFE record
 *                                                   at its end, into the lives ring buffer
 * Every mode folds: with TLT_STREAM each event also carries the fold after it (dur_ns,
 * owner_*, role, xflags, cgroup_id), so user space needs no state of its own to show a transition.
 */
#include "event.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10

#define TLT_CHECK(f) _Static_assert(__builtin_offsetof(struct tlt_event, f) == TLT_EVOFF_##f, \
	"struct tlt_event." #f " differs from probes/event_layout.py")
_Static_assert(sizeof(struct tlt_event) == TLT_EVSZ, "struct tlt_event size differs from probes/event_layout.py");
TLT_CHECK(ts_ns); TLT_CHECK(skaddr); TLT_CHECK(gen); TLT_CHECK(tx_b); TLT_CHECK(rx_b);
TLT_CHECK(netns); TLT_CHECK(pid); TLT_CHECK(tid); TLT_CHECK(uid); TLT_CHECK(value);
TLT_CHECK(sport); TLT_CHECK(dport); TLT_CHECK(family); TLT_CHECK(kind); TLT_CHECK(oldstate);
TLT_CHECK(newstate); TLT_CHECK(flags); TLT_CHECK(saddr); TLT_CHECK(daddr); TLT_CHECK(comm);
TLT_CHECK(seq); TLT_CHECK(dur_ns); TLT_CHECK(owner_pid); TLT_CHECK(owner_comm); TLT_CHECK(owner_src);
TLT_CHECK(role); TLT_CHECK(xflags); TLT_CHECK(cgroup_id);
#define TLT_ACHECK(f) _Static_assert(__builtin_offsetof(struct tlt_agg, f) == TLT_AGGOFF_##f, \
	"struct tlt_agg." #f " differs from probes/event_layout.py")
_Static_assert(sizeof(struct tlt_agg) == TLT_AGGSZ, "struct tlt_agg size differs from probes/event_layout.py");
TLT_ACHECK(start_ns); TLT_ACHECK(eof_ns); TLT_ACHECK(enter_ns); TLT_ACHECK(last_ns); TLT_ACHECK(state_ns); TLT_ACHECK(owner_pid); TLT_ACHECK(pids);
TLT_ACHECK(rst_reason); TLT_ACHECK(owner_comm); TLT_ACHECK(state_mask); TLT_ACHECK(owner_src);
TLT_ACHECK(npids); TLT_ACHECK(path_len); TLT_ACHECK(rst_state); TLT_ACHECK(lflags); TLT_ACHECK(gaps);
TLT_ACHECK(gap_had); TLT_ACHECK(gap_got); TLT_ACHECK(path); TLT_ACHECK(listener_pid);
TLT_ACHECK(listener_comm); TLT_ACHECK(cgroup_id); TLT_ACHECK(retrans); TLT_ACHECK(syn_retrans);
TLT_ACHECK(recoveries); TLT_ACHECK(losses); TLT_ACHECK(health_mask); TLT_ACHECK(health);

#ifndef TLT_AGGREGATE
#error "TLT_AGGREGATE must be set: every mode folds"
#endif
#ifndef TLT_LIVES_PAGES
#define TLT_LIVES_PAGES TLT_RB_PAGES
#endif
#ifndef TLT_MAX_LISTENERS
#define TLT_MAX_LISTENERS 16384
#endif
#define TLT_REC struct tlt_life /* the scratch record: big enough for a LIFE */
#define AGG_SENDS TLT_F_AGG /* flag for events the aggregated mode sends too */
#define TCP_FIN_WAIT2 5
#define TCP_CLOSING 11

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
	u8 state_seen; /* a transition of it was traced (not only I/O before connect()) */
	u16 seq;     /* events emitted for this connection */
	u8 streamed; /* a listener: its lifecycle is built from events, never folded */
	u8 role;     /* TLT_ROLE_*: Lifecycle.role */
	u8 ca_state; /* the last tcp_cong_state_set state (TCP_CA_*) */
	u8 uncounted; /* the tracer's own (self_ends): its transitions are not in tcounts */
#ifdef TLT_AGGREGATE
	struct tlt_agg agg; /* the lifecycle so far */
	u8 saddr[16];       /* the tuple as the transitions told it */
	u8 daddr[16];
	u16 sport;
	u16 dport;
	u16 af;
	u8 state;           /* current state; 0 = none seen yet */
	u8 has_tuple;
	u8 unseen;          /* born before the trace (or before the map had room) */
	u8 _pad3[7];
#endif
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

/* The listeners born during the trace, by (netns, local port): what an accepted socket's
 * owner is until a task of its own reads, writes or closes (Tracker.listeners: the latest
 * listener on a port, forgotten at its CLOSE). */
struct listen_key {
	u32 netns;
	u16 lport;
	u16 _pad;
};
struct listen_owner {
	u64 gen;
	u64 cgroup_id;
	u32 pid;
	char comm[16];
	u8 uncounted; /* the tracer's own listener: its accepted sockets are its own too */
};

BPF_RINGBUF_OUTPUT(events, TLT_RB_PAGES);
BPF_RINGBUF_OUTPUT(lives, TLT_LIVES_PAGES);
BPF_HASH(listeners, struct listen_key, struct listen_owner, TLT_MAX_LISTENERS);
BPF_PERF_OUTPUT(overflow);
BPF_PERCPU_ARRAY(scratch, TLT_REC, 1);
BPF_PERCPU_ARRAY(conn_init, struct conn, 1); /* a new entry is built here: too big for the stack */
BPF_HASH(conns, u64, struct conn, TLT_MAX_CONNS);
BPF_ARRAY(generation, u64, 1);
BPF_PERCPU_ARRAY(stats, u64, TLT_STAT_NSLOTS);
BPF_PERCPU_ARRAY(last_close_cpu, struct last_closes, 1);

/* Transitions counted here, for the metrics (probes/transition_counts.py reads them,
 * tcplife_trace/metrics.py exports them): no event has to reach user space to be counted,
 * and a lost event leaves no hole in the counts. The tracer's own connections are left
 * out: those born of a socket of the tracer's process on a port it listed in self_ends
 * (its start-up check's two ports, its metrics endpoint's), and a listed listener's
 * accepted sockets. The dur bounds are tcplife_trace/metrics.py's BUCKETS_S, in ns. */
#define TLT_DUR_SUM 15
struct tlt_counts {
	u64 trans[256];   /* [old * 16 + new]: transitions kept (past the kernel filters) */
	u64 dur[256];     /* [old * 16 + i]: time in the old state; i <= 12: the bucket (i bounds
	                     below it, 12 = +Inf), TLT_DUR_SUM: the sum in ns (one dimension:
	                     bcc's Python type of a map value misreads two) */
	u64 self_births;  /* accepted sockets of the tracer's own listeners (left out above) */
	u64 self_trans;   /* transitions of the tracer's own connections (left out above) */
};
_Static_assert(sizeof(struct tlt_counts) == 4112, "struct tlt_counts differs from probes/transition_counts.py");
#define TLT_SELF_PORTS 4
struct tlt_self {
	u32 tgid;                    /* the tracer's process; 0 = not set yet */
	u16 ports[TLT_SELF_PORTS];   /* local ports of its own sockets (0 = unused) */
	u16 _pad;
};
BPF_PERCPU_ARRAY(tcounts, struct tlt_counts, 1);
BPF_ARRAY(self_ends, struct tlt_self, 1);

static __always_inline u8 self_socket(u32 tgid, u16 sport)
{
	int zero = 0;
	struct tlt_self *s = self_ends.lookup(&zero);
	if (!s || !sport || s->tgid != tgid)
		return 0;
	u8 hit = 0;
#pragma unroll
	for (int i = 0; i < TLT_SELF_PORTS; i++)
		hit |= s->ports[i] == sport;
	return hit;
}

static __always_inline u32 dur_bucket(u64 d)
{
	return (d > 100000ULL) + (d > 1000000ULL) + (d > 10000000ULL) + (d > 100000000ULL) +
	       (d > 500000000ULL) + (d > 1000000000ULL) + (d > 5000000000ULL) + (d > 10000000000ULL) +
	       (d > 30000000000ULL) + (d > 60000000000ULL) + (d > 300000000000ULL) + (d > 3600000000000ULL);
}

static __always_inline void count_transition(struct conn *c, u8 old, u8 new, u8 x, u64 dur)
{
	int zero = 0;
	struct tlt_counts *t = tcounts.lookup(&zero);
	if (!t)
		return;
	if (c && c->uncounted) {
		t->self_trans++;
		if (old == TCP_LISTEN && new == TCP_SYN_RECV)
			t->self_births++;
		return;
	}
	t->trans[((old & 15) << 4) | (new & 15)]++;
	if (x & TLT_X_DUR) {
		t->dur[((old & 15) << 4) | (dur_bucket(dur) & 15)]++;
		t->dur[((old & 15) << 4) | TLT_DUR_SUM] += dur;
	}
}

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
	int zero = 0;
	struct conn *c = conn_init.lookup(&zero);
	if (!c)
		return 0;
	__builtin_memset(c, 0, sizeof(*c));
	c->gen = next_gen();
	c->keep = keep;
#ifdef TLT_AGGREGATE
	c->agg.owner_src = TLT_SRC_NONE;
#endif
	read_sock_ids(skaddr, c);
	if (conns.update(&skaddr, c) != 0) {
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
#ifdef TLT_FILTER_CGROUP
	/* the current task's cgroup is the owner's where it is the owner (connect(), listen()) */
	if (pid_known) {
		if (!TLT_CGROUP_OK())
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
static __always_inline struct tlt_event *ev_new_at(u8 kind, u64 ts)
{
	int zero = 0;
	TLT_REC *r = scratch.lookup(&zero);
	if (!r)
		return 0;
	struct tlt_event *e = (struct tlt_event *)r;
	__builtin_memset(e, 0, sizeof(*e)); /* a LIFE record copies its agg part whole */
	e->owner_src = TLT_SRC_NONE; /* (the fold's fields are the kernel's only with TLT_X_FOLDED) */
	u64 id = bpf_get_current_pid_tgid();
	e->ts_ns = ts;
	e->kind = kind;
	e->pid = id >> 32;
	e->tid = (u32)id;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	return e;
}

static __always_inline struct tlt_event *ev_new(u8 kind)
{
	return ev_new_at(kind, bpf_ktime_get_ns());
}

/* e is the scratch record (ev_new): a struct tlt_event goes to the events ring, a LIFE
 * record (struct tlt_life) to the lives ring; either spills to the overflow buffer */
static __always_inline void ev_send(void *ctx, struct tlt_event *e)
{
	u8 kind = e->kind;
	/* emitted = received + dropped, exactly, once user space has read both buffers; a
	 * drop is counted here only (perf's own lost count reports the same drops again) */
	stat_inc(TLT_STAT_EMITTED + kind);
	if (kind == TLT_EV_LIFE) {
		if (lives.ringbuf_output(e, sizeof(struct tlt_life), 0) == 0 ||
		    lives.ringbuf_output(e, sizeof(struct tlt_life), 0) == 0)
			return;
		if (overflow.perf_submit(ctx, e, sizeof(struct tlt_life)) == 0)
			stat_inc(TLT_STAT_SPILLED + kind);
		else
			stat_inc(TLT_STAT_DROPPED + kind);
		return;
	}
	if (events.ringbuf_output(e, sizeof(struct tlt_event), 0) == 0 ||
	    events.ringbuf_output(e, sizeof(struct tlt_event), 0) == 0)
		return;
	if (overflow.perf_submit(ctx, e, sizeof(struct tlt_event)) == 0)
		stat_inc(TLT_STAT_SPILLED + kind);
	else
		stat_inc(TLT_STAT_DROPPED + kind);
}

/* The connection's fold after this event, on the event (struct tlt_event after seq). */
static __always_inline void ev_fold(struct tlt_event *e, struct conn *c)
{
	e->owner_pid = c->agg.owner_pid;
	__builtin_memcpy(e->owner_comm, c->agg.owner_comm, sizeof(e->owner_comm));
	e->owner_src = c->agg.owner_src;
	e->role = c->role;
	e->cgroup_id = c->agg.cgroup_id;
	e->xflags |= TLT_X_FOLDED;
}

static __always_inline void listen_key_of(struct listen_key *k, struct conn *c, u16 lport)
{
	k->netns = (c->flags & TLT_F_NETNS) ? c->netns : 0;
	k->lport = lport;
	k->_pad = 0;
}

/* Tracker._forget_listener: a listener that ends (or is filtered out) leaves the table if
 * it is the one there. */
static __always_inline void listener_forget(struct conn *c)
{
	if (c->role != TLT_ROLE_LISTENER)
		return;
	struct listen_key k;
	listen_key_of(&k, c, c->sport);
	struct listen_owner *o = listeners.lookup(&k);
	if (o && o->gen == c->gen)
		listeners.delete(&k);
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
		/* the map is full: what an entry would hold, read for this event (the netns
		 * groups the detectors' findings) */
		e->flags |= TLT_F_NO_ENTRY | read_netns(skaddr, &e->netns);
#ifdef OFF_SK_UID
		if (bpf_probe_read_kernel(&e->uid, sizeof(e->uid), (void *)skaddr + OFF_SK_UID) == 0)
			e->flags |= TLT_F_UID;
#endif
	}
}

/* The connection's entry, created for a socket first seen mid-life. */
static __always_inline struct conn *conn_get(u64 skaddr, u8 *unseen)
{
	struct conn *c = conns.lookup(&skaddr);
	if (c)
		return c;
	*unseen = TLT_F_BIRTH_UNSEEN;
	c = conn_start(skaddr, KEEP_UNDECIDED);
#ifdef TLT_AGGREGATE
	if (c)
		c->unseen = 1;
#endif
	return c;
}

static __always_inline void emit_filtered(void *ctx, u64 skaddr, struct conn *c)
{
	struct tlt_event *e = ev_new(TLT_EV_FILTERED);
	if (!e)
		return;
	ev_conn(e, skaddr, c);
	if (c)
		ev_fold(e, c);
	e->flags |= AGG_SENDS;
	ev_send(ctx, e);
}

/* Apply a fresh verdict to a connection; returns nonzero if its events should go out. */
static __always_inline int conn_keep(void *ctx, u64 skaddr, struct conn *c, u8 v)
{
	if (!c)
		return v != KEEP_NO;
	if (c->keep == KEEP_UNDECIDED && v != KEEP_UNDECIDED) {
		c->keep = v;
		if (v == KEEP_NO && c->emitted) {
			emit_filtered(ctx, skaddr, c);
			listener_forget(c);
		}
	}
	return c->keep != KEEP_NO;
}

#ifdef TLT_AGGREGATE
/* The folding below mirrors analysis/lifecycle.py's Tracker, rule for rule; the tests
 * run both on the same transitions (TLT_STREAM and TLT_AGGREGATE together) and compare. */

/* Something of this connection was folded in: a lifecycle exists from now on. */
static __always_inline struct tlt_agg *agg_begin(struct conn *c, u64 now)
{
	if (!c->agg.start_ns)
		c->agg.start_ns = now;
	return &c->agg;
}

static __always_inline void agg_pid(struct tlt_agg *a, u32 tgid)
{
	u8 n = a->npids;
#pragma unroll
	for (int i = 0; i < TLT_PIDS_MAX; i++)
		if (i < n && a->pids[i] == tgid)
			return;
	if (n < TLT_PIDS_MAX)
		a->pids[n & (TLT_PIDS_MAX - 1)] = tgid;
	if (n < 255)
		a->npids = n + 1;
}

/* Lifecycle.set_owner: the strongest source wins, the first of equals stays. */
static __always_inline void agg_owner(struct tlt_agg *a, u32 tgid, u8 src)
{
	agg_pid(a, tgid);
	if (src < a->owner_src) {
		a->owner_src = src;
		a->owner_pid = tgid;
		bpf_get_current_comm(&a->owner_comm, sizeof(a->owner_comm));
		a->cgroup_id = bpf_get_current_cgroup_id(); /* the owner's home, taken with it */
	}
}

/* An accepted socket at SYN_RECV: its listener's owner, if the table has its listener
 * (set_owner(..., "listener"): not one of the connection's own tasks, so not in pids). */
static __always_inline u8 agg_listener(struct conn *c, u16 lport)
{
	struct listen_key k;
	listen_key_of(&k, c, lport);
	struct listen_owner *o = listeners.lookup(&k);
	if (!o)
		return 0;
	struct tlt_agg *a = &c->agg;
	a->listener_pid = o->pid;
	__builtin_memcpy(a->listener_comm, o->comm, sizeof(a->listener_comm));
	a->lflags |= TLT_L_LISTENER;
	c->uncounted = o->uncounted;
	if (TLT_SRC_LISTENER < a->owner_src) {
		a->owner_src = TLT_SRC_LISTENER;
		a->owner_pid = o->pid;
		__builtin_memcpy(a->owner_comm, o->comm, sizeof(a->owner_comm));
		a->cgroup_id = o->cgroup_id;
	}
	return TLT_X_LISTENER;
}

/* _guess_role */
static __always_inline u8 guess_role(u8 old, u8 new, u8 cur)
{
	if ((old == TCP_LISTEN && new == TCP_CLOSE) || new == TCP_LISTEN)
		return TLT_ROLE_LISTENER;
	if (old == TCP_SYN_SENT || new == TCP_SYN_SENT)
		return TLT_ROLE_ACTIVE;
	if (old == TCP_SYN_RECV || new == TCP_SYN_RECV)
		return TLT_ROLE_PASSIVE;
	return cur;
}

static __always_inline void agg_path(struct tlt_agg *a, u8 state)
{
	u8 n = a->path_len;
	if (n < TLT_PATH_MAX) {
		a->path[n & (TLT_PATH_MAX - 1)] = state;
	} else {
		a->path[TLT_PATH_MAX - 2] = a->path[TLT_PATH_MAX - 1];
		a->path[TLT_PATH_MAX - 1] = state;
	}
	if (n < 255)
		a->path_len = n + 1;
}

/* The address Python would print as 0.0.0.0 or :: */
static __always_inline int wildcard(u16 af, const u8 *a)
{
	u32 w[4];
	__builtin_memcpy(w, a, 16);
	if (af == AF_INET)
		return w[0] == 0;
	/* :: or ::ffff:0.0.0.0 (bytes 10-11 are 0xff in the mapped form) */
	return w[0] == 0 && w[1] == 0 && (w[2] == 0 || w[2] == 0xffff0000) && w[3] == 0;
}

/* Tracker._tuple_from */
static __always_inline void agg_tuple(struct conn *c, u16 af, u16 sport, u16 dport,
				      const u8 *saddr, const u8 *daddr)
{
	if (c->has_tuple && sport == c->sport && (dport == c->dport || !dport))
		return;
	if (af != AF_INET && af != AF_INET6)
		return;
	if (!c->has_tuple || !wildcard(af, saddr))
		__builtin_memcpy(c->saddr, saddr, 16);
	if (!c->has_tuple || !wildcard(af, daddr))
		__builtin_memcpy(c->daddr, daddr, 16);
	c->has_tuple = 1;
	c->af = af;
	if (sport)
		c->sport = sport;
	if (dport)
		c->dport = dport;
}

/* Tracker._state for one transition of a connection with an entry (a listener's too: its
 * fold is never sent, but its events carry owner, role and times); returns TLT_X_* flags
 * for the event, and the time spent in old in *dur (with TLT_X_DUR) */
static __always_inline u8 agg_transition(struct conn *c, u64 now, u8 old, u8 new, u32 tgid,
					 u16 af, u16 sport, u16 dport, const u8 *saddr, const u8 *daddr,
					 u64 *dur)
{
	u8 x = 0;
	struct tlt_agg *a = agg_begin(c, now);
	agg_tuple(c, af, sport, dport, saddr, daddr);
	if (c->role == TLT_ROLE_UNKNOWN)
		c->role = guess_role(old, new, TLT_ROLE_UNKNOWN);
	if (c->state && c->state != old) {
		if (!a->gaps) {
			a->gap_had = c->state;
			a->gap_got = old;
		}
		if (a->gaps < 255)
			a->gaps++;
	} else if (c->state) {
		*dur = now - a->enter_ns;
		x |= TLT_X_DUR;
		a->state_ns[old & 15] += *dur;
		a->state_mask |= 1 << (old & 15);
	}
	if (!a->path_len)
		agg_path(a, old);
	agg_path(a, new);
	c->state = new;
	a->enter_ns = a->last_ns = now;
	if (old == TCP_CLOSE && new == TCP_SYN_SENT) {
		agg_owner(a, tgid, TLT_SRC_CONNECT);
	} else if (old == TCP_CLOSE && new == TCP_LISTEN) {
		agg_owner(a, tgid, TLT_SRC_LISTEN);
	} else if (old == TCP_LISTEN && new == TCP_SYN_RECV) {
		x |= agg_listener(c, c->sport);
	} else if ((old == TCP_ESTABLISHED && new == TCP_FIN_WAIT1) || (old == TCP_SYN_RECV && new == TCP_FIN_WAIT1) ||
		   (old == TCP_CLOSE_WAIT && new == TCP_LAST_ACK) || (old == TCP_LISTEN && new == TCP_CLOSE)) {
		agg_owner(a, tgid, TLT_SRC_CLOSE);
	}
	if (new == TCP_CLOSE && (old == TCP_FIN_WAIT2 || old == TCP_CLOSING) && !(a->lflags & TLT_L_RST_RECEIVED))
		x |= TLT_X_TIME_WAIT;
	return x;
}

#ifdef TLT_HEALTH_SPAN
/* the bytes of struct tcp_sock that hold every health field: one read at a connection's end */
struct health_span {
	u8 b[TLT_HEALTH_SPAN];
};
BPF_PERCPU_ARRAY(health_buf, struct health_span, 1);
#define HEALTH_PICK(i, NAME) do { \
	_Static_assert(OFF_TP_##NAME >= TLT_HEALTH_BASE && \
		       OFF_TP_##NAME + SZ_TP_##NAME <= TLT_HEALTH_BASE + TLT_HEALTH_SPAN, #NAME " outside the span"); \
	__builtin_memcpy(&a->health[i], &hb->b[OFF_TP_##NAME - TLT_HEALTH_BASE], SZ_TP_##NAME); \
	mask |= 1u << (i); } while (0)
#endif

/* Health at the end (tcp_get_info's inputs): the tcp_sock fields this kernel's BTF has, read
 * in one copy of the range they lie in; a bit of health_mask per field read, so a field this
 * kernel lacks is NA, never 0. */
static __always_inline void agg_health(struct tlt_agg *a, u64 skaddr)
{
	a->health_mask = 0;
#ifdef TLT_HEALTH_SPAN
	int zero = 0;
	struct health_span *hb = health_buf.lookup(&zero);
	if (!hb || bpf_probe_read_kernel(hb->b, TLT_HEALTH_SPAN, (void *)skaddr + TLT_HEALTH_BASE) != 0)
		return;
	u32 mask = 0;
#ifdef OFF_TP_SRTT_US
	HEALTH_PICK(TLT_H_SRTT_US, SRTT_US);
#endif
#ifdef OFF_TP_MDEV_US
	HEALTH_PICK(TLT_H_MDEV_US, MDEV_US);
#endif
#ifdef OFF_TP_RTT_MIN
	HEALTH_PICK(TLT_H_RTT_MIN, RTT_MIN);
#endif
#ifdef OFF_TP_TOTAL_RETRANS
	HEALTH_PICK(TLT_H_TOTAL_RETRANS, TOTAL_RETRANS);
#endif
#ifdef OFF_TP_BYTES_RETRANS
	HEALTH_PICK(TLT_H_BYTES_RETRANS, BYTES_RETRANS);
#endif
#ifdef OFF_TP_SEGS_IN
	HEALTH_PICK(TLT_H_SEGS_IN, SEGS_IN);
#endif
#ifdef OFF_TP_SEGS_OUT
	HEALTH_PICK(TLT_H_SEGS_OUT, SEGS_OUT);
#endif
#ifdef OFF_TP_DATA_SEGS_IN
	HEALTH_PICK(TLT_H_DATA_SEGS_IN, DATA_SEGS_IN);
#endif
#ifdef OFF_TP_DATA_SEGS_OUT
	HEALTH_PICK(TLT_H_DATA_SEGS_OUT, DATA_SEGS_OUT);
#endif
#ifdef OFF_TP_LOST_OUT
	HEALTH_PICK(TLT_H_LOST_OUT, LOST_OUT);
#endif
#ifdef OFF_TP_REORDERING
	HEALTH_PICK(TLT_H_REORDERING, REORDERING);
#endif
#ifdef OFF_TP_DELIVERED
	HEALTH_PICK(TLT_H_DELIVERED, DELIVERED);
#endif
#ifdef OFF_TP_RATE_DELIVERED
	HEALTH_PICK(TLT_H_RATE_DELIVERED, RATE_DELIVERED);
#endif
#ifdef OFF_TP_RATE_INTERVAL_US
	HEALTH_PICK(TLT_H_RATE_INTERVAL_US, RATE_INTERVAL_US);
#endif
#ifdef OFF_TP_MSS_CACHE
	HEALTH_PICK(TLT_H_MSS_CACHE, MSS_CACHE);
#endif
#ifdef OFF_TP_SND_CWND
	HEALTH_PICK(TLT_H_SND_CWND, SND_CWND);
#endif
#ifdef OFF_TP_RCV_RTT_US
	HEALTH_PICK(TLT_H_RCV_RTT_US, RCV_RTT_US);
#endif
#ifdef OFF_TP_ICSK_RETRANSMITS
	HEALTH_PICK(TLT_H_ICSK_RETRANSMITS, ICSK_RETRANSMITS);
#endif
	a->health_mask = mask;
#endif
}

/* The connection's one record: its last transition (or its destruction) and the fold. */
static __always_inline void agg_emit(void *ctx, u64 skaddr, struct conn *c, u64 now, u8 old, u8 new)
{
	struct tlt_event *e = ev_new_at(TLT_EV_LIFE, now);
	if (!e)
		return;
	struct tlt_life *l = (struct tlt_life *)e;
	ev_conn(e, skaddr, c);
	ev_fold(e, c);
	if (c->unseen)
		e->flags |= TLT_F_BIRTH_UNSEEN;
	e->oldstate = old;
	e->newstate = new;
	e->sport = c->sport;
	e->dport = c->dport;
	e->family = c->af;
	__builtin_memcpy(e->saddr, c->saddr, 16);
	__builtin_memcpy(e->daddr, c->daddr, 16);
#if defined(OFF_TP_BYTES_ACKED) && defined(OFF_TP_BYTES_RECEIVED)
	if (new == TCP_CLOSE &&
	    bpf_probe_read_kernel(&e->tx_b, 8, (void *)skaddr + OFF_TP_BYTES_ACKED) == 0 &&
	    bpf_probe_read_kernel(&e->rx_b, 8, (void *)skaddr + OFF_TP_BYTES_RECEIVED) == 0)
		e->flags |= TLT_F_BYTES;
#endif
	__builtin_memcpy(&l->agg, &c->agg, sizeof(l->agg));
#ifdef TLT_HAVE_TCP_RETRANSMIT_SKB
	l->agg.lflags |= TLT_L_RETRANS;
#endif
#ifdef TLT_HAVE_TCP_CONG_STATE_SET
	l->agg.lflags |= TLT_L_CONG;
#endif
	/* the socket is whole at its CLOSE, and at its destruction; not if its address was born again */
	if (new == TCP_CLOSE || !(c->agg.lflags & TLT_L_REUSED))
		agg_health(&l->agg, skaddr);
	ev_send(ctx, e);
}
#endif

/* Events of this connection are folded into its entry in the aggregated mode (not sent):
 * it has an entry, has not reached CLOSE, and is not a listener (made of events). */
static __always_inline int conn_folds(struct conn *c)
{
	return c && !c->closed && !c->streamed;
}

/* A connection ends without a CLOSE: its socket is destroyed, or its address is born
 * again (freed by a path that fires neither tracepoint). Say so, never drop it silently. */
static __always_inline void conn_gone(void *ctx, u64 skaddr, struct conn *c, u8 reused)
{
	if (c->keep == KEEP_NO || c->closed)
		return;
	u64 now = bpf_ktime_get_ns(); /* one time for both forms */
#ifdef TLT_STREAM
	int as_event = c->emitted;
#else
	int as_event = c->streamed && c->emitted; /* a listener's lifecycle is made of events */
#endif
	if (as_event) {
		struct tlt_event *e = ev_new_at(TLT_EV_DESTROY, now);
		if (e) {
			ev_conn(e, skaddr, c);
			ev_fold(e, c);
			e->flags |= c->streamed ? AGG_SENDS : 0;
			e->value = reused;
			ev_send(ctx, e);
		}
	}
#ifdef TLT_AGGREGATE
	if (!c->streamed && c->agg.start_ns) { /* a lifecycle exists: it ends here, without a CLOSE */
		c->agg.lflags |= TLT_L_DESTROYED | (reused ? TLT_L_REUSED : 0);
		agg_emit(ctx, skaddr, c, now, c->state, 0);
	}
#endif
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
	/* the addresses, IPv4 in the first 4 bytes */
	u8 saddr[16] = {}, daddr[16] = {};
	if (family == AF_INET) {
		bpf_probe_read_kernel(saddr, 4, args->saddr); /* clang turns plain copies of either */
		bpf_probe_read_kernel(daddr, 4, args->daddr); /* form into a load through a computed */
	} else {                                              /* ctx pointer, which the verifier refuses */
		bpf_probe_read_kernel(saddr, 16, args->saddr_v6);
		bpf_probe_read_kernel(daddr, 16, args->daddr_v6);
	}
	u8 v = verdict(family, daddr, sport, dport, listener, pid_known, tgid);

	u8 unseen = 0;
	struct conn *c;
	if (birth) {
		struct conn *old = conns.lookup(&skaddr);
		if (old && old->state_seen)
			conn_gone(args, skaddr, old, 1);
		c = conn_start(skaddr, KEEP_UNDECIDED);
	}
	else
		c = conn_get(skaddr, &unseen);
	int keep = conn_keep(args, skaddr, c, v);
	if (c) {
		c->state_seen = 1;
		if (listener)
			c->streamed = 1;
	}
	if (c && active_birth) {
		c->io_pid = tgid; /* the owner's own reads and writes say nothing new */
		c->uncounted = self_socket(tgid, sport);
	}

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

	u64 now = bpf_ktime_get_ns();
	/* listeners, and connections the full map has no entry for, always go as events */
	int as_event = listener || !c;
	u64 dur = 0;
	u8 x = 0;
	if (c) {
		x = agg_transition(c, now, oldstate, newstate, tgid, family, sport, dport, saddr, daddr, &dur);
		if (oldstate == TCP_CLOSE && newstate == TCP_LISTEN) { /* Tracker: listeners[(netns, lport)] = it */
			struct listen_key k;
			listen_key_of(&k, c, c->sport);
			struct listen_owner o = {.gen = c->gen, .cgroup_id = c->agg.cgroup_id, .pid = c->agg.owner_pid,
						 .uncounted = c->uncounted};
			__builtin_memcpy(o.comm, c->agg.owner_comm, sizeof(o.comm));
			if (listeners.update(&k, &o) != 0)
				stat_inc(TLT_STAT_MAP_FULL); /* the listeners table is full: its accepted sockets' owner is not known */
		} else if (newstate == TCP_CLOSE) {
			listener_forget(c);
		}
	}
	count_transition(c, oldstate, newstate, x, dur);
#ifdef TLT_STREAM
	int send = 1;
#else
	int send = as_event;
#endif
	if (send) {
		struct tlt_event *e = ev_new_at(TLT_EV_STATE, now);
		if (!e)
			return 0;
		ev_conn(e, skaddr, c);
		e->flags |= unseen | (as_event ? AGG_SENDS : 0);
		if (c) {
			ev_fold(e, c);
			e->xflags |= x;
			e->dur_ns = dur;
		}
		e->oldstate = oldstate;
		e->newstate = newstate;
		e->sport = sport;
		e->dport = dport;
		e->family = family;
		__builtin_memcpy(e->saddr, saddr, 16);
		__builtin_memcpy(e->daddr, daddr, 16);
#if defined(OFF_TP_BYTES_ACKED) && defined(OFF_TP_BYTES_RECEIVED)
		if (newstate == TCP_CLOSE && !listener &&
		    bpf_probe_read_kernel(&e->tx_b, 8, (void *)skaddr + OFF_TP_BYTES_ACKED) == 0 &&
		    bpf_probe_read_kernel(&e->rx_b, 8, (void *)skaddr + OFF_TP_BYTES_RECEIVED) == 0)
			e->flags |= TLT_F_BYTES;
#endif
		ev_send(args, e);
	}
	if (c && newstate == TCP_CLOSE) {
		c->closed = 1;
#ifdef TLT_AGGREGATE
		if (!as_event)
			agg_emit(args, skaddr, c, now, oldstate, newstate);
#endif
	}
	return 0;
}

#ifdef TLT_HAVE_TCP_DESTROY_SOCK
TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
	u64 skaddr = (u64)args->skaddr;
	struct conn *c = conns.lookup(&skaddr);
	if (!c)
		return 0; /* never traced (e.g. socket() then close()): nothing to end */
	conn_gone(args, skaddr, c, 0);
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
	u64 now = bpf_ktime_get_ns();
	int as_event = !conn_folds(c);
#ifdef TLT_AGGREGATE
	if (!as_event)
	{
		struct tlt_agg *a = agg_begin(c, now);
		a->lflags |= TLT_L_RST_RECEIVED;
		a->last_ns = now;
	}
#endif
#ifndef TLT_STREAM
	if (!as_event)
		return 0;
#endif
	struct tlt_event *e = ev_new_at(TLT_EV_RECV_RESET, now);
	if (!e)
		return 0;
	ev_conn(e, skaddr, c);
	if (c)
		ev_fold(e, c);
	e->flags |= unseen | (as_event ? AGG_SENDS : 0);
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
#ifdef TLT_HAVE_TCP_SEND_RESET_REASON
	s32 reason = args->reason;
#else
	s32 reason = -1;
#endif
	int as_event = !conn_folds(c);
#ifdef TLT_AGGREGATE
	/* Tracker._send_reset records it only on a lifecycle that exists */
	if (!as_event && c->agg.start_ns) {
		c->agg.lflags |= TLT_L_RST_SENT;
		c->agg.rst_reason = reason;
		c->agg.rst_state = args->state;
	}
#endif
#ifndef TLT_STREAM
	if (!as_event)
		return 0;
#endif
	struct tlt_event *e = ev_new(TLT_EV_SEND_RESET);
	if (!e)
		return 0;
	if (skaddr)
		ev_conn(e, skaddr, c);
	if (c)
		ev_fold(e, c);
	e->flags |= as_event ? AGG_SENDS : 0;
	e->oldstate = args->state;
	e->value = reason;
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
	e->flags |= AGG_SENDS; /* it follows the CLOSE: always an event */
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
		u64 now = bpf_ktime_get_ns();
		int as_event = !conn_folds(c);
#ifdef TLT_AGGREGATE
		if (!as_event) { /* Tracker._io / _eof */
			struct tlt_agg *a = agg_begin(c, now);
			if (kind == TLT_EV_IO_OWNER)
				agg_owner(a, tgid, TLT_SRC_IO);
			if (eof && !a->eof_ns)
				a->eof_ns = now;
		} else if (kind == TLT_EV_IO_OWNER) {
			/* no longer folded (its record is out): the owner its events carry is still
			 * the Tracker's, which takes reads after the CLOSE too */
			agg_owner(&c->agg, tgid, TLT_SRC_IO);
		}
#endif
#ifndef TLT_STREAM
		if (!as_event)
			return 0;
#endif
		struct tlt_event *e = ev_new_at(kind, now);
		if (e) {
			ev_conn(e, skaddr, c);
			ev_fold(e, c);
			e->flags |= unseen | (recv ? TLT_F_RECV : 0) | (eof ? TLT_F_EOF : 0) |
				    (as_event ? AGG_SENDS : 0);
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
	e->flags |= AGG_SENDS;
	ev_tuple(e, args->sport, args->dport, args->family, args->saddr, args->daddr,
		 args->saddr_v6, args->daddr_v6);
	ev_send(args, e);
	return 0;
}
#endif


#define TCP_CA_RECOVERY 3
#define TCP_CA_LOSS 4

#ifdef TLT_HAVE_TCP_RETRANSMIT_SKB
/* Retransmits as they happen, counted in the fold (no event): SYN retries in SYN_SENT apart
 * from the rest. Only those sent count (err 0), as tcp_sock.total_retrans does. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef TLT_HAVE_TCP_RETRANSMIT_SKB_ERR
	if (args->err)
		return 0;
#endif
	u64 skaddr = (u64)args->skaddr;
	struct conn *c = conns.lookup(&skaddr);
	if (!conn_folds(c) || c->keep == KEEP_NO)
		return 0;
	if (args->state == TCP_SYN_SENT) {
		if (c->agg.syn_retrans < 0xffff)
			c->agg.syn_retrans++;
	} else if (c->agg.retrans < 0xffffffff) {
		c->agg.retrans++;
	}
	return 0;
}
#endif

#ifdef TLT_HAVE_TCP_CONG_STATE_SET
/* Loss and recovery episodes: entries into TCP_CA_Recovery (fast retransmit) and TCP_CA_Loss
 * (retransmit timeout), counted in the fold. */
TRACEPOINT_PROBE(tcp, tcp_cong_state_set)
{
	u64 skaddr = (u64)args->skaddr;
	struct conn *c = conns.lookup(&skaddr);
	if (!conn_folds(c))
		return 0;
	u8 st = args->cong_state;
	if (st != c->ca_state) {
		if (st == TCP_CA_RECOVERY && c->agg.recoveries < 0xffff)
			c->agg.recoveries++;
		else if (st == TCP_CA_LOSS && c->agg.losses < 0xffff)
			c->agg.losses++;
		c->ca_state = st;
	}
	return 0;
}
#endif
