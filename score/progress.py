"""The progress bar of a scoring run, whatever the engine: scored events, events/s and ETA on stderr.

The local engine advances it after every replay step, the Ray engine when a shard comes back; both
count scored events against the same upper bound (events minus sessions: unknown items shrink it).
"""

from __future__ import annotations

import sys


class ScoreProgress:
    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self._pending, self._bar = total, 0, None

    def __enter__(self) -> ScoreProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("events"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("scoring", total=self.total)
        return self

    def stage(self, text: str) -> None:
        """Name what the run is doing (a distributed run reads and shards before it scores)."""
        if self._bar is not None:
            self._bar.update(self._task, description=text)
            if text.startswith("scoring"):
                self._bar.reset(self._task, total=self.total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._pending += n
            if self._pending >= 4096:  # rich redraws at its own rate; batch the bookkeeping
                self._bar.advance(self._task, self._pending)
                self._pending = 0

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
