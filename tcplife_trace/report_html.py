"""The incident report as one self-contained HTML page (`analyze --html`), and its plots as
files (`analyze --plots`).

Everything is in the page: the plots are inline SVG drawn by matplotlib (report_plots), the
style and the few lines of script (sortable tables, the host selector) are inline too, so the
file opens offline, attached to a ticket, with nothing fetched. It is built from the frames
analyze computes (analysis_report.frames()); no TCP rule is decided here.

    from tcplife_trace import load, report_html
    rec = load("incident.arrow")
    open("report.html", "w").write(report_html.render(rec))
    report_html.plots(rec, "plots/")
"""
from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Iterable

import numpy as np
import pandas as pd

from . import report_plots
from .recording import Recording

TABLE_ROWS = 50        # rows of a grouping table (the page says how many there are)
FINDINGS_ROWS = 200    # findings listed (the rest summed up by kind)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d3de;font-size:13px}header select{font-size:14px;margin-left:8px}
main{padding:8px 24px 40px;max-width:1200px}section.host>h2{border-bottom:2px solid #1f2d3d;padding-bottom:4px}
h3{margin:28px 0 8px}figure{margin:8px 0 18px;background:#fff;border:1px solid #ddd;padding:8px}
figure svg{width:100%;height:auto;display:block}figcaption{color:#555;font-size:12px;margin-top:4px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}.card{background:#fff;border:1px solid #ddd;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:22px}.card span{color:#555;font-size:12px}.card.bad b{color:#b00020}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#eef1f4;user-select:none}table.sortable th:after{content:" \\2195";color:#999}
th[data-dir=asc]:after{content:" \\2191"!important;color:#000!important}th[data-dir=desc]:after{content:" \\2193"!important;color:#000!important}
.sev-critical{color:#b00020;font-weight:bold}.sev-warning{color:#a05a00;font-weight:bold}.sev-info{color:#555}
.note{color:#555;font-size:12px}.empty{font-size:18px;background:#fff3cd;border:1px solid #e0c97a;padding:14px}
code,.mono{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}details{margin:4px 0}
"""

_JS = """
(function(){
function key(td){var v=td.getAttribute('data-v');if(v!==null){var f=parseFloat(v);return isNaN(f)?-Infinity:f;}return td.textContent.trim();}
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
var table=th.closest('table'),body=table.tBodies[0],i=th.cellIndex,dir=th.getAttribute('data-dir')==='desc'?'asc':'desc';
table.querySelectorAll('th').forEach(function(h){h.removeAttribute('data-dir');});th.setAttribute('data-dir',dir);
var rows=Array.prototype.slice.call(body.rows);rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
var c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y),undefined,{numeric:true});return dir==='asc'?c:-c;});
rows.forEach(function(r){body.appendChild(r);});});});
var sel=document.getElementById('host');if(sel){var show=function(){document.querySelectorAll('section.host').forEach(function(s){s.hidden=(sel.value!=='*'&&s.id!==sel.value);});};
sel.addEventListener('change',show);show();}
})();
"""


# --- formatting -----------------------------------------------------------------------

def _e(value) -> str:
    return html.escape("-" if _missing(value) else str(value))


def _missing(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def seconds(v) -> str:
    """A duration as people read it: 4 significant digits and a unit."""
    if _missing(v):
        return "-"
    v = float(v)
    if v == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(v) >= scale:
            return f"{v / scale:,.1f} {unit}" if abs(v / scale) >= 1000 else f"{v / scale:.4g} {unit}"
    return f"{v / 1e-9:.4g} ns"


def _num(v, shown: str | None = None, cls: str = "n") -> str:
    """A table cell holding a number: shown formatted, its exact value in data-v (sorting, tests)."""
    if _missing(v):
        return f'<td class="{cls}" data-v="">-</td>'
    exact = repr(float(v)) if isinstance(v, (float, np.floating)) else str(int(v))
    return f'<td class="{cls}" data-v="{exact}">{html.escape(shown if shown is not None else f"{v:,}")}</td>'


def _time(v) -> str:
    if _missing(v):
        return "-"
    return pd.Timestamp(v).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _table(head: list[str], rows: Iterable[str], cls: str = "sortable", attrs: str = "") -> str:
    return (f'<table class="{cls}"{attrs}><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _card(label: str, value, key: str, bad: bool = False) -> str:
    return (f'<div class="card{" bad" if bad else ""}"><b data-k="{key}" data-v="{value}">{value:,}</b>'
            f"<span>{html.escape(label)}</span></div>")


# --- the page -------------------------------------------------------------------------

def render(rec: Recording, frames: dict | None = None, *, filters=None, since=None, until=None,
           thresholds=None, title: str | None = None, plots_dir: str | None = None,
           written: list | None = None) -> str:
    """The report page of one recording (one host: one or more of its files). frames: those
    analysis_report.frames() made, if at hand (else computed here with the filters given).
    plots_dir: also write the same plots there as PNG and SVG (their paths appended to
    `written`), drawn once for both."""
    if frames is None:
        frames = _frames(rec, filters, since, until, thresholds)
    host = _host(rec)
    return page([section(rec, frames, host, filters=filters, since=since, until=until, plots_dir=plots_dir,
                         written=written)],
                title or f"tcplife-trace report: {host}")


def render_paths(paths: list[str], *, filters=None, since=None, until=None, thresholds=None,
                 title: str | None = None, text_import=None, plots_dir: str | None = None,
                 written: list | None = None, all_recorded: bool = False) -> str:
    """The report of recordings from one or many hosts: one section per host (its files
    analysed as one), a host selector at the top. Hosts are loaded one after the other.
    plots_dir: also each host's plots, as <host>-<plot>.png/.svg when there are several."""
    sections = []
    hosts = by_host(paths, text_import)
    for host, files in hosts.items():
        rec = _load(files, text_import, all_recorded)
        f = _frames(rec, filters, since, until, thresholds)
        sections.append(section(rec, f, host, filters=filters, since=since, until=until, plots_dir=plots_dir,
                                written=written, prefix=_prefix(host) if len(hosts) > 1 else ""))
        del rec, f
    return page(sections, title or f"tcplife-trace report: {len(sections)} host{'s' if len(sections) > 1 else ''}")


