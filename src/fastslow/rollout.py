"""Rollouts: sample completions for (context, problem) pairs and score them with the task's verifier."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastslow.policy import Batch, Policy
from fastslow.tasks import Problem, Task, Verdict, safe_verify


@dataclass
class Scored:
    batch: Batch
    verdicts: list[Verdict]
    verifier_errors: int

    @property
    def rewards(self) -> list[float]:
        return [v.reward for v in self.verdicts]

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / max(len(self.verdicts), 1)


def rollout(
    policy: Policy,
    task: Task,
    pairs: Sequence[tuple[str, Problem]],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_p: float = 1.0,
    use_base: bool = False,
    verify_timeout_s: float | None = None,
) -> Scored:
    """One completion per (system prompt, problem) pair; a faulty verifier costs only its rollout."""
    prompts = [policy.format(system, problem.prompt) for system, problem in pairs]
    batch = policy.generate(
        prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, use_base=use_base
    )
    verdicts, errors = [], 0
    for (_, problem), text in zip(pairs, batch.texts, strict=True):
        verdict, errored = safe_verify(task, problem, text, timeout_s=verify_timeout_s)
        verdicts.append(verdict)
        errors += errored
    return Scored(batch, verdicts, errors)
