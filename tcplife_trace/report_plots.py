"""The incident report's plots: aggregates of analyze's frames, drawn with matplotlib.

`aggregates()` reduces the frames (lifecycles, transitions, state durations, summary) to what
the plots draw, whatever the recording's size: time in a bounded number of bins, durations in
log-spaced histogram bins, the longest and still-open connections capped to a few rows.
`figures()` draws them; `write()` saves them as PNG and SVG. Matplotlib is imported only here,
and only when a report is asked for (a live trace never loads it).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .frames.columns import STATE_CATEGORIES

MAX_BINS = 600          # time bins of the over-time plots, whatever the recording's length
TIMELINE_ROWS = 20      # longest connections and still-open connections, each
TOP_GROUPS = 8          # peers / local ports / processes in the per-group plots
PER_DECADE = 8          # histogram bins per power of ten of the duration plots

# the distributions' panels: the issue's groups of states
PANELS = (("handshake", ("SYN_SENT", "SYN_RECV")), ("ESTABLISHED", ("ESTABLISHED",)),
          ("CLOSE_WAIT", ("CLOSE_WAIT",)), ("FIN_WAIT*, CLOSING", ("FIN_WAIT1", "FIN_WAIT2", "CLOSING")),
          ("LAST_ACK", ("LAST_ACK",)))
GROUPINGS = (("peer", ["raddr", "rport"]), ("local port", ["lport"]), ("process", ["pid", "comm"]))
# one colour per state, the same in every plot (colour-blind safe: Okabe-Ito, then greys)
STATE_COLORS = {"ESTABLISHED": "#0072B2", "SYN_SENT": "#E69F00", "SYN_RECV": "#F0E442",
                "FIN_WAIT1": "#009E73", "FIN_WAIT2": "#56B4E9", "CLOSING": "#999999",
                "CLOSE_WAIT": "#D55E00", "LAST_ACK": "#CC79A7", "LISTEN": "#444444",
                "TIME_WAIT": "#BBBBBB", "NEW_SYN_RECV": "#777777", "CLOSE": "#000000"}
REASON_COLORS = {"active_close": "#0072B2", "passive_close": "#56B4E9", "reset_by_peer": "#D55E00",
                 "local_abort": "#CC79A7", "refused": "#E69F00", "timeout": "#F0E442",
                 "listener_closed": "#444444", "unknown": "#999999"}
_NICE = (1, 2, 5)


@dataclass
class Aggregates:
    """What the plots draw (and the page states beside them)."""
    t0: pd.Timestamp | None = None              # first and last instant of the plotted span
    t1: pd.Timestamp | None = None
    bin_s: float = 0.0                          # width of one time bin
    edges_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bin edges, seconds from t0
    widths_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # each bin's width (the last may be cut)
    open_by_state: dict[str, np.ndarray] = field(default_factory=dict)  # mean open per bin
    new_per_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ended_per_s: dict[str, np.ndarray] = field(default_factory=dict)   # per end reason
    hist_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))  # seconds, log-spaced
    hist: dict[str, np.ndarray] = field(default_factory=dict)          # per state
    zero_s: dict[str, int] = field(default_factory=dict)              # samples of 0 s, drawn in the first bin
    percentiles: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # p50 p90 p99
    groups: dict[str, dict] = field(default_factory=dict)             # per grouping: labels, lifetimes, medians
    longest: pd.DataFrame | None = None         # lifecycles rows of the timeline
    still_open: pd.DataFrame | None = None
    still_open_total: int = 0
    segments: dict[int, list[tuple[float, float, str, bool]]] = field(default_factory=dict)  # conn -> (from s, to s, state, before the recording)

    @property
    def empty(self) -> bool:
        return self.t0 is None


def nice_width(span_s: float, bins: int = MAX_BINS) -> float:
    """The smallest 1-2-5 step (1 us and up) that covers span_s in at most `bins` bins."""
    exp = -6
    while True:
        for m in _NICE:
            w = m * 10.0 ** exp
            if span_s / w <= bins:
                return w
        exp += 1


def _ns(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype="datetime64[ns]").astype(np.int64)


def aggregates(frames: dict[str, pd.DataFrame], stopped: pd.Timestamp | None = None) -> Aggregates:
    """Reduce analyze's frames (analysis_report.frames()) to the plots' data. stopped: when the
    recording ended, if later than its last transition (still-open connections run to it)."""
    lc, tr = frames["lifecycles"], frames["transitions"]
    a = Aggregates()
    if len(lc) == 0 or len(tr) == 0:
        return a
    t = _ns(tr["time"])
    first, last = int(t.min()), int(t.max())
    if stopped is not None and stopped.value > last:
        last = stopped.value
    a.bin_s = nice_width(max((last - first) / 1e9, 1e-6))
    width = int(round(a.bin_s * 1e9))
    nbins = max(1, -(-(last - first) // width))
    edges = first + np.arange(nbins + 1, dtype=np.int64) * width
    a.t0, a.t1 = pd.Timestamp(first, tz="UTC"), pd.Timestamp(last, tz="UTC")
    a.edges_s = (edges - first) / 1e9
    cut = np.minimum(edges, last)  # (the last bin ends with the span)
    a.widths_s = np.maximum(np.diff(cut), 1) / 1e9
    a.open_by_state = _open_by_state(lc, tr, t, cut)
    a.new_per_s, a.ended_per_s = _new_and_ended(lc, cut, a.widths_s)
    _distributions(a, frames["state_durations"], frames["summary"])
    _groups(a, lc, frames["state_durations"])
    _timeline(a, lc, tr, first, last)
    return a


def _open_by_state(lc: pd.DataFrame, tr: pd.DataFrame, t: np.ndarray, edges: np.ndarray) -> dict:
    """Mean number of connections in each state over each bin (edges: ns, the last one the
    span's end). Each transition moves its connection from oldstate into newstate; a
    connection's first transition in the frame is its birth when it is where its lifecycle
    starts (born from CLOSE, or a child from its listener's LISTEN: it was in no state
    before), and otherwise it had been in oldstate since the start of the span. CLOSE is no
    state one is open in; TIME_WAIT is never reported by the kernel (a timewait socket
    replaces the connection), so it is not drawn. No sort: each change adds its count times
    the rest of its bin to that bin, and its count to every later bin (a running sum)."""
    conn = tr["conn_id"].to_numpy(dtype=np.uint64, na_value=0)
    old = tr["oldstate"].cat.codes.to_numpy()
    new = tr["newstate"].cat.codes.to_numpy()
    n = len(t)
    order = None if n < 2 or (t[1:] >= t[:-1]).all() else np.argsort(t, kind="stable")
    first = ~pd.Series(conn if order is None else conn[order]).duplicated().to_numpy()
    first = np.flatnonzero(first) if order is None else np.sort(order[first])
    born = lc[lc["birth_seen"].to_numpy(dtype=bool)]  # (start is the first sight otherwise)
    start = pd.Series(_ns(born["start"]), index=born["conn_id"].to_numpy(dtype=np.uint64))
    start = start[~start.index.duplicated()].reindex(conn[first]).to_numpy(dtype=float, na_value=-np.inf)
    born_here = np.zeros(n, bool)
    born_here[first] = t[first] <= start
    prior = first[~born_here[first]]
    nb, ns = len(edges) - 1, len(STATE_CATEGORIES)
    width = int(edges[1] - edges[0]) if nb > 1 else max(int(edges[-1] - edges[0]), 1)
    whole = np.zeros((ns, nb))      # count changes per bin
    part = np.zeros((ns, nb))       # count changes x the rest of their bin, ns

    def add(times: np.ndarray, states: np.ndarray, sign: float) -> None:
        named = states >= 0
        times, states = times[named], states[named].astype(np.int64)
        b = np.clip((times - edges[0]) // width, 0, nb - 1)
        key = states * nb + b
        whole.flat[:] += sign * np.bincount(key, minlength=ns * nb)
        part.flat[:] += sign * np.bincount(key, weights=(edges[b + 1] - times).astype(np.float64), minlength=ns * nb)
    add(t, new, 1.0)
    leaves = ~born_here
    add(t[leaves], old[leaves], -1.0)
    add(np.full(len(prior), edges[0]), old[prior], 1.0)
    widths = np.maximum(np.diff(edges), 1).astype(np.float64)
    before = np.cumsum(whole, axis=1) - whole  # open at the start of each bin
    mean = (before * widths + part) / widths
    close = STATE_CATEGORIES.index("CLOSE")
    return {name: np.maximum(mean[k], 0.0) for k, name in enumerate(STATE_CATEGORIES)
            if k != close and np.abs(mean[k]).max() > 1e-12}


def _new_and_ended(lc: pd.DataFrame, edges: np.ndarray, widths_s: np.ndarray):
    """Births (born inside the span) and ends per second, the ends by how they ended."""
    nb = len(edges) - 1
    width = int(edges[1] - edges[0]) if nb > 1 else max(int(edges[-1] - edges[0]), 1)

    def per_s(ns: np.ndarray) -> np.ndarray:
        ns = ns[(ns >= edges[0]) & (ns <= edges[-1])]
        return np.bincount(np.clip((ns - edges[0]) // width, 0, nb - 1), minlength=nb) / widths_s
    born = lc["birth_seen"].to_numpy(dtype=bool) & (lc["role"] != "listener").to_numpy()
    new = per_s(_ns(lc["start"][born]))
    ended = {}
    done = lc["end"].notna().to_numpy()
    end_ns = _ns(lc["end"][done])
    reason = lc["end_reason"][done]
    codes, names = reason.cat.codes.to_numpy(), [str(c) for c in reason.cat.categories]
    present = set(np.unique(codes).tolist()) - {-1}
    order = [r for r in REASON_COLORS if r in names] + sorted(set(names) - set(REASON_COLORS))
    for r in order:
        k = names.index(r)
        if k in present:
            ended[r] = per_s(end_ns[codes == k])
    return new, ended


def _distributions(a: Aggregates, durations: pd.DataFrame, summary: pd.DataFrame) -> None:
    codes = durations["state"].cat.codes.to_numpy()
    seconds = durations["seconds"].to_numpy()
    shown = [s for _, states in PANELS for s in states]
    positive = seconds[(seconds > 0) & np.isin(codes, [STATE_CATEGORIES.index(s) for s in shown])]
    if len(positive) == 0:
        return
    lo = np.floor(np.log10(positive.min()) * PER_DECADE) / PER_DECADE
    hi = np.ceil(np.log10(positive.max()) * PER_DECADE) / PER_DECADE
    if hi <= lo:
        hi = lo + 1 / PER_DECADE
    a.hist_edges = 10.0 ** np.arange(lo, hi + 1e-9, 1 / PER_DECADE)
    for s in shown:
        v = seconds[codes == STATE_CATEGORIES.index(s)]
        if len(v) == 0:
            continue
        zero = v <= 0
        h = np.histogram(np.clip(v[~zero], a.hist_edges[0], a.hist_edges[-1]), bins=a.hist_edges)[0]
        h[0] += int(zero.sum())
        a.hist[s], a.zero_s[s] = h, int(zero.sum())
    summ = summary.set_index("state") if "state" in summary.columns else summary
    for s in summ.index.astype(str):
        r = summ.loc[s]
        a.percentiles[s] = (float(r["p50_s"]), float(r["p90_s"]), float(r["p99_s"]))


def group_labels(lc: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One label per connection for a grouping: 'raddr:rport', 'lport', 'pid comm' (- unknown)."""
    def col(k):
        return lc[k].astype(object).where(lc[k].notna(), "-").astype(str)
    if keys == ["raddr", "rport"]:
        return col("raddr") + ":" + col("rport")
    if keys == ["pid", "comm"]:
        return col("pid") + " " + col("comm")
    return col(keys[0])


def _groups(a: Aggregates, lc: pd.DataFrame, durations: pd.DataFrame) -> None:
    """Per grouping, the groups (connections.grouped(): the page's tables) and, for the top
    groups (most connections), the lifetimes and the median time in each state of their
    connections, listeners aside."""
    from .frames.connections import grouped
    for name, keys in GROUPINGS:
        table = grouped(lc, keys)
        top = table.head(TOP_GROUPS)
        top_keys = top.index.to_frame(index=False)
        maybe = (lc["role"] != "listener").to_numpy().copy()
        for k in keys:  # each key among the top groups' (cheap), then the exact groups on those
            maybe &= lc[k].isin(top_keys[k].dropna()).to_numpy(dtype=bool, na_value=False) | \
                (lc[k].isna().to_numpy() & bool(top_keys[k].isna().any()))
        sub = lc[maybe]
        want = group_labels(top_keys, keys).tolist()
        labels = group_labels(sub, keys).to_numpy()
        sub, labels = sub[np.isin(labels, want)], labels[np.isin(labels, want)]
        top_labels = [x for x in want if x in set(labels)]
        life = sub["duration_s"].to_numpy()
        ids = sub["conn_id"].to_numpy(dtype=np.uint64)
        d = durations[durations["conn_id"].isin(ids)]
        d = d.assign(group=pd.Series(labels, index=ids).reindex(d["conn_id"].to_numpy(dtype=np.uint64)).to_numpy())
        med = d.groupby(["group", "state"], observed=True)["seconds"].median().unstack("state")
        states = [s for _, ss in PANELS for s in ss if s in med.columns]
        a.groups[name] = {"table": table, "labels": top_labels,
                          "connections": [int((labels == g).sum()) for g in top_labels],
                          "lifetimes": {g: life[(labels == g) & ~np.isnan(life)] for g in top_labels},
                          "median_state_s": med.reindex(index=top_labels, columns=states)}


def _timeline(a: Aggregates, lc: pd.DataFrame, tr: pd.DataFrame, first: int, last: int) -> None:
    a.longest = lc[lc["duration_s"].notna()].nlargest(TIMELINE_ROWS, "duration_s")
    still = lc[lc["end_reason"] == "open"]
    a.still_open_total = len(still)
    a.still_open = still.sort_values("start", kind="stable").head(TIMELINE_ROWS)
    ids = pd.concat([a.longest["conn_id"], a.still_open["conn_id"]]).to_numpy(dtype=np.uint64)
    rows = tr[tr["conn_id"].isin(ids)]
    rows = rows.assign(_t=_ns(rows["time"])).sort_values(["conn_id", "_t"], kind="stable")
    mine = lc[lc["conn_id"].isin(ids).to_numpy() & lc["birth_seen"].to_numpy(dtype=bool)]
    born = dict(zip(mine["conn_id"].to_numpy(dtype=np.uint64).tolist(), _ns(mine["start"]).tolist()))
    for cid, g in rows.groupby("conn_id", sort=False):
        cid = int(cid)
        tt = g["_t"].to_numpy()
        new = g["newstate"].astype(str).to_numpy()
        segs = []
        if cid not in born or tt[0] > born[cid]:  # first seen in the middle of its life
            segs.append((0.0, (tt[0] - first) / 1e9, str(g["oldstate"].iloc[0]), True))
        for i in range(len(tt)):
            if new[i] == "CLOSE":
                break
            end = tt[i + 1] if i + 1 < len(tt) else last
            segs.append(((tt[i] - first) / 1e9, (end - first) / 1e9, new[i], False))
        a.segments[cid] = segs


# --- drawing ---------------------------------------------------------------------------

def _style():
    import matplotlib
    return matplotlib.rc_context({
        "svg.fonttype": "none",        # text stays text: smaller, searchable, selectable
        "svg.hashsalt": "tcplife-trace",  # the same figure gives the same file
        "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
        "legend.fontsize": 8, "legend.frameon": False,
    })


def _figure(w: float, h: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _seconds_label(v: float) -> str:
    if v == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g} s"


def _log_seconds_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _seconds_label(v)))