def by_host(paths: list[str], text_import=None) -> dict[str, list[str]]:
    """Files grouped by the host that recorded them (fleet's names for hosts)."""
    from . import fleet
    out: dict[str, list[str]] = {}
    for p in paths:
        names = fleet.hosts([p], text_import) if text_import is not None else fleet.hosts([p])
        out.setdefault(next(iter(names)), []).append(p)
    return out


def _load(files, text_import, all_recorded: bool = False):
    """all_recorded: every connection the files hold, not only what their recorded filters keep."""
    return Recording(files, text_import=text_import, all_recorded=all_recorded)


def _frames(rec, filters, since, until, thresholds) -> dict:
    from .analysis_report import frames
    from tcplife_trace.probes.filters import Filters
    return frames(rec, filters or Filters(), since, until, thresholds)


def _host(rec: Recording) -> str:
    h = rec.header
    if h.get("imported_from"):
        return str(h.get("host") or f"unknown ({os.path.basename(str(h.get('source', '')))})")
    return str(h.get("host") or "unknown host")


def page(sections: list[str], title: str) -> str:
    """Sections (section()) into one page; with more than one, a host selector."""
    ids = [s.split('id="', 1)[1].split('"', 1)[0] for s in sections]
    names = [s.split('data-host="', 1)[1].split('"', 1)[0] for s in sections]
    selector = ""
    if len(sections) > 1:
        selector = ('<label>host <select id="host"><option value="*">all hosts</option>'
                    + "".join(f'<option value="{i}">{n}</option>' for i, n in zip(ids, names, strict=True))
                    + "</select></label>")
    generated = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    from . import __version__
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>made by tcplife-trace {html.escape(__version__)} on "
            f"{generated}; one self-contained file (nothing is fetched when it is opened). {selector}</p></header>"
            "<main>" + "".join(sections) + f"</main><script>{_JS}</script></body></html>\n")


def _prefix(host: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in host) + "-"


