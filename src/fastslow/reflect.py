"""Reflection models for the fast channel, and a guard that keeps their faults from costing a run.

A reflection model is anything GEPA accepts as ``reflection_lm``: a callable taking the reflection
prompt (a string, or chat messages) and returning the reply text (the new prompt inside ``` ```).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fastslow.guard import call_with_timeout

ReflectionLM = Callable[[Any], str]


class ReflectionError(RuntimeError):
    """A reflection call failed after its retries."""


def make_reflector(spec: str) -> ReflectionLM:
    """Resolve ``FastConfig.reflector``.

    - ``micro``: the offline, deterministic reflector of the micro world.
    - ``litellm:<model>`` or ``openai:<model>``: an API or OpenAI-compatible model via litellm; keys are
      read by litellm from the environment (e.g. ``OPENAI_API_KEY``, ``OPENAI_API_BASE``), never stored.
    - ``<module>:<attr>``: an importable callable (or a zero-argument factory of one).
    """
    if spec == "micro":
        from fastslow.world.reflector import MicroReflector

        return MicroReflector()
    kind, _, name = spec.partition(":")
    if kind in ("litellm", "openai") and name:
        model = name if kind == "litellm" else f"openai/{name}"
        return _LiteLLM(model)
    if kind and name:
        try:
            obj = getattr(importlib.import_module(kind), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import reflector {spec!r}: {exc}") from None
        if isinstance(obj, type) or getattr(obj, "__code__", None) and obj.__code__.co_argcount == 0:
            obj = obj()
        if not callable(obj):
            raise ValueError(f"reflector {spec!r} is not callable")
        return obj
    raise ValueError(f"unknown reflector {spec!r}: use micro, litellm:<model>, openai:<model> or <module>:<attr>")


class _LiteLLM:
    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, prompt: Any) -> str:
        import litellm  # optional dependency: pip install 'fastslow[api]'

        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        reply = litellm.completion(model=self.model, messages=messages)
        return reply.choices[0].message.content

    def __repr__(self) -> str:  # never show credentials, only the model name
        return f"LiteLLM({self.model})"


class GuardedReflector:
    """Wraps a reflection model: timeout per call, bounded retries, garbage rejected, faults counted.

    After ``retries`` failures a call raises :class:`ReflectionError`; GEPA then skips that proposal.
    ``consecutive_failures`` lets the round driver end a round whose reflector keeps failing.
    """

    def __init__(self, lm: ReflectionLM, *, retries: int = 2, timeout_s: float = 120.0) -> None:
        self.lm, self.retries, self.timeout_s = lm, retries, timeout_s
        self.calls = 0
        self.errors = 0
        self.consecutive_failures = 0

    def __call__(self, prompt: Any) -> str:
        self.calls += 1
        last: BaseException | None = None
        for _ in range(self.retries + 1):
            try:
                reply = call_with_timeout(self.lm, prompt, timeout_s=self.timeout_s)
                if not isinstance(reply, str) or not reply.strip():
                    raise ReflectionError(f"reflection model returned {type(reply).__name__} {reply!r:.60}")
                self.consecutive_failures = 0
                return reply
            except Exception as exc:  # noqa: BLE001 - any fault of the model is counted and retried
                self.errors += 1
                last = exc
        self.consecutive_failures += 1
        raise ReflectionError(f"reflection failed after {self.retries + 1} tries: {last}") from last
