"""Rich progress bars (with the time left) for the library's :mod:`lowbit.progress` reports.

The display starts with the first report and stops once every step has finished, so it never overlaps the
other live displays of the commands (the search status line, the analysis sweeps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from lowbit.progress import ProgressEvent, progress_sink


class RichBars:
    """A :data:`lowbit.progress.Sink` drawing one transient bar per running step on ``console``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.tasks: dict[int, TaskID] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.finished:
            self._finish(event.key)
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
        task = self.tasks.get(event.key)
        if task is None:
            task = self.tasks[event.key] = self.progress.add_task(event.description, total=event.total)
        self.progress.update(task, completed=event.done, total=event.total, description=event.description)

    def _finish(self, key: int) -> None:
        task = self.tasks.pop(key, None)
        if task is not None and self.progress is not None:
            self.progress.remove_task(task)
        if not self.tasks:
            self.close()

    def close(self) -> None:
        """Stop the display (also when a step ended with an exception)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.tasks.clear()


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """Draw the library's progress reports as bars on stderr inside the block (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    bars = RichBars()
    try:
        with progress_sink(bars):
            yield
    finally:
        bars.close()