def section(rec: Recording, frames: dict, host: str, *, filters=None, since=None, until=None,
            plots_dir: str | None = None, written: list | None = None, prefix: str = "") -> str:
    """One host's part of the page (and its plots as files into plots_dir)."""
    from .frames.leaks import stopped_at
    sid = "host-" + "".join(c if c.isalnum() else "-" for c in host)
    lc, tr = frames["lifecycles"], frames["transitions"]
    out = [f'<section class="host" id="{html.escape(sid)}" data-host="{html.escape(host)}">'
           f"<h2>{html.escape(host)}</h2>"]
    out.append(_overview(rec, frames))
    if len(lc) == 0:
        out.append('<p class="empty" data-k="no-connections">No connections in this recording'
                   + (" within the filters and time window given" if _narrowed(filters, since, until) else "")
                   + f": {rec.events.num_rows:,} events, none of them a TCP connection's. Nothing to plot; "
                   "the recording's metadata and losses follow.</p>")
    else:
        stopped = stopped_at(rec.ends)
        a = report_plots.aggregates(frames, stopped)
        figs = report_plots.figures(a)
        if plots_dir:
            paths = report_plots.write(figs, plots_dir, prefix)
            if written is not None:
                written += paths
        out.append(_over_time(a, figs, sid))
        out.append(_time_in_state(frames, a, figs, sid))
        out.append(_groups(lc, a, figs, sid))
        out.append(_timeline(lc, a, figs, sid))
        for fig in figs.values():
            fig.clear()
    out.append(_findings(frames["leaks"]))
    out.append(_losses_and_metadata(rec, frames, filters, since, until))
    out.append("</section>")
    return "".join(out)


def _narrowed(filters, since, until) -> bool:
    return bool(since is not None or until is not None or (filters is not None and filters.describe() != "none"))


def _overview(rec: Recording, frames: dict) -> str:
    lc, tr, lk = frames["lifecycles"], frames["transitions"], frames["leaks"]
    lost = sum(int(e.get("events_lost", 0) or 0) for e in rec.ends if e)
    still = int((lc["end_reason"] == "open").sum())
    ends = lc["end_reason"].value_counts()
    ends = ends[ends > 0]
    cards = (_card("connections", len(lc), "connections") + _card("transitions", len(tr), "transitions")
             + _card("still open at the end", still, "still_open")
             + _card("findings", len(lk), "findings", bad=len(lk) > 0)
             + _card("events lost in the kernel", lost, "events_lost", bad=lost > 0))
    span = ""
    if len(tr):
        t0, t1 = tr["time"].min(), tr["time"].max()
        span = f"<p>from {_time(t0)} to {_time(t1)} ({seconds((t1 - t0).total_seconds())})</p>"
    rows = [f'<tr data-reason="{_e(r)}"><td>{_e(r)}</td>{_num(int(n))}</tr>' for r, n in ends.items()]
    ended = ("<h3>How they ended</h3>" + _table(["end reason", "connections"], rows, attrs=' id="end-reasons"')
             if rows else "")
    return f'<div class="cards">{cards}</div>{span}{ended}'


def _figure(figs: dict, name: str, sid: str, caption: str) -> str:
    if name not in figs:
        return ""
    markup = report_plots.scoped_svg(report_plots.svg(figs[name]), f"{sid}-{name}-")
    return f'<figure class="plot" data-plot="{name}">{markup}<figcaption>{caption}</figcaption></figure>'


def _over_time(a, figs, sid) -> str:
    bins = len(a.edges_s) - 1
    return ("<h3>Over time</h3>"
            + _figure(figs, "open_by_state", sid,
                      f"Connections open in each state, the mean over each of {bins:,} bins of "
                      f"{seconds(a.bin_s)} (the whole span is cut into at most {report_plots.MAX_BINS} bins, "
                      "whatever its length). TIME_WAIT is not drawn: the kernel reports no transition into "
                      "it (the socket snapshots hold it).")
            + _figure(figs, "new_and_ended", sid,
                      "Connections born and ended per second in the same bins; the ends stacked by how "
                      "they ended (sockets open before the recording are not counted as new)."))


