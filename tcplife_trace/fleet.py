"""Recordings from many hosts, analysed per host file and put together, on pandas or Dask.

Each file is one partition: its lifecycles, state durations, leak findings, socket
snapshots (and, asked for, transitions) are computed on its own (listeners, clocks and
namespaces are per host), connection ids get the file's index in their top 16 bits (as
`load()` does for several files), and a `host` column comes from the file's header. The
per-state summary is then computed over all hosts. Every frame has the declared schema
of tcplife_trace.frames.schema, a `host` column first. The pandas engine runs the partitions one after the other in this
process; the Dask engine runs them as a Dask DataFrame on a local cluster (or on
`scheduler`), and its results are the same frames.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd

from .frames import schema as frame_schema
from .frames.connections import summary
from .recording import Recording, RecordingError

ENGINES = ("pandas", "dask")
RECORDING_SUFFIXES = (".arrow", ".tlt")
FRAMES = ("lifecycles", "state_durations", "leaks", "snapshots")
ALL_FRAMES = (*FRAMES, "transitions")  # the transitions (10 rows a connection) only when asked for
_TAG_SHIFT = 48


def expand(inputs) -> list[str]:
    """Files, directories (searched recursively for *.arrow) and globs -> sorted file list."""
    out: list[str] = []
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)

    def unreadable(e: OSError):  # os.walk skips what it cannot list: say it instead
        raise RecordingError(f"{e.filename}: cannot read the directory ({e.strerror})")
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            for root, _dirs, files in os.walk(item, onerror=unreadable):
                out += [os.path.join(root, f) for f in files if f.endswith(RECORDING_SUFFIXES)]
        elif any(c in item for c in "*?["):
            matched = glob.glob(item, recursive=True)
            if not matched:
                raise RecordingError(f"{item}: no file matches")
            out += matched
        else:
            out.append(item)
    if not out:
        raise RecordingError("no recording found in " + ", ".join(map(str, inputs)))
    return sorted(dict.fromkeys(out))


def hosts(paths: list[str], text_import=None) -> set[str]:
    """The hosts of the files, as host_label names them (reads only the headers; an
    unreadable one is a RecordingError naming the file)."""
    from .recording import read_header
    return {host_label(read_header(p, text_import), p) for p in paths}


def host_label(head: dict, path: str) -> str:
    """The host a file's header names; a capture of unknown host (a tcpstates text imported
    without --host) is a host of its own, named after the file."""
    host = head.get("host")
    return str(host) if host else f"unknown ({os.path.basename(path)})"


def text(out: dict) -> str:
    """The fleet report: per host, then the per-state summary, then findings by host."""
    lc, lk = out["lifecycles"], out["leaks"]
    per_host = pd.DataFrame({
        "connections": lc.groupby("host", observed=True).size(),
        "open": lc[lc["end_reason"] == "open"].groupby("host", observed=True).size(),
        "refused": lc[lc["end_reason"] == "refused"].groupby("host", observed=True).size(),
        "reset": lc[lc["end_reason"] == "reset_by_peer"].groupby("host", observed=True).size(),
        "findings": lk.groupby("host", observed=True).size(),
    }).fillna(0).astype(int)
    lines = [f"{len(out['files'])} recordings from {len(per_host)} hosts, {len(lc)} connections"]
    lines += [f"  {path}: recorded filters {said}" for path, said in out.get("recorded_filters", {}).items()
              if said != "none"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        lines += ["", per_host.to_string()]
        if len(out["summary"]):
            lines += ["", "time in state over all hosts (seconds; count = connections)",
                      out["summary"].reset_index().to_string(index=False, float_format=lambda v: f"{v:.6f}")]
    lines.append(f"\nfindings ({len(lk)})" + ("" if len(lk) else ": none"))
    for r in lk.itertuples():
        lines.append(f"  {r.host}: {r.severity.upper()} {r.kind}: {r.summary}")
    return "\n".join(lines)


def host_frames(index: int, path: str, thresholds=None, filters=None, since=None, until=None,
                names=FRAMES, text_import=None, all_recorded: bool = False) -> dict:
    """One host file's frames (`names`), ids tagged with the file index, a `host` column first:
    what the filters the file was recorded with keep (unless all_recorded), and `filters`."""
    from .analysis_report import applied, frames
    from tcplife_trace.probes.filters import Filters
    rec = Recording(path, text_import=text_import, all_recorded=all_recorded)
    f = frames(rec, filters or Filters(), since, until, thresholds)
    host = host_label(rec.header, path)
    tag = np.uint64(index << _TAG_SHIFT)
    out = {}
    for name in names:
        df = f[name].reset_index(drop=True)
        if "conn_id" in df and index:
            ids = df["conn_id"].to_numpy(dtype=np.uint64, na_value=0)
            df["conn_id"] = pd.Series(np.where(ids == 0, ids, ids + tag)).astype(df["conn_id"].dtype)
        if name == "leaks":
            df = df.assign(evidence=df["evidence"].map(_json).astype(object))
        if name in _SORT:
            df = df.sort_values(_SORT[name], kind="stable").reset_index(drop=True)
        df.insert(0, "host", pd.Categorical([host] * len(df)))
        for col, dtype in df.dtypes.items():  # one categories dtype everywhere, so partitions concatenate
            if isinstance(dtype, pd.CategoricalDtype) and dtype.categories.dtype != "str":
                cats = pd.Index([str(c) for c in dtype.categories], dtype="str")
                df[col] = pd.Categorical.from_codes(df[col].cat.codes, categories=cats, ordered=dtype.ordered)
        out[name] = df
    out["warnings"] = rec.warnings
    out["recorded_filters"] = applied(rec)[0]
    return out


def _json(value) -> str:
    import json
    return json.dumps(value, sort_keys=True)


def _categorical_like(name: str, meta: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Columns categorical in the per-host frames are categorical in the whole, whatever
    concatenation did to them: closed vocabularies keep theirs, the others (addresses,
    commands, paths, hosts) get the sorted values present."""
    for col, dtype in meta.dtypes.items():
        if dtype == object and df[col].dtype != object:  # Dask may have made strings of them
            df[col] = df[col].astype(object).where(df[col].notna(), None)
        if not isinstance(dtype, pd.CategoricalDtype):
            continue
        if not isinstance(df[col].dtype, pd.CategoricalDtype):
            df[col] = pd.Categorical(df[col])
        if isinstance(dict(frame_schema.FRAMES[name]).get(col), frame_schema.Vocab):
            cats = list(dtype.categories)
        else:
            cats = sorted(df[col].cat.remove_unused_categories().cat.categories, key=str)
        df[col] = df[col].cat.set_categories(pd.Index(cats, dtype="str"), ordered=dtype.ordered)
    return df


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenation that keeps categoricals categorical (their categories united)."""
    from pandas.api.types import union_categoricals
    whole = pd.concat(frames, ignore_index=True)
    for col, dtype in frames[0].dtypes.items():
        if isinstance(dtype, pd.CategoricalDtype) and not isinstance(whole[col].dtype, pd.CategoricalDtype):
            whole[col] = union_categoricals([f[col] for f in frames], ignore_order=True)
    return whole


# each host's frames are sorted by these; hosts concatenate in file order, which is conn_id order
# (transitions and snapshots stay in time order)
_SORT = {"lifecycles": ["conn_id"], "state_durations": ["conn_id", "state"], "leaks": ["kind", "summary"]}


def _finish(meta: dict[str, pd.DataFrame], whole: dict[str, pd.DataFrame]) -> dict:
    out = {name: frame_schema.conform(name, _categorical_like(name, meta[name], df.reset_index(drop=True)),
                                      host=True)
           for name, df in whole.items()}
    out["summary"] = summary(out["state_durations"][["state", "seconds"]])
    return out


def analyze(inputs, engine: str = "pandas", *, scheduler: str | None = None, thresholds=None,
            filters=None, since=None, until=None, workers: int | None = None, transitions: bool = False,
            text_import=None, all_recorded: bool = False, progress=None) -> dict:
    """{"lifecycles", "state_durations", "leaks", "snapshots", "summary", "files", "warnings",
    "recorded_filters"} over many host recordings (and "transitions" with transitions=True).
    Each file shows what the filters it was recorded with keep (as its live session did;
    all_recorded: everything that reached it), narrowed by `filters`; recorded_filters says,
    per file, which were applied. engine="dask" runs on a local Dask cluster, or the one at
    `scheduler`. text_import: a tcpstates_import.TextImport (date, host, time zone of
    tcpstates text captures). progress(done, total): called as host files (pandas) or
    partitions (dask) are done, e.g. progress.bar's update."""
    paths = expand(inputs)
    from .recording import check, read_header, recorded_filters
    for p in paths:  # here, before any worker: a bad file is one line naming it, not a remote traceback
        check(p)
        if not all_recorded:
            recorded_filters(read_header(p, text_import), p)
    names = ALL_FRAMES if transitions else FRAMES
    args = {"thresholds": thresholds, "filters": filters, "since": since, "until": until, "names": names,
            "text_import": text_import, "all_recorded": all_recorded}
    if engine == "pandas":
        results = []
        for i, p in enumerate(paths):
            results.append(host_frames(i, p, **args))
            if progress:
                progress(i + 1, len(paths))
        parts = {n: [r[n] for r in results] for n in names}
        warnings = [w for r in results for w in r["warnings"]]
        said = [r["recorded_filters"] for r in results]
    elif engine == "dask":
        with _client(scheduler, workers) as client:
            ddfs, warn_futures, said_futures = dask_frames(client, paths, **args)
            parts = _computed(client, ddfs, names, progress)
            warnings = [w for ws in client.gather(warn_futures) for w in ws]
            said = client.gather(said_futures)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    out = _finish({n: parts[n][0].iloc[:0] for n in names}, {n: _concat(parts[n]) for n in names})
    out["files"] = paths
    out["warnings"] = warnings
    out["recorded_filters"] = dict(zip(paths, said, strict=True))
    return out


