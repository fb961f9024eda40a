"""The micro world's instruction language: string transforms and answer formats, each with paraphrases.

A *rule* is a (transform, format) pair. A context states it in English, e.g.
``"Reverse it. Answer in [ ]."``. The base model is pretrained to read these sentences; the
offline reflector searches this language for the rule that best explains a task's feedback.
Sentences are kept short on purpose: every context character costs compute in each RL step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

VOWELS = set("aeiou")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _shift(s: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] if c in ALPHABET else c for c in s)


@dataclass(frozen=True)
class Transform:
    """A content rule: a function on the input string plus the sentences that state it."""

    name: str
    apply: Callable[[str], str]
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class Format:
    """An output convention: the answer is written as ``prefix + content + suffix``."""

    name: str
    prefix: str
    suffix: str
    phrases: tuple[str, ...]

    def wrap(self, content: str) -> str:
        return f"{self.prefix}{content}{self.suffix}"

    def unwrap(self, text: str) -> str | None:
        """The content if ``text`` follows this format, else None."""
        if len(text) >= len(self.prefix) + len(self.suffix) and text.startswith(self.prefix) and text.endswith(
            self.suffix
        ):
            return text[len(self.prefix) : len(text) - len(self.suffix)]
        return None


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("reverse", lambda s: s[::-1], ("Reverse it.", "Write it backwards.", "Reverse the letters.")),
        Transform("upper", str.upper, ("Uppercase it.", "Use capitals.", "Write it in caps.")),
        Transform("sort", lambda s: "".join(sorted(s)), ("Sort the letters.", "Sort it.", "Alphabetize it.")),
        Transform("shift", _shift, ("Shift letters by one.", "Use the next letter.", "Shift each letter.")),
        Transform("rotate", lambda s: s[1:] + s[:1], ("Rotate left by one.", "Move the first letter last.",
                                                      "Rotate it.")),
        Transform("novowel", lambda s: "".join(c for c in s if c not in VOWELS),
                  ("Drop the vowels.", "Remove vowels.", "Delete vowels.")),
    )
}

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("square", "[", "]", ("Answer in [ ].", "Use square brackets.", "Wrap it in [ ].")),
        Format("angle", "<", ">", ("Answer in < >.", "Use angle brackets.", "Wrap it in < >.")),
        Format("dot", "", ".", ("End with a period.", "Add a final dot.", "End with a dot.")),
        Format("star", "*", "*", ("Wrap it in stars.", "Use stars around it.", "Answer in * *.")),
    )
}

# Task-agnostic sentences: seen in pretraining with no rule (output then follows a random rule),
# and kept verbatim by the reflector's edits. The first is the seed prompt of every micro task.
GENERIC_PHRASES: tuple[str, ...] = ("Transform the input.", "Do the task.", "Answer the input.", "Solve it.")
SEED_PROMPT = GENERIC_PHRASES[0]


def apply_rule(transform: str, fmt: str, text: str) -> str:
    """The expected answer of ``text`` under the rule (transform, fmt)."""
    return FORMATS[fmt].wrap(TRANSFORMS[transform].apply(text))


def rule_sentences(transform: str | None, fmt: str | None, variant: int = 0) -> list[str]:
    """Sentences stating the rule; ``variant`` picks a paraphrase (0 = canonical)."""
    out = []
    if transform is not None:
        phrases = TRANSFORMS[transform].phrases
        out.append(phrases[variant % len(phrases)])
    if fmt is not None:
        phrases = FORMATS[fmt].phrases
        out.append(phrases[variant % len(phrases)])
    return out


def rule_text(transform: str | None, fmt: str | None, preamble: str = SEED_PROMPT) -> str:
    """Canonical context for a rule: the seed sentence followed by the rule sentences."""
    return " ".join([preamble, *rule_sentences(transform, fmt)]).strip()


_SENTENCE = re.compile(r"[^.!?]*[.!?]|[^.!?]+$")
_TRANSFORM_BY_PHRASE = {p.lower(): name for name, t in TRANSFORMS.items() for p in t.phrases}
_FORMAT_BY_PHRASE = {p.lower(): name for name, f in FORMATS.items() for p in f.phrases}


def split_sentences(text: str) -> list[str]:
    """Split a context into sentences, keeping terminal punctuation (``Answer in [ ].`` stays whole)."""
    sentences: list[str] = []
    rest = text.strip()
    while rest:
        # Known phrases first: some contain inner punctuation ("Answer in * *.", "Use the next letter.").
        match = _match_known_phrase(rest)
        if match is None:
            m = _SENTENCE.match(rest)
            piece = m.group(0) if m and m.group(0) else rest
        else:
            piece = match
        sentences.append(piece.strip())
        rest = rest[len(piece) :].strip()
    return [s for s in sentences if s]


def _all_phrases_sorted() -> list[str]:
    return sorted([*_TRANSFORM_BY_PHRASE, *_FORMAT_BY_PHRASE], key=len, reverse=True)


def _match_known_phrase(text: str) -> str | None:
    low = text.lower()
    for phrase in _all_phrases_sorted():
        if low.startswith(phrase):
            return text[: len(phrase)]
    return None


def parse_context(text: str) -> tuple[str | None, str | None, list[str]]:
    """Parse a context into (transform, format, other sentences). The last stated rule wins."""
    transform = fmt = None
    others: list[str] = []
    for sentence in split_sentences(text):
        key = sentence.lower()
        if key in _TRANSFORM_BY_PHRASE:
            transform = _TRANSFORM_BY_PHRASE[key]
        elif key in _FORMAT_BY_PHRASE:
            fmt = _FORMAT_BY_PHRASE[key]
        else:
            others.append(sentence)
    return transform, fmt, others


def edit_context(text: str, transform: str | None, fmt: str | None) -> str:
    """Incremental edit: keep unrelated sentences, replace (or add) the transform and/or format sentence.

    ``None`` for a part keeps whatever the context already says about it.
    """
    old_transform, old_fmt, others = parse_context(text)
    transform = transform if transform is not None else old_transform
    fmt = fmt if fmt is not None else old_fmt
    return " ".join([*others, *rule_sentences(transform, fmt)]).strip()


def enumerate_rules() -> list[tuple[str, str]]:
    """Every (transform, format) pair of the language, in a fixed order."""
    return [(t, f) for t in TRANSFORMS for f in FORMATS]


def split_format(text: str) -> tuple[str | None, str]:
    """Guess which format ``text`` follows; returns (format name or None, content)."""
    for name, fmt in FORMATS.items():
        content = fmt.unwrap(text)
        if content is not None and (fmt.prefix or fmt.suffix):
            return name, content
    return None, text
