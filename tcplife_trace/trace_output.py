"""What a trace writes on stdout while it runs, as one library object: the per-transition text
view (the default), one line per finished connection (`--lifecycles`), or the same records as
JSON Lines (`--json`) or CSV (`-s`).

`TraceOutput` picks how each is made. Without a filter that needs the tracker's verdict on
each connection (`-p`, `-L`, `-D`, `-4`, `-6`, `--cgroup`), the per-transition views are
formatted a batch at a time from the events' columns and the kernel's fold on each
(`render/batches.py` `ColumnTransitions`), and the `--lifecycles` text lines from the folded
records' columns (`render/lifecycle_lines.py` `ColumnLifecycles`); otherwise, and for `--lifecycles`
records, each line comes from the Transition or Lifecycle the tracker hands to the session's
callbacks. `tcplife-trace` and `serve` use it as a notebook can:

    out = TraceOutput(view="text")
    session = Session(settings, **out.session_callbacks(settings.filters))
    out.attach(session)
    print(out.header())
    session.run(5, after_poll=lambda: sys.stdout.buffer.write(out.take()))
"""
from __future__ import annotations

from .render.views import TextView, dumps, lifecycle_record, transition_record

VIEWS = ("text", "json", "csv")


class TraceOutput:
    """The lines of one trace's stdout view. view: text, json or csv; lifecycles: a line per
    finished connection instead of per transition; quiet: nothing (serve); wide, hms, seconds:
    -w, -T, -t; encoding, errors: how text becomes the bytes take() returns (stdout's)."""

    def __init__(self, *, view: str = "text", lifecycles: bool = False, wide: bool = False, hms: bool = False,
                 seconds: bool = False, quiet: bool = False, encoding: str = "utf-8", errors: str = "strict"):
        if view not in VIEWS:
            raise ValueError(f"view {view!r}: one of {', '.join(VIEWS)}")
        self.view, self.lifecycles, self.quiet = view, lifecycles, quiet
        self.wide, self.hms, self.seconds = wide, hms, seconds
        self.encoding, self.errors = encoding, errors
        self.records = view != "text"  # records on stdout instead of the text view
        if view == "csv":
            from .render.csv_rows import CsvRows
            self._fmt = CsvRows()
        else:
            self._fmt = dumps
        self._pending: list[str] = []  # lines made one at a time since the last take()
        self._columns = None           # render.batches.ColumnTransitions: the per-transition views
        self._lines = None             # render.lifecycle_lines.ColumnLifecycles: --lifecycles' text
        self._session = None
        self._text: TextView | None = None

    # -- wiring
    def session_callbacks(self, filters) -> dict:
        """The Session's on_transition, on_close and on_batch for a trace under these filters."""
        exact = filters.active()  # the tracker's verdict per connection: one object per line
        if not self.lifecycles and not self.quiet and not exact:
            from .render.batches import ColumnTransitions
            self._columns = ColumnTransitions()
        if self.lifecycles and not self.records and not self.quiet and not exact:
            from .render.lifecycle_lines import ColumnLifecycles
            self._lines = ColumnLifecycles(self._pending.append)
        per_transition = not self.lifecycles and not self.quiet and self._columns is None
        per_connection = self.lifecycles and not self.quiet and self._lines is None
        return {"on_transition": self._on_transition if per_transition else None,
                "on_close": self._on_close if per_connection else None,
                "on_batch": self._columns.on_batch if self._columns is not None else None}

    def attach(self, session) -> None:
        """After the Session is made with session_callbacks(): its clock and live session."""
        self._session = session
        self._text = TextView(session.clock, wide=self.wide, hms=self.hms, seconds=self.seconds)
        if self._lines is not None:
            self._lines.attach(session.live, wide=self.wide, hms=self.hms, seconds=self.seconds,
                               encoding=self.encoding, errors=self.errors)
        if self._columns is not None:
            from .render.batches import BatchFormatter
            self._columns.fmt = BatchFormatter(session.clock, self.view, wide=self.wide, hms=self.hms,
                                               seconds=self.seconds,
                                               csv_rows=self._fmt if self.view == "csv" else None,
                                               encoding=self.encoding, errors=self.errors)
            self._columns.attach(session.live)

    # -- lines
    def _on_transition(self, t) -> None:
        self._pending.append(self._fmt(transition_record(t, self._session.clock, home=self.view == "json"))
                             if self.records else self._text.transition(t))

    def _on_close(self, lc) -> None:
        self._pending.append(self._fmt(lifecycle_record(lc, self._session.clock)) if self.records
                             else self._text.lifecycle(lc))

    def header(self) -> str | None:
        """The text view's column header (None for records, whose CSV header comes with the
        first row, and for quiet)."""
        if self.records or self.quiet:
            return None
        return self._text.lifecycle_header() if self.lifecycles else self._text.transition_header()

    def still_open(self) -> None:
        """--lifecycles: a line for each connection still open at the end, with its health from
        the last look at the sockets (after the session's run)."""
        if not self.lifecycles or self.quiet:
            return
        s = self._session
        for lc in s.still_open:
            seen = s.open_health.get(lc.conn_id)
            self._pending.append(self._fmt(lifecycle_record(lc, s.clock, still_open=True, health=seen))
                                 if self.records else self._text.lifecycle(lc, still_open=True, health=seen))

    def take(self) -> bytes:
        """The lines made since the last take(), in order, as bytes (one write per poll)."""
        return b"".join(self.chunks())

    def chunks(self):
        """take()'s bytes in pieces (each a bounded number of lines), to be written one after
        the other: after a look at the sockets a poll may hand out the rings' whole backlog."""
        if self._pending:
            data = ("\n".join(self._pending) + "\n").encode(self.encoding, self.errors)
            self._pending.clear()
            yield data
        if self._columns is not None:
            yield from self._columns.chunks()

    @property
    def unmatched(self) -> int:
        """Transitions of sockets the full connection map had no entry for whose tracker line
        was not found (printed from their columns: no owner, no time in the old state)."""
        return self._columns.unmatched if self._columns is not None else 0
