"""Micro-world tasks: each hides a rule (transform + format) and uses inputs longer than pretraining.

The *declarative* part (which transform, which format) can be written into the context by the fast
channel; the *procedural* part (applying it to inputs longer than the base model ever saw) can
only be learnt in weights. Stream tasks use different transforms and formats, so weights that
absorb one task's convention under the shared seed prompt lose the previous one.

The hidden spec lives in private attributes; the offline reflector never imports this module.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastslow.tasks import Problem, Split, TaskError, Verdict
from fastslow.world.language import ALPHABET, FORMATS, SEED_PROMPT, TRANSFORMS, rule_text, split_format

N_TRAIN, N_EVAL = 2000, 300
FORMAT_WEIGHT = 0.3  # the rest of the reward is content: the share of characters in the right place


@dataclass
class MicroTask:
    """A micro-world task implementing :class:`fastslow.tasks.Task`."""

    name: str
    _transform: str
    _format: str
    min_len: int = 7
    max_len: int = 12
    seed_prompt: str = SEED_PROMPT
    format_weight: float = FORMAT_WEIGHT
    regime: str = "prompt"  # "prompt": the rule text carries the task; "weight": it can only partly
    _stated: str | None = None  # weight regime: the language's closest transform (what text can say)
    _cache: dict[str, list[Problem]] = field(default_factory=dict, repr=False)

    @property
    def rule_text(self) -> str:
        """The best context the language can write for this task (for ``world check`` only; never shown to
        the reflector): the full rule, or for a weight-dominant task its stated part."""
        return rule_text(self._stated or self._transform, self._format)

    def _content(self, text: str) -> str:
        return _content_fn(self._transform)(text)

    def problems(self, split: Split) -> Sequence[Problem]:
        if split not in ("train", "eval"):
            raise TaskError(f"unknown split {split!r}")
        if not self._cache:
            self._cache.update(self._generate())
        return self._cache[split]

    def _generate(self) -> dict[str, list[Problem]]:
        # Seeded by the task name only, so the splits are identical across runs and machines.
        rng = random.Random(zlib.crc32(self.name.encode()))
        seen: set[str] = set()
        splits: dict[str, list[Problem]] = {}
        for split, count in (("eval", N_EVAL), ("train", N_TRAIN)):
            items: list[Problem] = []
            while len(items) < count:
                n = rng.randint(self.min_len, self.max_len)
                text = "".join(rng.choice(ALPHABET) for _ in range(n))
                if text in seen:
                    continue  # eval and train never share an input
                seen.add(text)
                answer = FORMATS[self._format].wrap(self._content(text))
                items.append(Problem(id=f"{self.name}-{split}-{len(items)}", prompt=text, answer=answer))
            splits[split] = items
        return splits

    def verify(self, problem: Problem, completion: str) -> Verdict:
        """Reward = format part + content part (share of characters right); feedback like a grader's."""
        out = completion.strip()
        fmt = FORMATS[self._format]
        expected_content = self._content(problem.prompt)
        content = fmt.unwrap(out)
        format_ok = content is not None
        if content is None:
            content = split_format(out)[1]  # judge the content even under the wrong wrapper
        right = sum(a == b for a, b in zip(content, expected_content, strict=False))
        content_score = right / max(len(content), len(expected_content), 1)
        reward = self.format_weight * format_ok + (1 - self.format_weight) * content_score
        lines = [f"Your answer: {out}", f"Expected answer: {problem.answer}"]
        if format_ok and content == expected_content:
            lines.append("Correct.")
        else:
            if not format_ok:
                lines.append("The format is wrong: the answer is not written the way the expected answer is.")
            if content != expected_content:
                lines.append(
                    f"The content is wrong: {right} of {len(expected_content)} characters are right"
                    + (f" and the length is {len(content)} instead of {len(expected_content)}."
                       if len(content) != len(expected_content) else ".")
                )
        return Verdict(reward=round(reward, 6), feedback="\n".join(lines))


# name -> (transform, format). Stream tasks differ in both parts so that they conflict.
_SPECS: dict[str, tuple[str, str]] = {
    "flip": ("reverse", "square"),
    "caesar": ("shift", "angle"),
    "order": ("sort", "dot"),
    "consonants": ("novowel", "dot"),
    "cycle": ("rotate", "square"),
    "shout": ("upper", "star"),
}

MICRO_TASKS: list[str] = list(_SPECS)
STREAM: list[str] = ["flip", "caesar", "order"]
HELDOUT: str = "consonants"


def _back_shift(s: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) - 1) % 26] for c in s)


# Weight-dominant family: contents the instruction language has no sentence for (compositions of two
# rules, a fixed letter mapping). Text can state the format and at most one part; the rest must be
# learnt in weights. Graded mostly on content (format share WEIGHT_FORMAT_WEIGHT). Formats are ones the
# seed prompt already writes often (not `dot`, which it almost never writes): stating the format then
# gives little, so text alone stays within WEIGHT_MAX_TEXT_GAIN (see `fastslow world check`).
_HIDDEN: dict[str, Callable[[str], str]] = {
    "reverse_shift": lambda s: TRANSFORMS["shift"].apply(s[::-1]),
    "shift2": lambda s: TRANSFORMS["shift"].apply(TRANSFORMS["shift"].apply(s)),
    "back_shift": _back_shift,
    "pivot_reverse": lambda s: s[:1] + s[:0:-1],  # the first letter stays, the rest is reversed
    "upper_shift": lambda s: TRANSFORMS["shift"].apply(s).upper(),
}
WEIGHT_FORMAT_WEIGHT = 0.15
# name -> (hidden content, format, the transform sentence the language can state about it)
_WEIGHT_SPECS: dict[str, tuple[str, str, str]] = {
    "mirror": ("reverse_shift", "square", "reverse"),
    "leap": ("shift2", "angle", "shift"),
    "back": ("back_shift", "star", "shift"),
    "pivot": ("pivot_reverse", "angle", "reverse"),
    "loud": ("upper_shift", "star", "upper"),
}
WEIGHT_TASKS: list[str] = list(_WEIGHT_SPECS)
WEIGHT_STREAM: list[str] = ["mirror", "leap", "back"]
WEIGHT_HELDOUT: str = "pivot"
ALL_TASKS: list[str] = MICRO_TASKS + WEIGHT_TASKS


def _content_fn(name: str) -> Callable[[str], str]:
    return TRANSFORMS[name].apply if name in TRANSFORMS else _HIDDEN[name]


def micro_task(name: str) -> MicroTask:
    """The micro task ``name`` (one of :data:`MICRO_TASKS` or :data:`WEIGHT_TASKS`)."""
    if name in _SPECS:
        transform, fmt = _SPECS[name]
        return MicroTask(name=name, _transform=transform, _format=fmt)
    if name in _WEIGHT_SPECS:
        hidden, fmt, stated = _WEIGHT_SPECS[name]
        return MicroTask(name=name, _transform=hidden, _format=fmt, min_len=3, max_len=6,
                         format_weight=WEIGHT_FORMAT_WEIGHT, regime="weight", _stated=stated)
    raise TaskError(f"unknown micro task {name!r}; known: {', '.join(MICRO_TASKS + WEIGHT_TASKS)}")
