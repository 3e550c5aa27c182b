"""Progress of long steps, so that no wait is silent: a rich bar with its total and ETA in a
terminal, plain lines at a steady interval when the output is a file (a batch job, nohup, CI).

``with bar("classifier", total=epochs * images, unit="images") as b: ... b.advance(n)``.
In a terminal the bar joins the run's display when one is live (:func:`display`), else it shows
its own. Otherwise it writes one line when the work starts (at its first step), one with an
estimate of the whole from the first step's time (``estimate=True``), one every
``SEMFL_PROGRESS_INTERVAL`` seconds (default 30) with done / total, elapsed and ETA, and one at
the end. A quiet run (``display(None)``) writes nothing. Forked worker processes write plain lines.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, TextIO

_PLAIN = "plain"
_DISPLAYS: list[tuple[int, Any]] = []  # (pid, rich Progress | "plain" | None) of the live run display


def interval_s() -> float:
    return float(os.environ.get("SEMFL_PROGRESS_INTERVAL", "30"))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def display(progress: Any):
    """Make ``progress`` (a live rich Progress, "plain", or None for quiet) where bars go meanwhile."""
    _DISPLAYS.append((os.getpid(), progress))
    try:
        yield
    finally:
        _DISPLAYS.pop()


class Bar:
    def __init__(self, description: str, total: float | None, unit: str = "steps", stream: TextIO | None = None,
                 estimate: bool = False, announce: bool = True, completed: float = 0):
        self.description, self.total, self.unit = description, total, unit
        self.stream = stream or sys.stderr
        self.estimate, self.announce = estimate, announce
        self.created = time.monotonic()  # a bar starts showing at its first step, timed from here
        self.done = self.first = float(completed)  # a resumed run starts part-way
        self.info = ""  # shown after the status (the latest metrics of a run)
        self.started = self.last_line = None
        self.rich, self.own, self.task = None, False, None
        self.silent = False
        pid, target = _DISPLAYS[-1] if _DISPLAYS else (os.getpid(), _PLAIN if stream else "auto")
        if target is None:
            self.silent = True  # a quiet run (its forked workers too)
        elif target not in (_PLAIN, "auto"):
            if pid == os.getpid():
                self.rich = target  # join the run's live display
        elif target == "auto" and is_terminal(self.stream):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=self.stream))
            self.own = True

    def _line(self, text: str) -> None:
        if self.rich is not None:
            self.rich.console.log(text)
        else:
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
            self.stream.flush()

    def _status(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.total:
            pct = 100 * self.done / self.total
            ran = self.done - self.first
            eta = elapsed * (self.total - self.done) / ran if ran else float("nan")
            text = (f"{self.description}: {self.done:g}/{self.total:g} {self.unit} ({pct:.0f}%), "
                    f"{duration(elapsed)} elapsed, ETA {duration(eta) if eta == eta else '?'}")
        else:
            text = f"{self.description}: {self.done:g} {self.unit}, {duration(elapsed)} elapsed"
        return f"{text} {self.info}".rstrip()

    def start(self) -> None:
        if self.started is not None or self.silent:
            return
        self.started, self.last_line = self.created, time.monotonic()
        if self.rich is not None:
            if self.own:
                self.rich.start()
            self.task = self.rich.add_task(self.description, total=self.total, completed=self.done, info="")
        elif self.announce:
            total = f"{self.total:g} {self.unit}" if self.total else self.unit
            self._line(f"{self.description}: started ({total})")

    def advance(self, n: float = 1) -> None:
        if self.silent:
            return
        self.start()
        first = self.done == self.first
        self.done += n
        now = time.monotonic()
        if self.rich is not None:
            self.rich.update(self.task, advance=n, info=self.info)
        if first and self.estimate and self.total and self.done < self.total:
            whole = (now - self.started) * (self.total - self.first) / (self.done - self.first)
            self._line(f"{self.description}: the first {self.done:g} {self.unit} took {duration(now - self.started)}: "
                       f"about {duration(whole)} for all {self.total - self.first:g} on this device")
        elif self.rich is None and now - self.last_line >= interval_s() and self.done < (self.total or float("inf")):
            self._line(self._status())
            self.last_line = now

    def close(self) -> None:
        if self.silent or self.started is None:
            return
        if self.rich is not None:
            if self.own:
                self.rich.stop()
            else:
                self.rich.update(self.task, visible=False)
        elif self.announce:
            self._line(f"{self.description}: done, {self.done:g} {self.unit} in {duration(time.monotonic() - self.started)}")
        self.started = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(description: str, total: float | None, unit: str = "steps", **kwargs) -> Bar:
    return Bar(description, total, unit, **kwargs)
