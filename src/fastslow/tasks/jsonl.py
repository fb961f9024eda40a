"""Bring your own data: one JSON object per line with ``question`` and ``answer`` (and optional ``split``).

Answers match exactly (after trimming; case-insensitive with ``match: "ci"``) or numerically
(``match: "numeric"``, relative tolerance 1e-6; the last number in the completion counts).
Lines without a ``split`` are split deterministically: every ``eval_every``-th line goes to eval.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastslow.tasks import Problem, Split, TaskError, Verdict

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class JsonlTask:
    seed_prompt = "Answer the question. Give only the final answer."

    def __init__(self, name: str, problems: dict[str, list[Problem]], match: str = "exact") -> None:
        if match not in ("exact", "ci", "numeric"):
            raise TaskError(f"{name}: match must be exact, ci or numeric (got {match!r})")
        self.name, self._problems, self.match = name, problems, match

    @classmethod
    def from_file(cls, path: str | Path, *, match: str = "exact", eval_every: int = 5) -> JsonlTask:
        p = Path(path)
        if not p.is_file():
            raise TaskError(f"task file not found: {p}")
        splits: dict[str, list[Problem]] = {"train": [], "eval": []}
        bad: list[str] = []
        for lineno, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                question, answer = str(obj["question"]), str(obj["answer"])
                match = obj.get("match", match)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                bad.append(f"line {lineno}: {type(exc).__name__}: {exc}")
                continue
            split = obj.get("split") or ("eval" if lineno % eval_every == 0 else "train")
            if split not in splits:
                bad.append(f"line {lineno}: split must be train or eval (got {split!r})")
                continue
            splits[split].append(Problem(f"{p.stem}-{lineno}", question, answer))
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise TaskError(f"{p}: malformed lines: {'; '.join(bad[:3])}{more}")
        if not splits["train"] or not splits["eval"]:
            raise TaskError(f"{p}: no usable lines for the {'train' if not splits['train'] else 'eval'} split")
        return cls(p.stem, splits, match)

    def problems(self, split: Split) -> list[Problem]:
        return self._problems[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = completion.strip()
        if self.match == "numeric":
            numbers = _NUMBER.findall(got)
            if not numbers:
                return Verdict(0.0, f"Output {got!r} contains no number; expected {problem.answer}.")
            value, want = float(numbers[-1]), float(problem.answer)
            ok = abs(value - want) <= 1e-6 * max(1.0, abs(want))
        elif self.match == "ci":
            ok = got.lower() == problem.answer.strip().lower()
        else:
            ok = got == problem.answer.strip()
        if ok:
            return Verdict(1.0, f"Correct: {got!r}.")
        return Verdict(0.0, f"Output {got!r} is wrong; expected {problem.answer!r}.")
