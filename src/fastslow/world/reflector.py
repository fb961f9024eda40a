"""An offline, deterministic reflection model for the micro world, usable as GEPA's ``reflection_lm``.

It reads only what a reflection LLM would: the current instruction and the reflective dataset
rendered by GEPA's default proposal prompt (``Inputs``, ``Generated Outputs``, ``Feedback``; the
expected answer is read out of the feedback text). It searches the instruction language for the
transform and format that explain the expected answers, and edits the instruction: unrelated
sentences are kept, rule sentences are replaced or added. It has no access to task specs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastslow.world.language import FORMATS, TRANSFORMS, edit_context, parse_context

_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
_EXAMPLE = re.compile(r"^# Example \d+\s*$", re.MULTILINE)
_SECTION = re.compile(r"^## (.+?)\s*$", re.MULTILINE)
_EXPECTED = re.compile(r"(?:expected|correct)(?: answer| output)?(?: is)?\s*[:=]\s*(.+)", re.IGNORECASE)


@dataclass(frozen=True)
class Example:
    """One reflective record as the reflector understands it."""

    inputs: str
    output: str
    feedback: str

    @property
    def expected(self) -> str | None:
        match = _EXPECTED.search(self.feedback)
        if match is None:
            return None
        value = match.group(1).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"`":
            value = value[1:-1]
        return value


def _prompt_text(prompt: str | Sequence[dict[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    parts: list[str] = []
    for message in prompt:
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:  # OpenAI-style list of content parts
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


def parse_reflection_prompt(prompt: str | Sequence[dict[str, Any]]) -> tuple[str, list[Example]] | None:
    """(current instruction, examples) from GEPA's default reflection prompt, or None if unparseable."""
    text = _prompt_text(prompt)
    blocks = _BLOCK.findall(text)
    if len(blocks) < 2:
        return None
    instruction, dataset = blocks[0].strip(), blocks[1]
    examples: list[Example] = []
    for chunk in _EXAMPLE.split(dataset)[1:]:
        fields: dict[str, str] = {}
        heads = list(_SECTION.finditer(chunk))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(chunk)
            fields[head.group(1).strip().lower()] = chunk[head.end() : end].strip()
        if "inputs" in fields:
            examples.append(
                Example(fields["inputs"], fields.get("generated outputs", ""), fields.get("feedback", ""))
            )
    return instruction, examples


def infer_rule(examples: Sequence[Example], min_share: float = 0.6) -> tuple[str | None, str | None]:
    """The (transform, format) of the language most consistent with the expected answers.

    A full rule is accepted when it reproduces at least ``min_share`` of the expected answers
    exactly; otherwise each part is inferred on its own with the same threshold. Ties go to the
    language's order, so the result is deterministic.
    """
    pairs = [(ex.inputs, ex.expected) for ex in examples if ex.expected is not None]
    if not pairs:
        return None, None
    need = max(1, int(min_share * len(pairs) + 0.999))
    best, best_count = (None, None), 0
    for t_name, transform in TRANSFORMS.items():
        for f_name, fmt in FORMATS.items():
            count = sum(fmt.wrap(transform.apply(inp)) == exp for inp, exp in pairs)
            if count > best_count:
                best, best_count = (t_name, f_name), count
    if best_count >= need:
        return best
    # Partial evidence: a format that wraps most answers, a transform that explains most contents.
    f_counts = {name: sum(fmt.unwrap(exp) is not None for _, exp in pairs) for name, fmt in FORMATS.items()}
    f_best = max(f_counts, key=lambda k: f_counts[k])
    fmt_name = f_best if f_counts[f_best] >= need else None

    def content_of(exp: str) -> str:
        if fmt_name is not None:
            return FORMATS[fmt_name].unwrap(exp) or exp
        return exp

    t_counts = {
        name: sum(t.apply(inp) in (content_of(exp), exp) for inp, exp in pairs) for name, t in TRANSFORMS.items()
    }
    t_best = max(t_counts, key=lambda k: t_counts[k])
    transform_name = t_best if t_counts[t_best] >= need else None
    return transform_name, fmt_name


class MicroReflector:
    """Deterministic ``reflection_lm``: ``reflector(prompt) -> text`` with the new instruction in a ``` block."""

    def __init__(self, min_share: float = 0.6) -> None:
        self.min_share = min_share

    def propose(self, instruction: str, examples: Sequence[Example]) -> str:
        """The edited instruction (unchanged when the examples say nothing new)."""
        transform, fmt = infer_rule(examples, self.min_share)
        if transform is None and fmt is None:
            return instruction
        old_transform, old_fmt, _ = parse_context(instruction)
        if (transform or old_transform) == old_transform and (fmt or old_fmt) == old_fmt:
            return instruction  # already states the inferred rule: keep the user's wording
        return edit_context(instruction, transform, fmt)

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        parsed = parse_reflection_prompt(prompt)
        if parsed is None:
            # Not a reflection prompt we understand: echo the first block (or nothing) unchanged.
            blocks = _BLOCK.findall(_prompt_text(prompt))
            return f"```\n{blocks[0].strip() if blocks else ''}\n```"
        instruction, examples = parsed
        return f"```\n{self.propose(instruction, examples)}\n```"

    def batch_complete(self, prompts: Sequence[str | list[dict[str, Any]]]) -> list[str]:
        return [self(p) for p in prompts]