def _computed(client, ddfs: dict, names, progress=None) -> dict:
    """Each frame's partitions computed on the cluster (progress(done, total) as they finish)."""
    futures = {n: client.compute(ddfs[n].to_delayed()) for n in names}
    if progress:
        from distributed import as_completed
        every = [f for fs in futures.values() for f in fs]
        for done, _ in enumerate(as_completed(every), 1):
            progress(done, len(every))
    return {n: client.gather(fs) for n, fs in futures.items()}


def dask_frames(client, paths: list[str], **args) -> tuple[dict, list, list]:
    """Lazy Dask DataFrames of the per-host frames (args["names"], FRAMES by default), one
    partition per host file (for use in a notebook with your own client); and futures of
    each file's warnings and of what it says of its recorded filters."""
    import dask.dataframe as dd
    futures = client.map(host_frames, range(len(paths)), paths, pure=False, **args)
    ddfs = {}
    for name in args.get("names", FRAMES):
        pieces = [client.submit(_pick, f, name, pure=False) for f in futures]
        meta = client.submit(_empty, pieces[0], pure=False).result()
        ddfs[name] = dd.from_delayed(pieces, meta=meta, verify_meta=False)
    return (ddfs, [client.submit(_pick, f, "warnings", pure=False) for f in futures],
            [client.submit(_pick, f, "recorded_filters", pure=False) for f in futures])


