"""Lockstep fast rounds (GEPA, experience memory, or both) for the ``trl`` engine with several processes.

With W > 1 the fast round runs in lockstep on every rank (:class:`LockstepFast`): the same round (same seed,
same valset or drawn problems) on every rank, every rollout through the collective sampler, the reflection
model (GEPA's proposer, the memory's curator) called on the main process alone and its reply (or its failure)
broadcast (:class:`LockstepReflector`). Every rank's population and memory store are then identical by
construction (checked after each round), so retrieval gives every rank the same contexts per problem, and the
trainer's model is never used by one rank alone during a round.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastslow.reflect import GuardedReflector, ReflectionError
from fastslow.tasks import Task
from fastslow.util import one_line

if TYPE_CHECKING:
    from fastslow.engines.trl.engine import TrlEngine


class LockstepReflector(GuardedReflector):
    """The guarded reflector of a lockstep round: the main process calls the model, every rank gets its reply.

    Timeout, retries and size checks happen on the main process only (inside the guard); the outcome (the
    reply, or the failure as one line) and the guard's counters are broadcast, so every rank returns the same
    text or raises the same :class:`ReflectionError`, and ``exhausted`` turns true on every rank together.
    """

    def __init__(self, guard: GuardedReflector, *, is_main: bool, broadcast: Callable[[Any], Any]) -> None:
        self.__dict__.update(vars(guard))  # the same model, limits and counters as the guard it replaces
        self.is_main, self.broadcast = is_main, broadcast

    _COUNTERS = ("calls", "errors", "failed_calls", "consecutive_failures", "last_error")

    def __call__(self, prompt: Any) -> str:
        reply = message = None
        if self.is_main:
            try:
                reply = super().__call__(prompt)
            except ReflectionError as exc:
                message = str(exc)
            except Exception as exc:  # noqa: BLE001 - a fault of the guard itself: still sent, or the others hang
                message = one_line(f"{type(exc).__name__}: {exc}")
        counters = {k: getattr(self, k) for k in self._COUNTERS}
        reply, message, counters = self.broadcast((reply, message, counters))
        for k, v in counters.items():
            setattr(self, k, v)
        if message is not None:  # the same type and text on every rank, so GEPA takes the same path on each
            raise ReflectionError(message)
        return reply


class LockstepFast:
    """A fast channel whose rounds run in lockstep on every rank (see the module docstring).

    ``inner`` is the run's fast channel (GEPA's population, the experience memory, or both) over the collective
    sampler; ``parts`` are its parts that call a reflection model (``inner`` itself, or GEPA's and the memory's
    under ``gepa+memory``): each one's guarded reflector becomes a :class:`LockstepReflector`. Only the main
    process keeps GEPA's scratch dir and the memory's files in the run dir. After each round the ranks compare
    digests of their state and round (the memory's store included, so every rank retrieves the same contexts):
    a difference is a fastslow bug and stops the run.
    """

    def __init__(self, inner, engine: TrlEngine, parts: tuple = ()) -> None:
        self.inner, self.engine, self.rounds = inner, engine, 0
        for part in parts or (inner,):
            part.reflector = LockstepReflector(part.reflector, is_main=engine.is_main, broadcast=engine.broadcast)

    @property
    def population(self) -> list[str]:
        return self.inner.population

    @property
    def best(self) -> dict[str, str]:
        return self.inner.best

    def run_round(self, task: Task, workdir: Path | None = None):
        eng = self.engine
        result = self.inner.run_round(task, workdir=workdir if eng.is_main else None)
        mine = json.dumps([self.inner.state_dict(), result.metrics, result.rollouts, result.accepted, result.error],
                          sort_keys=True, default=str)
        from accelerate.utils import gather_object

        digests = gather_object([hashlib.sha256(mine.encode()).hexdigest()])
        self.rounds += 1
        if len(set(digests)) > 1:
            raise RuntimeError(f"fast round {self.rounds} on {task.name} diverged between ranks (state digests "
                               f"{digests})")
        return result

    def contexts(self, task: Task, problem, group_size: int, view: str = "train") -> list[str]:
        return self.inner.contexts(task, problem, group_size, view)

    def preflight(self) -> None:
        self.inner.preflight()  # the engine calls it on the main process and broadcasts the verdict

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
