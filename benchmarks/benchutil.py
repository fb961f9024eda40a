"""Helpers of the benchmark scripts: progress with an ETA, and sections of benchmarks/README.md they own.

Progress of a long benchmark, run by run: a bar with an ETA on a terminal (rich), plain lines otherwise. Runs
reused from an earlier, interrupted bench finish at once; they count as done but not towards the rate, so the
ETA is the time the remaining work took per unit so far in *this* session.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


def eta_s(elapsed_s: float, ran_weight: float, remaining_weight: float) -> float | None:
    """Seconds left at the rate of the work run so far (None before any finished)."""
    if ran_weight <= 0:
        return None
    return elapsed_s / ran_weight * remaining_weight


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class BenchProgress:
    """``advance(weight, reused=...)`` once per finished run; ``weights`` give the runs' relative costs."""

    def __init__(self, label: str, total_weight: float, count: int, *, stream=None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.count = label, float(total_weight), count
        self.stream = stream or sys.stdout
        self.clock = clock
        self.t0 = clock()
        self.done = self.reused = 0
        self.done_weight = self.ran_weight = 0.0
        self._rich = None
        if self.stream.isatty() if tty is None else tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}  {task.fields[info]}"),
                                  console=Console(file=self.stream))
            self._task = self._rich.add_task(label, total=count, eta="?", info="")
            self._rich.start()

    def eta(self) -> float | None:
        return eta_s(self.clock() - self.t0, self.ran_weight, self.total - self.done_weight)

    def line(self, what: str = "") -> str:
        reused = f" ({self.reused} reused)" if self.reused else ""
        return (f"{self.label} {self.done}/{self.count}{reused}  elapsed {hms(self.clock() - self.t0)}  "
                f"ETA {hms(self.eta())}" + (f"  {what}" if what else ""))

    def advance(self, weight: float, *, reused: bool = False, what: str = "") -> None:
        self.done += 1
        self.done_weight += weight
        if reused:
            self.reused += 1
        else:
            self.ran_weight += weight
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, eta=hms(self.eta()), info=what)
        else:
            print(self.line(what), file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def put_section(path: Path, block: str, name: str) -> None:
    """Replace the block ``<!-- name:start -->`` ... ``<!-- name:end -->`` in ``path`` (or append it); ``block``
    includes both markers. benchmarks/claims.py keeps such blocks when it regenerates the README."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert block.startswith(start) and block.endswith(end), name
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
