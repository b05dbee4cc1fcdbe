"""Progress of a stage on the CLI's rich progress bar (`edgekd.cli.console.progress_bar`), or nothing without one.

The CLI owns the bar (silent when stderr is not a terminal); a stage only adds its task to it and advances it,
so library calls and tests, which pass no bar, print nothing. Torch-free: the runtime side may use it too.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


def silent(*_args, **_kwargs) -> None:
    """A `log` callback that says nothing: what the library entry points use when given `log=None`."""


@contextmanager
def progress_task(progress, description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A task on `progress` (a rich Progress, or None) for the duration of the block; yields `advance(n=1,
    description=None)`. The task is removed at the end, so a finished stage leaves the bar to the next one.
    Calls beyond `total` do not advance it (a pass that iterates its data twice, as NNCF's statistics do)."""
    if progress is None:
        yield _no_progress
        return
    from rich.markup import escape  # descriptions name models and paths, which may hold [brackets]

    task = progress.add_task(escape(description), total=total)
    done = 0

    def advance(n: int = 1, description: str | None = None) -> None:
        nonlocal done
        step = n if total is None else max(0, min(n, total - done))
        done += step
        progress.update(task, advance=step, **({"description": escape(description)} if description else {}))

    try:
        yield advance
    finally:
        progress.refresh()  # draw the last step before the task goes (the bar redraws on a timer, ~10 per second)
        progress.remove_task(task)


def _no_progress(n: int = 1, description: str | None = None) -> None:
    """advance() without a progress bar."""
