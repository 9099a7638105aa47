"""Progress on long work (analyze, fleet, doctor's wait): a rich bar on stderr when stderr is a
terminal, nothing at all otherwise (a pipe, a file, the journal, a test).

    with progress.bar("analysing hosts", total=len(paths)) as update:
        for i, p in enumerate(paths): ...; update(i + 1)          # done so far (of total)
    with progress.countdown("tracing", seconds=30) as tick:
        tick(seconds_left)
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


def shown(stream=None) -> bool:
    """A bar is drawn only on a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed, or no isatty
        return False


def _noop(*_args, **_kw) -> None:
    return None


_active: list = []  # the bars drawn now (rich Progress), innermost last


def say(line: str) -> None:
    """One line on stderr; above the bar while one is drawn (a plain write would tear it)."""
    if _active:
        _active[-1].console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def _drawn(p):
    _active.append(p)
    try:
        with p:
            yield p
    finally:
        _active.remove(p)


@contextlib.contextmanager
def bar(description: str, total: int | None = None, *, unit: str = "") -> Iterator[Callable[..., None]]:
    """update(done, total=None, description=None): done so far; total may be given (or changed)
    late. On a terminal, a transient bar on stderr (gone when the work ends); else a no-op."""
    if not shown():
        yield _noop
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn()]
    if total is not None or unit:  # (a count: the fleet's files; none: a pulsing bar and the time)
        columns.append(MofNCompleteColumn())
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    with _drawn(Progress(*columns, console=Console(stderr=True), transient=True, redirect_stdout=False)) as p:
        task = p.add_task(description, total=total)

        def update(done: int, total: int | None = None, description: str | None = None) -> None:
            kw = {"completed": done}
            if total is not None:
                kw["total"] = total
            if description is not None:
                kw["description"] = description
            p.update(task, **kw)
        yield update


@contextlib.contextmanager
def countdown(description: str, seconds: float) -> Iterator[Callable[[float], None]]:
    """tick(seconds_left): a bar that fills as the time runs out, with the seconds left; drawn
    from the first tick on (so that what is said before it, e.g. 'snapshot taken', stays above
    it). A no-op off a terminal or for no time."""
    if not shown() or seconds <= 0:
        yield _noop
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    with contextlib.ExitStack() as stack:
        state: dict = {}

        def tick(left: float) -> None:
            if "p" not in state:
                p = stack.enter_context(_drawn(Progress(TextColumn("{task.description}"), BarColumn(),
                                                        TextColumn("{task.fields[left]:>5.1f} s left"),
                                                        console=Console(stderr=True), transient=True,
                                                        redirect_stdout=False)))
                state["p"], state["task"] = p, p.add_task(description, total=seconds, left=seconds)
            left = max(0.0, min(seconds, left))
            state["p"].update(state["task"], completed=seconds - left, left=left)
        yield tick
