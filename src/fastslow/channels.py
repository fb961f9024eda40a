"""What the loop needs from its two channels and its sampler: the seams a second engine plugs in behind.

The loop (:mod:`fastslow.loop`) only calls what is written here; the native engine (``slow.SlowLearner``,
``fast.FastChannel``, ``rollout.rollout``) satisfies these protocols, and so must any other engine.
Values are returned, never left in attributes for the loop to read afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fastslow.rollout import Scored
    from fastslow.slow import Rollouts
    from fastslow.tasks import Problem, Task


@dataclass(frozen=True)
class Round:
    """What one fast-channel round did.

    - ``metrics``: ``fast/*`` values for the metrics row;
    - ``rollouts``: rollouts the round sampled (re-scoring of the carried population included);
    - ``verifier_errors``: verifier faults among them;
    - ``accepted``: new candidates GEPA accepted into its pool this round;
    - ``reflection_errors`` / ``reflection_calls``: faults (tries) and calls of the reflection model this round;
    - ``failed_reflection_calls``: calls that failed after all their tries (None: not known; the loop then
      counts every call failed when every try failed);
    - ``error``: one redacted line when the round failed and kept its re-scored population, else None.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    rollouts: int = 0
    verifier_errors: int = 0
    accepted: int = 0
    reflection_calls: int = 0
    reflection_errors: int = 0
    failed_reflection_calls: int | None = None
    error: str | None = None


@runtime_checkable
class Sampler(Protocol):
    """Samples one completion per (system prompt, problem) pair with the current weights and scores it.

    A faulty verifier costs only its rollout (counted in ``Scored.verifier_errors``). With
    ``temperature == 0`` decoding is greedy; the same ``seed`` gives the same samples on CPU.
    """

    def __call__(self, task: Task, pairs: Sequence[tuple[str, Problem]], *, temperature: float,
                 max_new_tokens: int, seed: int, top_p: float = 1.0) -> Scored: ...


@runtime_checkable
class SlowChannel(Protocol):
    """RL on weights. ``step`` takes B problems x G scored rollouts (rewards ``[B, G]``, one advantage group
    per problem even when the group mixes several prompts) and returns ``slow/*`` metrics.

    ``nonfinite_streak`` counts consecutive steps whose update was skipped as non-finite (the loop stops
    the run after a few). ``state_dict``/``load_state_dict`` carry the optimizer and schedule for resume.
    """

    nonfinite_streak: int

    def step(self, rollouts: Rollouts, *, measure_k3: bool = False) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def observe_drift(self, kl_rev: float | None) -> None:
        """The drift meter's exact reverse KL after each measurement (drives ``slow.kl_target``)."""
        ...


@runtime_checkable
class FastChannel(Protocol):
    """What the fast channel holds (a prompt population, an experience memory, or both), learnt on the current
    weights.

    - ``run_round(task)``: one round on ``task``; returns a :class:`Round`. A failing round keeps the
      population (memory) and says why in ``Round.error``; it never raises for a plug-in fault.
    - ``contexts(task, problem, G, view)``: the contexts for one problem. ``view="train"``: the G contexts of
      its group (GEPA: K population prompts, G/K each; memory: the context retrieved for the problem);
      ``"task"``: task-aware evaluation (the method is told the task: GEPA's best prompt for it, memory
      retrieved from that task's entries); ``"agnostic"``: task-agnostic evaluation, one context source for
      every task (GEPA: the population's top prompt; memory: retrieval from the whole memory).
    - ``best``: the best prompt per task name; ``population``: the current prompts (empty for memory alone).
    """

    population: list[str]
    best: dict[str, str]

    def run_round(self, task: Task, workdir: Path | None = None) -> Round: ...

    def contexts(self, task: Task, problem: Problem, group_size: int, view: str = "train") -> list[str]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