SCHEDULER_TIMEOUT_S = 5


class _client:
    """A Dask client: on `scheduler`, or on a local cluster of worker processes made for the call."""

    def __init__(self, scheduler: str | None, workers: int | None):
        self.scheduler, self.workers = scheduler, workers
        self.cluster = None

    def __enter__(self):
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError:
            raise RecordingError("--engine dask needs Dask: pip install 'tcplife-trace[fleet]' "
                                 "(dask[dataframe] and distributed)") from None
        dask.config.set({"dataframe.convert-string": False})  # keep the pandas engine's dtypes
        # Dask's nanny makes glibc give memory back at 64 KiB, which costs our large short-lived
        # column arrays about 1.6x in run time; a worker here lives only as long as the analysis
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
        os.environ["DASK_DATAFRAME__CONVERT_STRING"] = "False"  # in local workers too
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # no INFO/WARNING chatter on stderr
        import logging
        logging.getLogger("distributed").setLevel(logging.ERROR)
        if self.scheduler:
            try:  # a wrong address is said in one line after a few seconds, not a 30 s hang and a traceback
                self.client = Client(self.scheduler, timeout=SCHEDULER_TIMEOUT_S)
            except (OSError, ValueError, TimeoutError) as e:
                raise RecordingError(f"cannot use the Dask scheduler {self.scheduler}: {str(e).splitlines()[0]}; "
                                     "check --scheduler (e.g. tcp://HOST:8786) or leave it out for a local "
                                     "cluster") from None
        else:
            self.cluster = LocalCluster(n_workers=self.workers or os.cpu_count() or 1, threads_per_worker=1,
                                        processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _pick(result: dict, name: str):
    return result[name]


def _empty(df: pd.DataFrame) -> pd.DataFrame:
    return df.iloc[:0]
