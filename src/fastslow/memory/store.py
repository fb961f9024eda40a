"""The experience store: lessons and cases, changed only by delta operations, bounded by caps, kept as files.

- A **lesson** is a short bullet (one sentence or line) with ``helpful`` / ``harmful`` counts and the task it
  came from. Lessons are deduplicated per task on their normalised text.
- A **case** is one scored train attempt: problem, attempt, reward, verifier feedback. One per (task, problem):
  a newer attempt replaces the older. Only train-split problems ever become cases (the channel checks).
- A :class:`Delta` is ``add`` / ``helpful`` / ``harmful`` / ``drop`` of a lesson, or ``case`` (add or replace).
  :meth:`Store.apply` merges a round's deltas in a fixed order (drops, marks, then adds, each sorted), so the
  result never depends on the order a curator emitted them; a lesson then marked harmful ``drop_margin`` times
  more than helpful is dropped; then the caps evict, lowest
  helpful-minus-harmful first (ties: the oldest), and every eviction is returned so the loop can log it.

On disk: ``RUN/memory/store.jsonl``, a header line (format, counts, the last evictions) then one JSON line per
lesson and per case, replaced atomically. :func:`read_dir` refuses anything else as one line (a foreign or
damaged memory is never overwritten: the run stops before writing anything).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from fastslow.rundir import TEMP_INFIX, RunDirError

FORMAT = "fastslow-memory"
VERSION = 1
FILE = "store.jsonl"
KEEP_DROPPED = 50  # evictions kept in meta.json (all are counted)

Op = Literal["add", "helpful", "harmful", "drop", "case"]
_ORDER = {"drop": 0, "helpful": 1, "harmful": 2, "add": 3, "case": 4}


class MemoryFileError(RunDirError):
    """A memory directory fastslow did not write, or one that is damaged (one line, exit 2)."""


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


@dataclass
class Lesson:
    id: int
    task: str
    text: str
    helpful: int = 0
    harmful: int = 0
    round: int = 0  # the round that added it

    @property
    def utility(self) -> int:
        return self.helpful - self.harmful


@dataclass
class Case:
    id: int
    task: str
    problem_id: str
    problem: str
    attempt: str
    reward: float
    feedback: str
    round: int = 0


@dataclass(frozen=True)
class Delta:
    """One operation. ``lesson``: a lesson id (marks, drop); ``text``: a new lesson; ``case``: a new case."""

    op: Op
    task: str = ""
    lesson: int | None = None
    text: str = ""
    case: Case | None = None

    def key(self) -> tuple:
        c = self.case
        return (_ORDER[self.op], self.task, self.lesson if self.lesson is not None else -1, normalise(self.text),
                self.text, (c.problem_id, c.reward, c.attempt, c.feedback) if c else ())


@dataclass
class Applied:
    """What :meth:`Store.apply` did: counts and the evicted entries (as dicts, for the log)."""

    added: int = 0
    marked: int = 0
    dropped: list[dict] = field(default_factory=list)
    evicted: list[dict] = field(default_factory=list)


@dataclass
class Store:
    max_lessons: int
    max_cases: int
    drop_margin: int = 3  # a lesson marked harmful this many times more than helpful is dropped
    lessons: list[Lesson] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)
    next_id: int = 0
    evicted_total: int = 0
    dropped_total: int = 0
    recent_evictions: list[dict] = field(default_factory=list)

    # ---- delta merge ------------------------------------------------------------------------------
    def apply(self, deltas: Iterable[Delta], round_: int) -> Applied:
        out = Applied()
        by_id = {lesson.id: lesson for lesson in self.lessons}
        for d in sorted(deltas, key=Delta.key):
            if d.op == "drop" and d.lesson in by_id:
                out.dropped.append({"kind": "lesson", "why": "harmful", **asdict(by_id.pop(d.lesson))})
            elif d.op in ("helpful", "harmful") and d.lesson in by_id:
                setattr(by_id[d.lesson], d.op, getattr(by_id[d.lesson], d.op) + 1)
                out.marked += 1
            elif d.op == "add" and d.text.strip():
                key = (d.task, normalise(d.text))
                if not any((lesson.task, normalise(lesson.text)) == key for lesson in by_id.values()):
                    by_id[self.next_id] = Lesson(self.next_id, d.task, d.text.strip(), round=round_)
                    self.next_id += 1
                    out.added += 1
            elif d.op == "case" and d.case is not None:
                self.cases = [c for c in self.cases if (c.task, c.problem_id) != (d.task, d.case.problem_id)]
                self.cases.append(Case(**{**asdict(d.case), "id": self.next_id, "task": d.task, "round": round_}))
                self.next_id += 1
        for lesson in [x for x in by_id.values() if -x.utility >= self.drop_margin]:
            out.dropped.append({"kind": "lesson", "why": "harmful", **asdict(by_id.pop(lesson.id))})
        self.lessons = sorted(by_id.values(), key=lambda lesson: lesson.id)
        self.cases.sort(key=lambda c: c.id)
        out.evicted = self._evict()
        self.dropped_total += len(out.dropped)
        self.evicted_total += len(out.evicted)
        self.recent_evictions = (self.recent_evictions + out.dropped + out.evicted)[-KEEP_DROPPED:]
        return out

    def _evict(self) -> list[dict]:
        """Over a cap: the lowest helpful-minus-harmful lessons go first (ties: the oldest); the lowest-reward
        cases (ties: the oldest)."""
        evicted: list[dict] = []
        if len(self.lessons) > self.max_lessons:
            ranked = sorted(self.lessons, key=lambda lesson: (lesson.utility, lesson.id))
            gone = {lesson.id for lesson in ranked[: len(self.lessons) - self.max_lessons]}
            evicted += [{"kind": "lesson", "why": "full", **asdict(x)} for x in ranked if x.id in gone]
            self.lessons = [x for x in self.lessons if x.id not in gone]
        if len(self.cases) > self.max_cases:
            ranked = sorted(self.cases, key=lambda c: (c.reward, c.id))
            gone = {c.id for c in ranked[: len(self.cases) - self.max_cases]}
            evicted += [{"kind": "case", "why": "full", **asdict(c)} for c in ranked if c.id in gone]
            self.cases = [c for c in self.cases if c.id not in gone]
        return evicted

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lessons": [asdict(x) for x in self.lessons], "cases": [asdict(c) for c in self.cases],
                "next_id": self.next_id, "evicted_total": self.evicted_total, "dropped_total": self.dropped_total,
                "recent_evictions": list(self.recent_evictions)}

    def load_state_dict(self, state: dict) -> None:
        self.lessons = [Lesson(**x) for x in state["lessons"]]
        self.cases = [Case(**c) for c in state["cases"]]
        self.next_id, self.evicted_total = state["next_id"], state["evicted_total"]
        self.dropped_total, self.recent_evictions = state["dropped_total"], list(state["recent_evictions"])

    # ---- files ------------------------------------------------------------------------------------
    def write_dir(self, path: Path) -> None:
        """``path/store.jsonl``: a header line, then one line per lesson and per case; replaced atomically."""
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": VERSION, "lessons": len(self.lessons), "cases": len(self.cases),
                "next_id": self.next_id, "evicted_total": self.evicted_total, "dropped_total": self.dropped_total,
                "recent_evictions": self.recent_evictions}
        lines = [json.dumps(meta)] + [json.dumps({"kind": "lesson", **asdict(x)}) for x in self.lessons]
        lines += [json.dumps({"kind": "case", **asdict(c)}) for c in self.cases]
        tmp = path / f".{FILE}{TEMP_INFIX}{os.getpid()}"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path / FILE)


def _refuse(path: Path, why: str) -> MemoryFileError:
    return MemoryFileError(f"{path}: {why}: not a memory this fastslow wrote (damaged or foreign); it is never "
                           "overwritten: move it away or choose another run directory")


def read_dir(path: Path) -> tuple[dict, list[Lesson], list[Case]]:
    """(header, lessons, cases) of a memory directory; ``({}, [], [])`` when there is none. Anything that is
    not a memory this fastslow wrote is a :class:`MemoryFileError` (one line)."""
    if not path.exists():
        return {}, [], []
    if not path.is_dir():
        raise _refuse(path, "not a directory")
    names = sorted(p.name for p in path.iterdir() if TEMP_INFIX not in p.name)  # a killed writer's temp file
    if [n for n in names if n != FILE]:
        raise _refuse(path, f"unknown files ({', '.join(n for n in names if n != FILE)[:120]})")
    if not names:
        return {}, [], []
    file = path / FILE
    try:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        raise _refuse(file, "unreadable or not JSON lines") from None
    meta = rows[0] if rows and isinstance(rows[0], dict) else {}
    if meta.get("format") != FORMAT:
        raise _refuse(file, "no fastslow memory header")
    if meta.get("version") != VERSION:
        raise _refuse(file, f"memory format {meta.get('version')!r} (this fastslow reads {VERSION})")
    lessons, cases = [], []
    want = {"lesson": (Lesson, lessons), "case": (Case, cases)}
    for lineno, row in enumerate(rows[1:], start=2):
        kind = row.get("kind") if isinstance(row, dict) else None
        cls, into = want.get(kind, (None, None))
        if cls is None or set(row) - {"kind"} != {f.name for f in fields(cls)}:
            raise _refuse(file, f"line {lineno} is not a lesson or a case")
        try:
            into.append(cls(**{k: v for k, v in row.items() if k != "kind"}))
        except TypeError:
            raise _refuse(file, f"line {lineno} is malformed") from None
    if len(lessons) != meta.get("lessons") or len(cases) != meta.get("cases"):
        raise _refuse(file, f"the header counts {meta.get('lessons')} lessons and {meta.get('cases')} cases, the "
                      f"file holds {len(lessons)} and {len(cases)}")
    return meta, lessons, cases