def _time_in_state(frames, a, figs, sid) -> str:
    summ = frames["summary"]
    rows = []
    for r in summ.itertuples():
        rows.append(f'<tr data-state="{_e(r.state)}"><td>{_e(r.state)}</td>{_num(int(r.count))}'
                    + "".join(_num(float(getattr(r, c)), seconds(getattr(r, c))) for c in
                              ("p50_s", "p90_s", "p99_s", "max_s")) + "</tr>")
    zero = {s: n for s, n in a.zero_s.items() if n}
    note = (f" Durations of 0 (below the clock's resolution) are counted in the first bin: "
            + ", ".join(f"{s} {n:,}" for s, n in zero.items()) + ".") if zero else ""
    return ("<h3>Time in each state</h3>"
            + _figure(figs, "time_in_state", sid,
                      "How long connections stayed in each state (log axis, "
                      f"{report_plots.PER_DECADE} bins per power of ten); the lines are the p50, p90 and p99 "
                      "of the table below." + note)
            + _table(["state", "connections", "p50", "p90", "p99", "max"], rows, attrs=' id="time-in-state"')
            + '<p class="note">count: connections that spent time in the state (a state visited twice counts '
            "once, its times summed); time in a state whose start was not recorded is not counted.</p>")


def _groups(lc, a, figs, sid) -> str:
    out = ["<h3>Per peer, local port and process</h3>"]
    for name, keys in report_plots.GROUPINGS:
        fig_name = f"by_{name.replace(' ', '_')}"
        out.append(_figure(figs, fig_name, sid,
                           f"The {report_plots.TOP_GROUPS} {name}{'es' if name.endswith('s') else 's'} with the most "
                           "connections (listeners aside), fewer if there are fewer: "
                           "the spread of their lifetimes (log axis), and the median time in each state."))
        g = a.groups[name]["table"].reset_index()
        reason_cols = [c for c in g.columns if c not in (*keys, "connections", "open", "median_s", "max_s")]
        head = [*keys, "connections", "open", "median lifetime", "longest", *reason_cols]
        rows = []
        for r in g.head(TABLE_ROWS).itertuples(index=False):
            d = r._asdict()
            rows.append("<tr>" + "".join(f"<td>{_e(d[k])}</td>" for k in keys) + _num(int(d["connections"]))
                        + _num(int(d["open"])) + _num(float(d["median_s"]), seconds(d["median_s"]))
                        + _num(float(d["max_s"]), seconds(d["max_s"]))
                        + "".join(_num(int(d[c])) for c in reason_cols) + "</tr>")
        more = (f'<p class="note">the {TABLE_ROWS} with the most connections of {len(g):,}; all of '
                "them: --export DIR, or rec.by_peer() / by_local_port() / by_process()</p>") if len(g) > TABLE_ROWS else ""
        plural = f"{name}{'es' if name.endswith('s') else 's'}" if len(g) != 1 else name
        out.append(f"<details><summary>the table: {len(g):,} {plural}</summary>"
                   + _table(head, rows, attrs=f' id="by-{name.replace(" ", "-")}"') + more + "</details>")
    return "".join(out)


_CONN_COLS = ("conn_id", "role", "pid", "comm", "laddr", "lport", "raddr", "rport")


def _conn_rows(df: pd.DataFrame, last: str) -> list[str]:
    rows = []
    for r in df.itertuples(index=False):
        d = r._asdict()
        cells = "".join(f"<td>{_e(d[c])}</td>" for c in _CONN_COLS)
        if last == "duration":
            cells += _num(float(d["duration_s"]), seconds(d["duration_s"])) + f"<td>{_e(d['end_reason'])}</td>"
        else:
            born = "" if d["birth_seen"] else " (first seen)"
            cells += f"<td>{_time(d['start'])}{born}</td><td>{_e(d['path'])}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return rows


