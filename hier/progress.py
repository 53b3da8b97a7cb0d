"""The progress every command shows while it works: rich's bar on a terminal, plain lines in a log file."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

EVERY = 30.0          # seconds between two lines of one unfinished task in a log


def progress_bar(console: Console | None = None) -> Progress:
    """A live bar when ``console`` is a terminal (or a notebook); else (``hier train > run.log``, nohup,
    CI) ``LogProgress``."""
    console = console or Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter or console.quiet):
        return LogProgress(console)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


class LogProgress(Progress):
    """rich's ``Progress`` with no live display: one plain line when a task ends (with whatever its
    ``info`` field said last, and what it says after, e.g. an epoch's validation figures), and one every
    ``EVERY`` seconds, on a tenth of the work, while a long task runs."""

    def __init__(self, console: Console):
        super().__init__(console=console, disable=True)
        self._said: dict[TaskID, float] = {}            # when each task last had a line
        self._ended: dict[TaskID, list[str]] = {}        # finished tasks whose line waits for a last word

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        self._flush()
        task = super().add_task(description, *args, **kwargs)
        self._said[task] = time.monotonic()
        return task

    def update(self, task_id: TaskID, **kwargs) -> None:
        before = self._tasks[task_id].completed
        super().update(task_id, **kwargs)
        self._note(task_id, before)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        before = self._tasks[task_id].completed
        super().advance(task_id, advance)
        self._note(task_id, before)

    def stop(self) -> None:
        self._flush()
        super().stop()

    def _note(self, task_id: TaskID, before: float) -> None:
        task = self._tasks[task_id]
        info = str(task.fields.get("info", ""))
        if task_id in self._ended:                       # a word after the end (validation figures)
            if info and info not in self._ended[task_id]:
                self._ended[task_id].append(info)
            return
        if task.total and task.completed >= task.total:
            self._ended[task_id] = [info] if info else []
            return
        tenth = task.total and int(10 * task.completed / task.total) > int(10 * before / task.total)
        if tenth and time.monotonic() - self._said[task_id] >= EVERY:
            self._said[task_id] = time.monotonic()
            eta = task.time_remaining
            self._say(f"{task.description}: {task.completed:g}/{task.total:g} ({task.percentage:.0f}%), "
                      f"{_clock(task.elapsed)} elapsed" + (f", ~{_clock(eta)} to go" if eta else "")
                      + (f", {info}" if info else ""))

    def _flush(self) -> None:
        for task_id, words in self._ended.items():
            task = self._tasks[task_id]
            self._say(f"{task.description}: {task.completed:g}/{task.total:g} in {_clock(task.elapsed)}"
                      + "".join(f", {w}" for w in words))
        self._ended.clear()

    def _say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
