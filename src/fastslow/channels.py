"""The one seam: what the loop needs from an :class:`Engine`, and from the sampler and channels it holds.

The loop (:mod:`fastslow.loop`) and the run record (:mod:`fastslow.record`) only call what is written here;
the native engine (``slow.SlowLearner``, ``fast.FastChannel``, ``rollout.PolicySampler``) satisfies these
protocols, and so must any other engine. Engines register an :class:`EngineSpec` in :mod:`fastslow.registry`
(built-in ones through the ``fastslow.plugins`` entry point, like any plug-in): nothing in the core imports one.
Values are returned, never left in attributes for the loop to read afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fastslow.config import Config
    from fastslow.policy import Policy
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
    - ``error``: one redacted line when the round failed and kept its re-scored population, else None;
    - ``population`` / ``front_size``: prompts kept (K unless the round had fewer distinct ones) and the size
      of the Pareto front they came from; ``val_flat``: the validation set could not tell candidates apart.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    rollouts: int = 0
    verifier_errors: int = 0
    accepted: int = 0
    reflection_calls: int = 0
    reflection_errors: int = 0
    failed_reflection_calls: int | None = None
    error: str | None = None
    population: int = 0
    front_size: int = 0
    val_flat: bool = False


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
    - ``preflight()``: see below (called on the main process only, before step 0).
    """

    population: list[str]
    best: dict[str, str]

    def run_round(self, task: Task, workdir: Path | None = None) -> Round: ...

    def contexts(self, task: Task, problem: Problem, group_size: int, view: str = "train") -> list[str]: ...

    def preflight(self) -> None:
        """One short real call of each model the channel relies on; a failure is a one-line ConfigError."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def slow_on(method: str) -> bool:
    """Methods whose weights learn (the slow channel is on)."""
    return method in ("rl", "fst")


def fast_on(method: str) -> bool:
    """Methods with a fast channel (contexts that learn)."""
    return method in ("gepa", "memory", "fst")


@runtime_checkable
class Engine(Protocol):
    """What the loop runs on: a sampler, the channels the method turns on, and the weights' view.

    - ``policy``: the view of the weights the drift meter measures and the loop checks (``policy.finite()``,
      ``policy.format``, ``policy.version``); the loop never reaches into the model behind it.
    - ``save(directory)``: the engine's whole state (weights, the slow channel's optimizer and schedule, the
      fast channel's state) into ``directory``. Called on every rank (gathering sharded weights is a
      collective); only the main process writes. ``load(directory)`` restores what ``save`` wrote into an
      engine built from ``directory / "model"``; both return nothing the loop must read afterwards.
    - ``preflight()``: one short real call of each plug-in the run needs (the reflection model) before step 0;
      raises a user error (exit 2) on every rank when it fails on any.
    - ``is_main``: this process writes the run dir; ``broadcast(obj)`` returns the main process's ``obj`` on
      every rank (identity in one process); ``gather(obj)`` every rank's ``obj`` in rank order; ``close()``
      frees what the engine holds.
    - ``agree(error)``: every rank calls it at the same point with what it raised there (or None); when any
      rank failed, every rank raises the same one line and exit status (none waits in a collective for a
      failed peer).
    """

    name: str
    world_size: int
    sharding: str | None
    is_main: bool
    policy: Policy
    sample: Sampler
    slow: SlowChannel | None
    fast: FastChannel | None

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def preflight(self) -> None: ...

    def broadcast(self, obj: Any) -> Any: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def agree(self, error: BaseException | None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    """How an engine registers (``registry.register_engine(name, spec)``).

    - ``build(cfg, weights)``: the engine for ``cfg``, started from ``weights`` (a checkpoint's ``model/``
      dir, or None for the model's own);
    - ``describe(cfg, world_size)``: validate ``cfg`` for this engine without loading weights and return its
      resolved settings (what ``--dry-run`` prints); raises ``ConfigError`` for what it refuses;
    - ``launchable``: runs on several processes (``fastslow launch``); ``check_launch(cfg, accelerate_config)``
      refuses, before any process starts, what the processes would refuse.
    """

    build: Callable[[Config, Path | None], Engine]
    describe: Callable[[Config, int | None], dict[str, Any]]
    launchable: bool = False
    check_launch: Callable[[Config, str | None], None] | None = None