def _timeline(lc, a, figs, sid) -> str:
    n_open = a.still_open_total
    out = ["<h3>Longest and still-open connections</h3>",
           _figure(figs, "timeline", sid,
                   f"State by state, the {len(a.longest)} longest connections (each from its own start)"
                   + (f" and the {len(a.still_open)} oldest of the {n_open:,} still open at the end" if n_open else "")
                   + f", at most {report_plots.TIMELINE_ROWS} of each"
                   + ("" if n_open else "; none was still open at the end") + ".")]
    if len(a.longest):
        out.append(_table([*_CONN_COLS, "lifetime", "end reason"], _conn_rows(a.longest, "duration"),
                          attrs=' id="longest"'))
    if n_open:
        out.append(f"<p>{n_open:,} still open at the end of the recording"
                   + (f", the oldest {len(a.still_open)} listed" if n_open > len(a.still_open) else "") + ":</p>")
        out.append(_table([*_CONN_COLS, "since", "states"], _conn_rows(a.still_open, "open"), attrs=' id="still-open"'))
    return "".join(out)


def _evidence(ev) -> str:
    if isinstance(ev, str):
        try:
            ev = json.loads(ev)
        except ValueError:
            return _e(ev)
    if isinstance(ev, dict):
        return ", ".join(f"{html.escape(str(k))}={html.escape(json.dumps(v, default=str))}" for k, v in ev.items())
    return _e(ev)


def _samples(s) -> str:
    """The sockets a finding names (the first ten)."""
    if isinstance(s, str):
        return _e(s)
    if not isinstance(s, (list, tuple, np.ndarray)) or len(s) == 0:
        return ""
    return "<br>".join(html.escape(x if isinstance(x, str) else json.dumps(x, default=str)) for x in list(s)[:10])


def _findings(lk: pd.DataFrame) -> str:
    out = [f"<h3>Findings ({len(lk):,})</h3>"]
    if len(lk) == 0:
        out.append("<p>None: no leak, pile, storm or churn that the detectors look for.</p>")
        return "".join(out)
    rows = []
    order = {"critical": 2, "warning": 1, "info": 0}
    for r in lk.head(FINDINGS_ROWS).itertuples(index=False):
        sev = str(r.severity)
        rows.append(f'<tr data-kind="{_e(r.kind)}"><td class="sev-{_e(sev)}" data-v="{order.get(sev, -1)}">{_e(sev)}</td>'
                    f"<td>{_e(r.kind)}</td>{_num(r.count)}<td>{_e(r.summary)}</td>"
                    f'<td class="mono">{_evidence(r.evidence)}</td><td class="mono">{_samples(r.samples)}</td>'
                    f"<td>{_e(r.advice)}</td></tr>")
    out.append(_table(["severity", "kind", "count", "what", "evidence", "sockets", "advice"], rows,
                      attrs=' id="findings"'))
    if len(lk) > FINDINGS_ROWS:
        rest = lk.iloc[FINDINGS_ROWS:].groupby(["kind", "severity"], observed=True).size()
        out.append(f'<p class="note">... and {len(lk) - FINDINGS_ROWS:,} more: '
                   + html.escape(", ".join(f"{n} {k} ({s})" for (k, s), n in rest.items()))
                   + "; all of them: --export DIR (leaks.parquet)</p>")
    return "".join(out)


_LOSS_KEYS = ("events_received", "events_emitted_by_kernel", "events_lost", "events_lost_by_kind",
              "events_via_overflow", "overflow_out_of_order", "conn_map_full", "evictions", "sequence_gaps",
              "ring_peak_fill", "ring_discarded", "unmatched_errors")
_HEAD_KEYS = ("host", "kernel", "tool_version", "schema_version", "filters", "start_wall", "imported_from", "source")


