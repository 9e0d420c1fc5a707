"""A thin progress bar over rich (no-op when disabled or when stdout is not a terminal and CI is set)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, description: str, total: int | None, enabled: bool = True):
        self.description, self.total = description, total
        self.enabled = enabled
        self._bar = None
        self._last_print = -1

    def __enter__(self) -> "Progress":
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total or self.total, info=info)
            return
        # not a terminal (CI, piped): print a line at every 10% so long runs still show life
        total = total or self.total
        if total:
            pct = int(10 * done / total)
            if pct != self._last_print:
                self._last_print = pct
                print(f"{self.description}: {done}/{total} {info}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
