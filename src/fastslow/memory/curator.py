"""The curator: a round's scored attempts -> delta operations, through the reflector seam.

It asks the run's reflection model (``fast.reflector``: ``micro``, ``feedback``, ``hf:``, ``openai:``,
``replay:``..., wrapped in the same :class:`~fastslow.reflect.GuardedReflector` as GEPA's) the question GEPA
asks, rendered by GEPA's own template (``InstructionProposalSignature``): here is the instruction (the base
prompt plus the task's current lessons) and scored attempts (``Inputs``, ``Generated Outputs``, ``Feedback``);
write a better instruction. The reply is read as a playbook, one lesson per sentence or bullet:

- a lesson the reply states that the instruction did not -> ``add`` (refused, and counted, past
  ``memory.max_lesson_chars``);
- a lesson of the instruction the reply left out -> ``harmful`` (the reflector judged it wrong or useless).

So a reflector never rewrites the memory whole; it only proposes changes, merged by :meth:`Store.apply`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastslow.memory.store import Delta, Lesson, normalise
from fastslow.reflect import propose_from

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[<*])")


def lesson_units(text: str) -> list[str]:
    """A playbook text as lessons: one per line (bullets stripped), long lines split into sentences.
    Headers (a line ending in ':') and fences are not lessons."""
    units: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip().strip("`").strip()
        if not line or line.endswith(":"):
            continue
        units += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return list(dict.fromkeys(units))


@dataclass
class Proposal:
    """The deltas of one reply, and the lessons refused as too long."""

    deltas: list[Delta] = field(default_factory=list)
    refused: int = 0


def reflection_prompt(instruction: str, records: Sequence[dict[str, str]]) -> str:
    """GEPA's default reflection prompt (its template, its renderer) over ``records``."""
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    return InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": instruction, "dataset_with_feedback": list(records)})


def curate(reflect, task: str, base: str, playbook: Sequence[Lesson], records: Sequence[dict[str, str]], *,
           max_lesson_chars: int) -> Proposal:
    """One reflection call on ``records``; its reply as deltas against ``playbook`` (the lessons shown).

    ``reflect`` raises when the call fails after its retries: the caller discards the round's deltas.
    """
    instruction = "\n".join([base, *(lesson.text for lesson in playbook)]).strip()
    reply = reflect(reflection_prompt(instruction, records))
    proposed = lesson_units(propose_from(reply))
    said = {normalise(u) for u in proposed}
    known = {normalise(u) for u in lesson_units(base)} | {normalise(lesson.text) for lesson in playbook}
    out = Proposal()
    for unit in proposed:
        if normalise(unit) in known:
            continue
        if len(unit) > max_lesson_chars:
            out.refused += 1
            continue
        out.deltas.append(Delta("add", task=task, text=unit))
    out.deltas += [Delta("harmful", task=task, lesson=lesson.id) for lesson in playbook
                   if normalise(lesson.text) not in said]
    return out