def _losses_and_metadata(rec: Recording, frames: dict, filters, since, until) -> str:
    out = ["<h3>Losses</h3>"]
    rows = []
    for i, (h, e) in enumerate(zip(rec.headers, rec.ends, strict=True)):
        src = rec.paths[i] if i < len(rec.paths) else "in memory"
        if h.get("imported_from"):
            rows.append(f"<tr><td>{_e(src)}</td><td colspan=\"2\">imported from {_e(h['imported_from'])}: the "
                        "capture says nothing of its losses</td></tr>")
            continue
        if not e:
            rows.append(f'<tr><td>{_e(src)}</td><td colspan="2" class="sev-warning" data-k="not-closed">not closed '
                        "cleanly (cut by a crash or SIGKILL): it holds what was flushed; its exit summary, with "
                        "the losses, is missing</td></tr>")
            continue
        for k in _LOSS_KEYS:
            if k in e:
                v = e[k]
                shown = json.dumps(v) if isinstance(v, dict) else f"{v:,}" if isinstance(v, int) else str(v)
                bad = k in ("events_lost", "conn_map_full", "evictions") and v
                rows.append(f'<tr data-loss="{k}"><td>{_e(src)}</td><td>{k}</td>'
                            f'<td class="n{" sev-critical" if bad else ""}">{html.escape(shown)}</td></tr>')
    out.append(_table(["recording", "counter", "value"], rows, cls="plain", attrs=' id="losses"'))
    if rec.warnings:
        out.append("<p>Warnings while reading:</p><ul>" + "".join(f"<li>{_e(w)}</li>" for w in rec.warnings) + "</ul>")
    out.append("<h3>The recording</h3>")
    rows = []
    from .analysis_report import applied
    for i, (h, said) in enumerate(zip(rec.headers, applied(rec), strict=True)):
        src = rec.paths[i] if i < len(rec.paths) else "in memory"
        for k in _HEAD_KEYS:
            if k in h:
                v = h[k]
                if k == "start_wall":
                    v = _time(pd.Timestamp(v, unit="s", tz="UTC"))
                rows.append(f"<tr><td>{_e(src)}</td><td>{k}</td><td>{_e(v)}</td></tr>")
        rows.append(f'<tr data-k="filters-applied"><td>{_e(src)}</td><td>recorded filters</td><td>{_e(said)}</td></tr>')
        e = rec.ends[i] if i < len(rec.ends) else None
        if e and e.get("stop_wall"):
            rows.append(f"<tr><td>{_e(src)}</td><td>stop_wall</td><td>{_time(pd.Timestamp(e['stop_wall'], unit='s', tz='UTC'))}</td></tr>")
    out.append(_table(["recording", "field", "value"], rows, cls="plain", attrs=' id="metadata"'))
    snaps = rec.snapshot_list
    if snaps:
        t, meta, socks = snaps[-1]
        from .frames.leaks import snapshot_kind
        kind = snapshot_kind(meta)
        counts = socks["state"].value_counts()
        out.append(f"<p>{len(snaps)} socket snapshots; the last ({kind}) at "
                   f"{_time(pd.Timestamp(t, unit='ns', tz='UTC'))}: "
                   + (_e(", ".join(f"{k} {v}" for k, v in counts.items() if v)) or "no sockets") + "</p>")
    else:
        out.append("<p>No socket snapshots in this recording (made without --poll-interval): the findings come "
                   "from the transitions alone.</p>")
    asked = []
    if filters is not None and filters.describe() != "none":
        asked.append(f"filters {filters.describe()}")
    if since is not None:
        asked.append(f"since {_time(since)}")
    if until is not None:
        asked.append(f"until {_time(until)}")
    if asked:
        out.append(f"<p>This report covers only: {_e('; '.join(asked))}.</p>")
    return "".join(out)


# --- plots as files -------------------------------------------------------------------

def plots(rec: Recording, directory: str, frames: dict | None = None, *, filters=None, since=None, until=None,
          thresholds=None, prefix: str = "") -> list[str]:
    """The report's plots as DIR/<name>.png and .svg; the paths written (none for a recording
    without connections)."""
    from .frames.leaks import stopped_at
    if frames is None:
        frames = _frames(rec, filters, since, until, thresholds)
    figs = report_plots.figures(report_plots.aggregates(frames, stopped_at(rec.ends)))
    return report_plots.write(figs, directory, prefix)


def plots_paths(paths: list[str], directory: str, *, filters=None, since=None, until=None, thresholds=None,
                text_import=None, all_recorded: bool = False) -> list[str]:
    """plots() per host, each file named after its host when there are several."""
    hosts = by_host(paths, text_import)
    written = []
    for host, files in hosts.items():
        prefix = "" if len(hosts) == 1 else _prefix(host)
        written += plots(_load(files, text_import, all_recorded), directory, filters=filters, since=since, until=until,
                         thresholds=thresholds, prefix=prefix)
    return written


def write(path: str, page_html: str) -> None:
    """The page to PATH, mode 0600 like the recording (it holds the same addresses and process
    names), written whole under a temporary name first."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page_html)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
