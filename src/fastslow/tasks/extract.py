"""Answer extraction from a completion: the options ``jsonl:`` and ``rg:`` tasks share.

- ``answer`` (rg's default): the last ``<answer>...</answer>``; without one, the last non-empty line;
- ``tag:<name>``: the last ``<name>...</name>`` (None when absent);
- ``last_line``: the last non-empty line; ``last_number``: the last number; ``boxed``: the last ``\\boxed{...}``;
- ``raw``: the whole completion, trimmed.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
KINDS = ("raw", "answer", "last_line", "last_number", "boxed", "tag:<name>")


def check_kind(kind: str) -> str:
    """``kind`` if it is a known extraction option, else ValueError naming the options."""
    if kind in KINDS[:-1] or (kind.startswith("tag:") and re.fullmatch(r"[A-Za-z_][\w-]*", kind[4:])):
        return kind
    raise ValueError(f"extract must be one of {', '.join(KINDS)} (got {kind!r})")


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _tag(text: str, name: str) -> str | None:
    found = re.findall(rf"<{re.escape(name)}>(.*?)</{re.escape(name)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):  # braces nest: \boxed{\frac{1}{2}}
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract(text: str, kind: str) -> str | None:
    """The answer ``kind`` finds in ``text``, or None when it finds none."""
    if kind == "raw":
        return text.strip()
    if kind == "answer":
        tagged = _tag(text, "answer")
        return tagged if tagged is not None else _last_line(text)
    if kind == "last_line":
        return _last_line(text)
    if kind == "last_number":
        numbers = NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    if kind == "boxed":
        return _boxed(text)
    if kind.startswith("tag:"):
        return _tag(text, kind[4:])
    raise ValueError(f"unknown extraction {kind!r}")
