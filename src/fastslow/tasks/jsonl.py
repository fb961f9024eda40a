"""Bring your own data: one JSON object per line with ``question`` and ``answer`` (and optional ``split``).

- ``answer`` is a string (or number) or a list of accepted answers: ``"answer": ["3", "three"]``.
- ``match``: ``exact`` (after trimming), ``ci`` (case-insensitive) or ``numeric`` (relative tolerance 1e-6;
  every accepted answer must then be a number).
- ``extract``: how the answer is read from the completion (:mod:`fastslow.tasks.extract`: ``raw``, ``last_line``,
  ``last_number``, ``boxed``, ``tag:<name>``, ``answer``); default ``raw``, or ``last_number`` for numeric.

``match`` and ``extract`` are set for the whole file in the spec (``jsonl:data.jsonl?match=ci&extract=last_line``)
and may be overridden per line, for that problem only. Lines without a ``split`` are split deterministically:
every ``eval_every``-th line goes to eval. A malformed line is an error naming the line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fastslow.tasks import Problem, Split, TaskError, Verdict
from fastslow.tasks.extract import check_kind, extract

MATCHES = ("exact", "ci", "numeric")


def _number(text: str) -> float:
    value = float(str(text).strip().replace(",", ""))
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _default_extract(match: str) -> str:
    """What a match compares when no extraction is named: the last number for numeric, else the whole text."""
    return "last_number" if match == "numeric" else "raw"


def _rules(obj: dict, match: str, extract_kind: str | None) -> tuple[str, str, list[str]]:
    """(match, extract, accepted answers) of one line; ValueError says what is wrong with it."""
    match = obj.get("match", match)
    if match not in MATCHES:
        raise ValueError(f"match must be exact, ci or numeric (got {match!r})")
    kind = check_kind(obj.get("extract", extract_kind or _default_extract(match)))
    raw = obj["answer"]
    answers = raw if isinstance(raw, list) else [raw]
    if not answers or any(isinstance(a, dict | list | bool) or a is None for a in answers):
        raise ValueError("answer must be a string, a number or a non-empty list of them")
    answers = [str(a) for a in answers]
    if match == "numeric":
        for a in answers:
            try:
                _number(a)
            except ValueError:
                raise ValueError(f"numeric answer {a!r} is not a number") from None
    return match, kind, answers


class JsonlTask:
    seed_prompt = "Answer the question. Give only the final answer."

    def __init__(self, name: str, problems: dict[str, list[Problem]], match: str = "exact",
                 extract: str | None = None) -> None:
        if match not in MATCHES:
            raise TaskError(f"{name}: match must be exact, ci or numeric (got {match!r})")
        self.name, self._problems, self.match = name, problems, match
        try:
            self.extract = check_kind(extract or _default_extract(match))
        except ValueError as exc:
            raise TaskError(f"{name}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path, *, match: str = "exact", extract: str | None = None,
                  eval_every: int = 5) -> JsonlTask:
        p = Path(path)
        if not p.is_file():
            raise TaskError(f"task file not found: {p}")
        if match not in MATCHES:
            raise TaskError(f"{p}: match must be exact, ci or numeric (got {match!r})")
        try:
            extract = check_kind(extract) if extract else None
        except ValueError as exc:
            raise TaskError(f"{p}: {exc}") from None
        splits: dict[str, list[Problem]] = {"train": [], "eval": []}
        bad: list[str] = []
        for lineno, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError("a line must be a JSON object")
                question = str(obj["question"])
                line_match, kind, answers = _rules(obj, match, extract)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                bad.append(f"line {lineno}: {type(exc).__name__}: {exc}")
                continue
            split = obj.get("split") or ("eval" if lineno % eval_every == 0 else "train")
            if split not in splits:
                bad.append(f"line {lineno}: split must be train or eval (got {split!r})")
                continue
            meta = {"answers": answers}
            if "match" in obj or "extract" in obj:  # a line with rules of its own keeps both, as resolved
                meta.update(match=line_match, extract=kind)
            splits[split].append(Problem(f"{p.stem}-{lineno}", question, answers[0], meta))
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise TaskError(f"{p}: malformed lines: {'; '.join(bad[:3])}{more}")
        if not splits["train"] or not splits["eval"]:
            raise TaskError(f"{p}: no usable lines for the {'train' if not splits['train'] else 'eval'} split")
        return cls(p.stem, splits, match, extract)

    def problems(self, split: Split) -> list[Problem]:
        return self._problems[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        # Lines without rules of their own, and problems built elsewhere (no meta), follow the file-wide rules.
        match = problem.meta.get("match", self.match)
        kind = problem.meta.get("extract", self.extract)
        answers = problem.meta.get("answers", [problem.answer])
        got = extract(completion, kind)
        expected = answers[0] if len(answers) == 1 else " or ".join(repr(a) for a in answers)
        if got is None:
            what = "no number" if kind == "last_number" else f"no answer ({kind})"
            return Verdict(0.0, f"Output {completion.strip()!r:.200} contains {what}; expected {expected}.")
        if match == "numeric":
            try:
                value = _number(got)
            except ValueError:
                return Verdict(0.0, f"Output {got!r} is not a number; expected {expected}.")
            ok = any(abs(value - _number(a)) <= 1e-6 * max(1.0, abs(_number(a))) for a in answers)
        elif match == "ci":
            ok = got.strip().lower() in {a.strip().lower() for a in answers}
        else:
            ok = got.strip() in {a.strip() for a in answers}
        if ok:
            return Verdict(1.0, f"Correct: {got!r}.")
        return Verdict(0.0, f"Output {got!r} is wrong; expected {expected}.")