def _time_axis(ax, a: Aggregates) -> None:
    span = a.edges_s[-1] if len(a.edges_s) else 0
    ax.set_xlim(0, span if span > 0 else 1)
    ax.set_xlabel(f"seconds since {a.t0.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]} UTC "
                  f"(bins of {_seconds_label(a.bin_s)})")


def figures(a: Aggregates) -> dict:
    """name -> matplotlib Figure; none for a recording without connections."""
    if a.empty:
        return {}
    with _style():
        out = {"open_by_state": _fig_open(a), "new_and_ended": _fig_rates(a)}
        if a.hist:
            out["time_in_state"] = _fig_distributions(a)
        for name, g in a.groups.items():
            if g["labels"]:
                out[f"by_{name.replace(' ', '_')}"] = _fig_group(a, name)
        if a.segments:
            out["timeline"] = _fig_timeline(a)
    return out


def _fig_open(a: Aggregates):
    fig, ax = _figure(10, 3.4)
    ax = ax[0, 0]
    x = a.edges_s
    names = [s for s in STATE_COLORS if s in a.open_by_state]
    if names:
        ys = [np.r_[a.open_by_state[s], a.open_by_state[s][-1]] for s in names]
        ax.stackplot(x, ys, labels=names, colors=[STATE_COLORS[s] for s in names], step="post", alpha=0.9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("open connections per state (mean over each bin, stacked)")
    ax.set_ylabel("connections")
    _time_axis(ax, a)
    return fig


def _fig_rates(a: Aggregates):
    fig, axes = _figure(10, 4.2, 2, 1, sharex=True)
    x = a.edges_s
    top, bottom = axes[0, 0], axes[1, 0]
    top.fill_between(x, np.r_[a.new_per_s, a.new_per_s[-1:]], step="post", color="#0072B2", alpha=0.8,
                     label="new (born inside the recording)")
    top.set_title("new connections per second")
    top.set_ylabel("per second")
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    names = list(a.ended_per_s)
    if names:
        bottom.stackplot(x, [np.r_[a.ended_per_s[r], a.ended_per_s[r][-1]] for r in names], labels=names,
                         colors=[REASON_COLORS.get(r, "#999999") for r in names], step="post", alpha=0.9)
        bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom.set_title("ended per second, by how they ended (stacked)")
    bottom.set_ylabel("per second")
    _time_axis(bottom, a)
    return fig


def _fig_distributions(a: Aggregates):
    fig, axes = _figure(10, 1.9 * len(PANELS), len(PANELS), 1, sharex=True)
    e = a.hist_edges
    for (title, states), ax in zip(PANELS, axes[:, 0], strict=True):
        ax.set_xscale("log")
        drawn = False
        for s in states:
            if s not in a.hist:
                continue
            drawn = True
            ax.stairs(a.hist[s], e, color=STATE_COLORS[s], linewidth=1.5, label=f"{s} ({int(a.hist[s].sum())})")
            for q, style in zip(a.percentiles.get(s, ()), (":", "--", "-."), strict=False):
                ax.axvline(max(q, e[0]), color=STATE_COLORS[s], linestyle=style, linewidth=1)
        ax.set_title(title, loc="left")
        ax.set_ylabel("connections")
        if drawn:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.text(0.5, 0.5, "no connection spent time here", transform=ax.transAxes, ha="center",
                    va="center", color="#777777")
    _log_seconds_axis(axes[-1, 0].xaxis)
    axes[-1, 0].set_xlabel("time in the state (log scale); dotted p50, dashed p90, dash-dot p99")
    return fig


def _fig_group(a: Aggregates, name: str):
    g = a.groups[name]
    labels = g["labels"]
    # one group (a single process, say) still gets room for its axes and colour bar
    fig, axes = _figure(10, max(1.8, 0.9 + 0.32 * len(labels)), 1, 2, width_ratios=[1, 1.2])
    box, heat = axes[0, 0], axes[0, 1]
    data = [g["lifetimes"][x] for x in labels]
    pos = np.arange(len(labels))[::-1]
    have = [i for i, d in enumerate(data) if len(d)]
    if have:
        box.boxplot([np.maximum(data[i], 1e-9) for i in have], positions=pos[have], orientation="horizontal",
                    whis=(5, 95), showfliers=False, widths=0.6)
        box.set_xscale("log")
        _log_seconds_axis(box.xaxis)
    box.set_yticks(pos, [f"{x} ({n})" for x, n in zip(labels, g["connections"], strict=True)])
    box.set_ylim(-0.7, len(labels) - 0.3)
    box.set_title(f"lifetime per {name} (box 25-75%, whiskers 5-95%)", loc="left")
    med = g["median_state_s"]
    if med.shape[1]:
        v = med.to_numpy(dtype=float)
        logv = np.log10(np.where(v > 0, v, np.nan))
        mid = (np.nanmin(logv) + np.nanmax(logv)) / 2 if np.isfinite(logv).any() else 0.0
        heat.imshow(logv, aspect="auto", cmap="viridis")
        heat.set_xticks(range(med.shape[1]), list(med.columns), rotation=30, ha="right")
        heat.set_yticks(range(len(labels)), [""] * len(labels))
        heat.grid(False)
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if not np.isnan(v[i, j]):
                    heat.text(j, i, _seconds_label(v[i, j]), ha="center", va="center", fontsize=7,
                              color="black" if logv[i, j] > mid else "white")
    heat.set_title("median time in each state", loc="left")
    return fig


def _fig_timeline(a: Aggregates):
    """The longest connections each from its own start (their states show, however short
    they are against the recording), the still-open ones on the recording's clock."""
    panels = [(kind, [r for r in rows.itertuples() if int(r.conn_id) in a.segments])
              for kind, rows in (("longest", a.longest), ("open", a.still_open))]
    panels = [(kind, rows) for kind, rows in panels if rows]
    fig, axes = _figure(10, 0.8 + 0.9 * len(panels) + 0.22 * sum(len(r) for _, r in panels), len(panels), 1,
                        height_ratios=[len(r) + 2 for _, r in panels])
    seen = set()
    for (kind, rows), ax in zip(panels, axes[:, 0], strict=True):
        for i, r in enumerate(rows):
            y = len(rows) - 1 - i
            segs = a.segments[int(r.conn_id)]
            shift = segs[0][0] if kind == "longest" else 0.0
            for x0, x1, state, before in segs:
                ax.barh(y, x1 - x0, left=x0 - shift, height=0.7, color=STATE_COLORS.get(state, "#999999"),
                        hatch="//" if before else None, edgecolor="white" if before else None, linewidth=0)
                seen.add(state)
        ax.set_yticks(range(len(rows))[::-1], [_row_label(r, kind) for r in rows], fontsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        if kind == "longest":
            ax.set_title(f"the {len(rows)} longest connections, from each one's start", loc="left")
            ax.set_xlabel("seconds since the connection's start")
        else:
            ax.set_title(f"{'the oldest ' + str(len(rows)) + ' of ' if a.still_open_total > len(rows) else ''}"
                         f"{a.still_open_total} still open at the end (hatched: before the recording saw it)",
                         loc="left")
            _time_axis(ax, a)
    from matplotlib.patches import Patch
    axes[0, 0].legend(handles=[Patch(color=STATE_COLORS.get(x, "#999999"), label=x) for x in STATE_COLORS if x in seen],
                      loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _row_label(r, kind: str) -> str:
    def v(x):
        return "-" if x is None or x is pd.NA or (isinstance(x, float) and np.isnan(x)) else str(x)
    tail = "open" if kind == "open" else _seconds_label(float(r.duration_s))
    return f"#{r.conn_id} {v(r.comm)}/{v(r.pid)} {v(r.laddr)}:{v(r.lport)} > {v(r.raddr)}:{v(r.rport)} {tail}"


def svg(fig) -> str:
    """The figure as SVG markup, without the XML prolog (for inlining in a page)."""
    buf = io.StringIO()
    with _style():
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def scoped_svg(markup: str, prefix: str) -> str:
    """Ids made unique in a page holding several figures (matplotlib numbers them per figure)."""
    markup = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', markup)
    return re.sub(r'(url\(#|href="#)([^")]+)', lambda m: f"{m.group(1)}{prefix}{m.group(2)}", markup)


def write(figs: dict, directory: str, prefix: str = "") -> list[str]:
    """Each figure as DIR/<prefix><name>.png and .svg; the paths written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    with _style():
        for name, fig in figs.items():
            for ext in ("png", "svg"):
                path = os.path.join(directory, f"{prefix}{name}.{ext}")
                fig.savefig(path, format=ext, dpi=120, metadata={"Date": None} if ext == "svg" else None)
                written.append(path)
    return written
