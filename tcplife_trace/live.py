"""A live tracing session: load the program, feed the tracker, report at the end.

Usable from a notebook or a test as well as from the CLI:

    with LiveSession(Settings()) as s:
        while ...: s.poll()
    report = s.report
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections import Counter
from typing import Callable

import numpy as np

from . import heap, losses
from tcplife_trace.analysis.closes import FoldedCloses
from tcplife_trace.analysis.lifecycle import (DEFAULT_HOLD_NS, DEFAULT_MAX_OPEN, Lifecycle, Tracker, Transition,
                                 take_fold_extras_batch)
from tcplife_trace.analysis.summary import StateTimes
from tcplife_trace.probes import program as prog
from tcplife_trace.probes import btf, conn_map, offset_check
from tcplife_trace.probes import transition_counts as tcounts
from tcplife_trace.probes.decode import events_array, lives_array
from tcplife_trace.probes.event_layout import EventKind, Flag
from tcplife_trace.probes.stream import KIND_NAMES, Batch, EventStream, _take
from tcplife_trace.probes.tcp_states import TcpState as S

_LIFE, _F_AGG = int(EventKind.LIFE), int(Flag.AGG)
_STATE_KIND, _CLOSE_STATE, _SYN_SENT_STATE = int(EventKind.STATE), int(S.CLOSE), int(S.SYN_SENT)
OWN_CHECK_S = 5.0  # how long late records of the start-up check's connection are looked for
PUMP_BACKLOG_BYTES = 256 << 20  # records read ahead while the caller is held up, without a recorder
from .render.views import Clock


class LiveSession:
    def __init__(self, settings: prog.Settings | None = None, *,
                 on_transition: Callable[[Transition], None] | None = None,
                 on_close: Callable[[Lifecycle], None] | None = None,
                 on_loss: Callable[[int, int, str], None] | None = None,
                 recorder=None, wall_offset_ns: int | None = None, keep_events: bool = False,
                 max_open: int = DEFAULT_MAX_OPEN, hold_ns: int = DEFAULT_HOLD_NS,
                 on_batch: Callable[[np.ndarray], None] | None = None):
        t0 = time.monotonic()
        heap.fix_mmap_threshold()  # freed batch buffers go back to the kernel (tcplife_trace/heap.py)
        self.settings = settings or prog.Settings()
        if (self.settings.mode != "stream" and recorder is not None) or (self.settings.mode == "aggregate" and keep_events):
            raise ValueError("recording needs every transition: use mode='stream'")
        # The kernel folds every connection in every mode. A stream session that wants no
        # transition as an object (no on_transition, no kept events) has the tracker follow
        # what the aggregated mode sends, the folds and the events the kernel does not fold
        # (listeners, map-full strays, errno reports, SYN-ACK retransmits): one Python step
        # per connection instead of one per event. on_batch gets each batch's events as
        # columns (EVENT_DTYPE, the tracer's own check connection left out), and a recording
        # takes those columns as they are.
        self.folds_only = self.settings.mode == "stream" and on_transition is None and not keep_events
        self.on_batch = on_batch
        self.program = prog.load(self.settings)
        tcounts.check_layout(self.program)
        self._final_counts: tcounts.Counts | None = None
        self.notices = list(self.program.source.notices)
        self.stream = self._open_stream()
        self._early: list = []  # events read while the offsets were checked, consumed first
        # the records of the tracer's own check connection, by kind: in the kernel's emitted
        # and the stream's received counts, not given to the tracker or the recording
        self.startup_check_events: Counter[str] = Counter()
        self._own_ports: set[int] = set()
        self._own_gens: set[int] = set()
        self._own_until = 0.0
        self._check_offsets()
        self.startup_s = time.monotonic() - t0
        self.state_times = StateTimes()
        self.end_reasons: Counter[str] = Counter()
        self._user_on_close = on_close
        self.close_watchers: list[Callable[[Lifecycle], None]] = []  # e.g. diagnosis.Watch.closed
        self.on_loss = on_loss  # (new losses, total so far, what caused them)
        self._lost_seen: dict[str, int] = {}
        self._last_kernel: dict | None = None
        self._next_loss_check = 0
        # a fresh program's recursion_misses start at 0 when it is loaded, which is when bcc
        # attaches it: the counters are the trace's own from the first event on
        self._check_losses(time.monotonic_ns())  # the baseline look, at once
        if self._last_kernel["recursion"] is None:
            self.notices.append("this kernel does not count BPF recursion misses (5.12+ does): tracepoint "
                                "hits skipped while another BPF program ran cannot be counted as lost")
        self.tracker = Tracker(self.settings.filters, on_transition=on_transition,
                               on_close=self._closed, on_state_time=self.state_times.add,
                               max_open=max_open, hold_ns=hold_ns)
        # mode "both": the kernel sends every transition and the folded record of each
        # connection; self.tracker follows the transitions, agg_tracker what the aggregated
        # mode alone would have sent, and agg_lifecycles collects its finished connections
        # Following only the folds, with nobody wanting a Lifecycle object (no on_close) and no
        # user-space filter: the folded records are counted as columns (analysis/closes.py), the
        # tracker gets only the few it must see. column_watchers: a close watcher's columns
        # method (ClosedRows), by the watcher; a watcher without one gets Lifecycle objects.
        self.column_watchers: dict[Callable, Callable] = {}
        self.closes: FoldedCloses | None = None
        if (self.folds_only or self.settings.mode == "aggregate") and on_close is None \
                and not self.settings.filters.active():
            self.closes = FoldedCloses(self.tracker, self.state_times, self.end_reasons,
                                       lambda: [(w, self.column_watchers.get(w)) for w in self.close_watchers])
        self.agg_tracker: Tracker | None = None
        self.agg_lifecycles: list[Lifecycle] = []
        if self.settings.mode == "both":
            self.agg_tracker = Tracker(self.settings.filters, on_close=self.agg_lifecycles.append,
                                       max_open=max_open, hold_ns=hold_ns)
        if wall_offset_ns is None:
            wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.clock = Clock(wall_offset_ns, time.monotonic_ns())
        self.recorder = recorder  # a RecordingWriter: gets every event, in order
        self.kept: list | None = [] if keep_events else None  # for .recording()
        self.report: dict | None = None
        self._folded_open = 0  # open connections read from the kernel map at the end
        self.still_open: list[Lifecycle] = []
        # Millions of short-lived objects and no reference cycles among them: full
        # collections would only scan the startup heap (bcc, click, pandas) over and over.
        gc.freeze()
        gc.set_threshold(100_000, 50, 1000)

    def _closed(self, lc: Lifecycle) -> None:
        self.end_reasons[lc.end_reason] += 1
        if self._user_on_close:
            self._user_on_close(lc)
        for watcher in self.close_watchers:
            watcher(lc)

    def _open_stream(self) -> EventStream:
        stream = EventStream(self.program)
        stream.tuple_lives |= self.folds_only  # the folds in the tuples too
        return stream

    def _check_offsets(self) -> None:
        """What the BTF offsets read on the tracer's own connection (probes/offset_check.py).
        Offsets from the cache in /run that read wrong (or, when a filter hides that
        connection, differ from the BTF itself) are rebuilt from BTF, the program is loaded
        again, and a notice says so."""
        used, _ = btf.kernel_offsets()  # what the program was built with (the cache, by now)
        if not used:
            return
        wrong = None
        if offset_check.possible(self.settings.filters):
            try:
                self._early, wrong, mine, own = offset_check.check(self.stream, set(used),
                                                                   self.settings.filters.family,
                                                                   "both" if self.folds_only else self.settings.mode)
            except OSError as e:  # no loopback here (a namespace with lo down, IPv6 disabled)
                self.notices.append(f"the struct offsets were not checked on a connection of the tracer's "
                                    f"own ({e.strerror or e}): netns, uid and byte counts are as BTF says")
                return
            self.startup_check_events = Counter(KIND_NAMES.get(ev[13], str(ev[13])) for ev in mine)
            self._check_self_marking(mine)
            # records of it that come later (a loaded machine) are left out too, for a while
            (self._own_ports, self._own_gens), self._own_until = own, time.monotonic() + OWN_CHECK_S
            if wrong is None:
                return
        fresh, _ = btf.kernel_offsets(use_cache=False)
        if fresh == used:
            if wrong:
                self.notices.append(f"the struct offsets from the kernel's BTF read wrong values on the "
                                    f"tracer's own connection ({wrong}): netns, uid and byte counts may be wrong")
            return
        dropped = len(self._early)
        btf.forget_cache()
        self.stream.close()
        self.program.close()
        self.program = prog.load(self.settings)  # the offsets read again from BTF, cached afresh
        self.stream = self._open_stream()
        self._early = []
        self.startup_check_events = Counter()  # (the first program's: gone with it)
        self.notices.append(
            f"the BTF offset cache in {btf.cache_dir()} held offsets that "
            + (f"read wrong values ({wrong})" if wrong else "differ from the kernel's BTF")
            + f": rebuilt from {btf.VMLINUX_BTF} and the program loaded again"
            + (f" ({dropped} events of the first program, read meanwhile, left out)" if dropped else ""))

    def _without_own(self, batch: Batch) -> Batch:
        """The batch without late records of the start-up check's connection (its first
        OWN_CHECK_S only), counted in startup_check_events by kind."""
        if not self._own_ports or not len(batch):
            return batch
        if time.monotonic() > self._own_until:
            self._own_ports = set()
            return batch
        parts = []
        for recs, rows in ((batch.events, batch.events), (batch.lives, batch.lives["ev"])):
            mine = offset_check.own_rows(rows, self._own_ports, self._own_gens) if len(recs) else None
            if mine is not None and mine.any():
                kinds, counts = np.unique(rows["kind"][mine], return_counts=True)
                for k, c in zip(kinds.tolist(), counts.tolist()):
                    self.startup_check_events[KIND_NAMES.get(k, str(k))] += c
                recs = _take(recs, ~mine)
            parts.append(recs)
        return Batch(*parts)

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms for events, process them; returns how many arrived."""
        batch = self.stream.poll_batch(timeout_ms)
        self._take_batch(self._without_own(batch))
        now = time.monotonic_ns()
        self._release(now)
        if now >= self._next_loss_check:
            self._check_losses(now)
        return len(batch)

    def release_held(self, now_ns: int) -> None:
        """Finish the closed connections whose trailing events are overdue at now_ns, now."""
        self._release(now_ns, at_once=True)

    def _release(self, now_ns: int, at_once: bool = False) -> None:
        if self.closes is not None:
            self.closes.advance(now_ns, at_once)
        self.tracker.advance(now_ns)
        if self.agg_tracker is not None:
            self.agg_tracker.advance(now_ns)

    def _take_batch(self, batch: Batch, recorded: bool = False) -> None:
        """One batch (the start-up check's records read meanwhile first): to the recording
        (unless `recorded`: the pump wrote it), to on_batch, to the tracker."""
        early = self._take_early()
        if self.recorder is not None and not recorded:
            self._record(batch)
        self._hand_out(batch.events)
        if early:  # fed first: what the tracker knows decides where the batch's folds go
            self._consume(early)
        self._consume(self._tracked(batch))
        if not self.folds_only and self.settings.mode != "aggregate" and len(batch.lives):
            # lifecycles built from the events take what only the fold knows (cgroup,
            # retransmits, health) from the LIFE records, while the tracker holds them closed
            take_fold_extras_batch(self.tracker.live, batch.lives)

    def _record(self, batch: Batch) -> None:
        """The batch's columns as they are: its events, and its LIFE records' extras."""
        if self.recorder is None:
            return
        if len(batch.events):
            self.recorder.add_batch(batch.events)
        if len(batch.lives):
            self.recorder.add_lives(batch.lives)

    def _tracked(self, batch: Batch) -> list:
        """What the tracker follows, as tuples: every event (and in the aggregated modes the
        folds); with folds_only the folds and the events the kernel does not fold, and with
        the folds counted as columns (self.closes) only the folds the tracker must see."""
        if not self.folds_only and self.settings.mode != "aggregate":
            return batch.tuples(self.stream.tuple_lives)
        ev = batch.events
        if len(ev) and self.folds_only:
            ev = _take(ev, (ev["flags"] & _F_AGG) != 0)
        if self.closes is not None:
            return self.closes.route(ev, batch.lives)
        return Batch(ev, batch.lives).tuples(True)

    def _take_early(self) -> list:
        """The records read during the start-up check (tuples), once: recorded, given to
        on_batch (their events, without the fold's fields: their durations are not counted),
        and returned as _tracked gives a batch's."""
        early, self._early = self._early, []
        if not early:
            return early
        if self.recorder is not None:  # its events as events, its LIFE records as lives
            self.recorder.add([e for e in early if e[13] != _LIFE])
            lives = [e for e in early if e[13] == _LIFE]
            if lives:
                self.recorder.add_lives(lives_array(lives))
        if self.on_batch is not None:
            self._hand_out(events_array([e for e in early if e[13] != _LIFE]))
        if self.folds_only:
            early = [e for e in early if e[13] == _LIFE or e[16] & _F_AGG]
        return early

    def _hand_out(self, events: np.ndarray) -> None:
        """A batch's events to on_batch (the start-up check's records are out already)."""
        if self.on_batch is not None and len(events):
            self.on_batch(events)

    def _consume(self, events: list) -> None:
        if self.kept is not None:
            # mode "both" keeps the stream's events (the equivalence tests' offline view)
            self.kept += events if self.agg_tracker is None else [e for e in events if e[13] != _LIFE]
        if self.agg_tracker is None:
            self.tracker.feed_all(events)
            return
        self.tracker.feed_all([e for e in events if e[13] != _LIFE])
        self.agg_tracker.feed_all([e for e in events if e[13] == _LIFE or e[16] & _F_AGG])

    @contextlib.contextmanager
    def pumping(self):
        """While the body holds the caller up (the detectors' import, a look at every socket),
        a thread goes on reading the kernel's buffers (into the recording, if any), so that
        the rings do not fill while it lasts (a look at a host with a few hundred thousand
        TIME_WAIT sockets takes about a second, and a churn fills the rings in less) and a
        recording stays within a second of the kernel (the README's promise to a SIGKILL);
        the tracker gets those batches afterwards, in order, as if they had waited in the ring.
        Without a recorder the batches held meanwhile are bounded (PUMP_BACKLOG_BYTES): past
        that the rings hold the rest, as they would without the pump."""
        # the events read during the offset check came first: recorded and taken first too
        self._consume(self._take_early())
        failed: list[BaseException] = []
        backlog: list[Batch] = []
        done = threading.Event()

        held = [0]  # bytes in the backlog

        def pump():
            try:
                while not done.is_set():
                    if self.recorder is None and held[0] > PUMP_BACKLOG_BYTES:
                        done.wait(0.05)  # (the rings take the rest; what they refuse is counted as lost)
                        continue
                    batch = self._without_own(self.stream.poll_batch(50))
                    self._record(batch)
                    if len(batch):
                        backlog.append(batch)
                        held[0] += batch.events.nbytes + batch.lives.nbytes
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                failed.append(e)
        thread = threading.Thread(target=pump, name="tcplife-pump", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            for batch in backlog:
                self._take_batch(batch, recorded=True)
        if failed:
            raise failed[0]

    def _account(self, kernel: dict) -> dict:
        return losses.account(kernel, self.stream.received_by_kind(), self.stream.discarded)

    def _check_losses(self, now: int) -> None:
        """Once a second: has the kernel lost events since the last look? Say so now, not at exit."""
        self._next_loss_check = now + 1_000_000_000
        self._last_kernel = self.stream.kernel_counts()
        lost = self._account(self._last_kernel)["lost_by_kind"]
        new = {k: n - self._lost_seen.get(k, 0) for k, n in lost.items() if n > self._lost_seen.get(k, 0)}
        if new and self.on_loss:
            self.on_loss(sum(new.values()), sum(lost.values()), losses.why(new))
        self._lost_seen = lost

    def counts_now(self) -> dict:
        """Running totals for a metrics exporter, the kernel's counters read now (a loss check:
        what it finds new is said as well); every loss kind is there, zeros included."""
        self._check_losses(time.monotonic_ns())
        kernel = self._last_kernel
        a = self._account(kernel)
        return {"events_received": a["received"], "events_lost_by_kind": a["lost_by_kind"],
                "evictions": self.tracker.counters.evicted, "conn_map_full": kernel["map_full"]}

    def open_lifecycles(self, states: set[int] | None = None) -> list[Lifecycle]:
        """Connections open right now (only those in `states`, if given). In the aggregated
        mode the kernel holds them: they are read from its connection map (listeners and
        map-full strays come as events)."""
        folded, replaced = self._folding(states)
        out = [lc for lc in self.tracker.live.values()
               if not lc.closed and lc.conn_id not in replaced and (states is None or lc.state in states)]
        return out + folded

    def _folding(self, states: set[int] | None = None) -> tuple[list[Lifecycle], set]:
        """The open connections the kernel is folding (aggregated mode; none otherwise), and
        the ids of the tracker's lifecycles they continue (born while the map was full)."""
        if self.settings.mode != "aggregate" and not self.folds_only:
            return [], set()
        entryless = bool(self.tracker.entryless.at)  # their folds may be in any state: read all
        folded, replaced = self.tracker.open_folds(conn_map.open_folds(self.program.bpf, None if entryless else states))
        if entryless and states is not None:
            folded = [lc for lc in folded if lc.state in states]
        return folded, replaced

    def transition_counts(self) -> tcounts.Counts:
        """The transitions the kernel counted so far (probes/transition_counts.py), the final
        counts once stopped (a read that the stop overtook gives them too)."""
        if self._final_counts is not None:
            return self._final_counts
        try:
            return tcounts.read(self.program)
        except Exception:  # noqa: BLE001 - bcc raises Exception: the program closed meanwhile
            if self._final_counts is not None:
                return self._final_counts
            raise

    def _check_self_marking(self, mine: list) -> None:
        """Did the kernel tell the start-up check's sockets as the tracer's own (by this
        process's tgid)? In a PID namespace of its own the tracer's pid is not the kernel's
        tgid: learn it from the check's connect() and say that the check's transitions are
        in the metrics' counts."""
        if not mine or tcounts.read(self.program).self_transitions:
            return
        for ev in mine:
            if ev[13] == _STATE_KIND and ev[14] == _CLOSE_STATE and ev[15] == _SYN_SENT_STATE and ev[6]:
                tcounts.set_tgid(self.program, ev[6])
                break
        self.notices.append("the kernel did not tell the start-up check's connection as the tracer's own (a PID "
                            "namespace of its own?): its transitions are in the metrics' counts")

    def stop(self) -> dict:
        """Drain the buffer, finish every connection, detach; returns the report."""
        if self.report is not None:
            return self.report
        duration_s = (time.monotonic_ns() - self.clock.start) / 1e9
        last = self.stream.finish_batch()  # detached first: the counters below are final
        self._take_batch(self._without_own(last))
        if self.closes is not None:
            self.closes.finish()
        still = self.tracker.finish()
        # the filters on those still open too, as on those that ended (Tracker._finish): under
        # -p an accepted socket of another process's listener reaches user space (the kernel
        # cannot tell its owner at SYN_RECV) and was listed here as open
        self.still_open = [lc for lc in still if self.tracker.kept(lc)]
        self.tracker.counters.filtered += len(still) - len(self.still_open)
        folded, replaced = self._folding()
        folded = [lc for lc in folded if self.tracker.kept(lc)]  # still in the kernel map
        self.still_open = [lc for lc in self.still_open if lc.conn_id not in replaced]
        self._folded_open = len(folded)
        self.still_open += folded
        if self.agg_tracker is not None:
            self.agg_tracker.finish()
        kernel = self.stream.kernel_counts()
        c = self.tracker.counters
        acc = self._account(kernel)
        nonzero = (lambda d: {k: v for k, v in d.items() if v})  # noqa: E731
        self.report = {
            "duration_s": round(duration_s, 3),
            "mode": self.settings.mode,
            "startup_s": round(self.startup_s, 3),
            "connections_seen": c.connections - c.filtered + self._folded_open,
            "closed": c.closed,
            "still_open": len(self.still_open),
            "filtered_out": c.filtered,
            "end_reasons": dict(self.end_reasons.most_common()),
            "state_times": self.state_times.table(),
            # events_received + events_lost == events_emitted_by_kernel, exactly (losses.py)
            "events_received": acc["received"],
            "events_emitted_by_kernel": acc["emitted"],
            "events_lost": acc["lost"],
            "events_received_by_kind": nonzero(acc["received_by_kind"]),
            "events_emitted_by_kind": nonzero(acc["emitted_by_kind"]),
            "events_lost_by_kind": nonzero(acc["lost_by_kind"]),
            "recursion_misses": kernel["recursion"],
            "events_via_overflow": sum(kernel["spilled"].values()),
            "overflow_out_of_order": self.stream.late_overflow,
            "overflow_buffer_lost": self.stream.overflow_lost,  # perf's count of the same drops: not added
            "conn_map_full": kernel["map_full"],
            # both rings (events, and the folded records): the fuller one's peak, every record stepped over
            "ring_peak_fill": round(self.stream.peak_fill, 4),
            "ring_discarded": self.stream.discarded,
            "evictions": c.evicted,
            "sequence_gaps": c.sequence_gaps,
            "transitions_out_of_order": c.out_of_order,
            "unmatched_errors": c.unmatched_errors,
            "resets_sent_no_socket": c.resets_no_socket,
            "synack_retransmits": c.synack_retransmits,
            "filters": self.settings.filters.describe(),
            "consumer_cpu_s": round(sum(os.times()[:2]), 3),
            # the tracer's own start-up connection (probes/offset_check.py), by kind: counted in
            # the emitted and received figures above, and nowhere else
            "startup_check_events": dict(self.startup_check_events),
        }
        self._final_counts = tcounts.read(self.program)  # detached: final
        self.stream.close()
        self.program.close()
        if self.recorder is not None:
            self.recorder.close({k: v for k, v in self.report.items() if k != "state_times"})
            try:
                size = os.path.getsize(self.recorder.path)
            except OSError:
                size = None
            self.report["recording"] = {"path": self.recorder.path, "events": self.recorder.written,
                                        "socket_snapshots": self.recorder.snapshots, "bytes": size,
                                        "failed": self.recorder.failed}
        return self.report

    def recording(self):
        """The events of this session (made with keep_events=True) as a Recording, so that a
        notebook gets the same frames from a live session as from a file."""
        if self.kept is None:
            raise ValueError("start the session with keep_events=True to analyse its events")
        from .recording import Recording, header
        return Recording.from_events(self.kept, header(self.settings.filters, self.clock.offset),
                                     self.report)

    def degraded(self) -> bool:
        """Anything lost or out of place (what --strict fails on): events lost (both buffers
        refused, recursion misses, unreadable ring records), connection map full, evictions,
        overflow events that came too late to be put in order, transitions out of sequence."""
        return bool(losses.degraded_by(self.report or {}))

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
