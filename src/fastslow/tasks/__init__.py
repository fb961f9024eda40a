"""Tasks: problems with train/eval splits and a verifier that returns a reward plus feedback text.

The whole integration surface is the :class:`Task` protocol and the :class:`Verdict` dataclass.
Task specs used in configs:

- ``micro/<name>``, ``rg:<dataset>``...: task families registered in :mod:`fastslow.registry`.
- ``jsonl:<path>``: question/answer lines (see :mod:`fastslow.tasks.jsonl`).
- ``rg:<dataset>[?key=value&...]``: a reasoning-gym dataset (see :mod:`fastslow.tasks.rg`).
- ``humaneval``: HumanEval function completion (see :mod:`fastslow.tasks.humaneval`).
- ``codeio``: predict a short program's printed output (see :mod:`fastslow.tasks.codeio`).
- ``<module>:<attr>``: any importable object (or zero-argument factory) implementing :class:`Task`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from fastslow.guard import ProcessCaller, call_with_timeout

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Problem:
    """One problem. ``prompt`` is the user turn; the system turn is the context (seed or evolved prompt)."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Verdict:
    """What a verifier says of one completion: ``reward`` in [0, 1] and ``feedback`` text for reflection."""

    reward: float
    feedback: str


@runtime_checkable
class Task(Protocol):
    """A task of the stream.

    Contract:
    - ``name`` is unique within a run and is used in metric keys (``eval/<name>/reward``).
    - ``seed_prompt`` is the task-agnostic system prompt the methods start from.
    - ``problems(split)`` is deterministic: the same list every call.
    - ``verify`` returns reward in [0, 1]. It may raise; the engine turns that into reward 0
      with the error as feedback, so one bad rollout never stops a run.
    - Optional: ``max_new_tokens``, the completion budget the task needs (``fastslow eval``'s default for it).
    """

    name: str
    seed_prompt: str

    def problems(self, split: Split) -> Sequence[Problem]: ...

    def verify(self, problem: Problem, completion: str) -> Verdict: ...


class TaskError(ValueError):
    """A task spec or task file is unusable; the message says why (and where)."""


_verifier_workers: dict[int, tuple[Task, ProcessCaller]] = {}


def _verify_in_process(task: Task, problem: Problem, completion: str, timeout_s: float) -> Verdict:
    """``task.verify`` in the task's worker process (forked once, killed and replaced when a call hangs)."""
    entry = _verifier_workers.get(id(task))
    if entry is None or entry[0] is not task:
        entry = _verifier_workers[id(task)] = (task, ProcessCaller(task.verify))
    try:
        return entry[1](problem, completion, timeout_s=timeout_s)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        if "pickle" not in str(exc):
            raise
        # A problem that cannot cross to a process (an unpicklable meta): a thread, as before.
        return call_with_timeout(task.verify, problem, completion, timeout_s=timeout_s)


def close_verifier_workers() -> None:
    """End every verifier worker process (a run's tasks are done with)."""
    for _, caller in _verifier_workers.values():
        caller.close()
    _verifier_workers.clear()


def safe_verify(
    task: Task, problem: Problem, completion: str, *, timeout_s: float | None = None
) -> tuple[Verdict, bool]:
    """Run the verifier; a raising or hanging verifier costs this rollout only. Returns (verdict, errored).

    With ``timeout_s`` the verifier runs in a worker process of the task's (:class:`fastslow.guard.ProcessCaller`):
    one that hangs, even in a busy loop, is killed after that long. Verifiers of untrusted code should also run
    that code in the sandbox (``fastslow.tasks.sandbox``).
    """
    try:
        if timeout_s is None:
            verdict = task.verify(problem, completion)
        else:
            verdict = _verify_in_process(task, problem, completion, timeout_s)
        reward = float(verdict.reward)
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward {reward} outside [0, 1]")
        return Verdict(reward, str(verdict.feedback)), False
    except Exception as exc:  # noqa: BLE001 - any verifier fault is scored, not raised
        from fastslow.util import redact  # feedback goes to the reflection model and may be stored: no keys

        return Verdict(0.0, redact(f"verifier error: {type(exc).__name__}: {exc}")), True


def content_hash(task: Task) -> str:
    """sha256 of a task's problems (both splits: ids, prompts, answers): a task file edited under the same
    path, or a dataset drawn differently, has another hash."""
    h = hashlib.sha256()
    for split in ("train", "eval"):
        for p in task.problems(split):
            h.update(json.dumps([split, str(p.id), str(p.prompt), str(p.answer)]).encode())
    return h.hexdigest()


def load_task(spec: str, name: str | None = None) -> Task:
    """Resolve a task spec through :mod:`fastslow.registry` (``<module>:<attr>`` as the fallback).

    ``name`` renames the task (a stage's ``name:``), so two specs whose tasks share a name can both run.
    """
    from fastslow import registry

    found = registry.task_factory(spec)
    if found is not None:
        factory, rest = found
        try:
            task = factory(rest)
        except TaskError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plug-in's factory failing on this spec is bad input
            from fastslow.util import one_line

            raise TaskError(f"task {spec!r}: {type(exc).__name__}: {one_line(exc)}") from None
    elif ":" in spec and not spec.startswith(":"):
        task = _import_task(spec)
    else:
        raise TaskError(f"unknown task spec {spec!r}: use one of {registry.known('tasks')} or <module>:<attr>")
    if name:
        task = _renamed(task, name)
    return task


def _import_task(spec: str) -> Task:
    from fastslow.util import one_line

    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - the user's module failing at import is bad input: one line
        raise TaskError(f"cannot import task {spec!r}: {type(exc).__name__}: {one_line(exc)}") from None
    if callable(obj) and not isinstance(obj, Task):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise TaskError(f"task factory {spec!r} failed: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(obj, Task):
        raise TaskError(f"{spec!r} does not implement the Task protocol")
    return obj


class _Renamed:
    """A task under another name (everything else delegated)."""

    def __init__(self, task: Task, name: str) -> None:
        self._task, self.name = task, name

    def __getattr__(self, attr: str):
        return getattr(self._task, attr)


def _renamed(task: Task, name: str) -> Task:
    try:
        task.name = name  # dataclasses and plain objects: rename in place
        return task
    except AttributeError:
        return _Renamed(task, name)  # type: ignore[return-value]
