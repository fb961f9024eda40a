"""Rollouts: sample completions for (context, problem) pairs and score them with the task's verifier.

:func:`rollout` is the native sampler; :class:`PolicySampler` binds it to a policy (the :class:`Sampler`
seam of :mod:`fastslow.channels`); :func:`score_prompt` is the evaluation of one prompt (or one context per problem).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastslow.policy import Batch, Policy
from fastslow.tasks import Problem, Task, Verdict, safe_verify

if TYPE_CHECKING:
    from fastslow.channels import Sampler


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


class PolicySampler:
    """The native :class:`fastslow.channels.Sampler`: ``policy.generate`` (or its base view) + the verifier."""

    def __init__(self, policy: Policy, *, use_base: bool = False, verify_timeout_s: float | None = None) -> None:
        self.policy, self.use_base, self.verify_timeout_s = policy, use_base, verify_timeout_s

    def __call__(self, task: Task, pairs: Sequence[tuple[str, Problem]], *, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float = 1.0) -> Scored:
        return rollout(self.policy, task, pairs, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                       seed=seed, use_base=self.use_base, verify_timeout_s=self.verify_timeout_s)


def score_prompt(sample: Sampler, task: Task, prompt: str | Sequence[str], n: int, *, max_new_tokens: int,
                 seed: int, temperature: float = 0.0) -> Scored:
    """Score ``prompt`` on the first ``n`` eval problems of ``task`` with the weights behind ``sample``.

    The probes, ``world check`` and ``fastslow eval`` (the loop's evaluation samples the same pairs, its views in
    one call when greedy): greedy unless
    ``temperature`` > 0, the same problems for every prompt and every call. ``prompt`` may be one context per
    problem (a memory retrieves one for each).
    """
    problems = list(task.problems("eval"))[:n]
    contexts = [prompt] * len(problems) if isinstance(prompt, str) else list(prompt)
    return sample(task, list(zip(contexts, problems, strict=True)), temperature=temperature,
                  max_new_tokens=max_new_tokens, seed=seed)
