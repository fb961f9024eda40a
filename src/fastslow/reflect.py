"""Reflection models for the fast channel, and a guard that keeps their faults from costing a run.

A reflection model is anything GEPA accepts as ``reflection_lm``: a callable taking the reflection
prompt (a string, or chat messages) and returning the reply text (the new prompt inside ``` ```).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fastslow.config import ConfigError
from fastslow.guard import call_with_timeout
from fastslow.util import one_line, redact

ReflectionLM = Callable[[Any], str]


class ReflectionError(RuntimeError):
    """A reflection call failed after its retries."""


def make_reflector(spec: str, cfg: Any = None) -> ReflectionLM:
    """Resolve ``FastConfig.reflector`` through :mod:`fastslow.registry` (``cfg``: the FastConfig, if any).

    Built in: ``litellm:<model>`` (via litellm), and from :mod:`fastslow.reflectors`: ``feedback`` (no LM),
    ``hf:<model>``, ``openai:<model>`` (any OpenAI-compatible server; keys read from the environment, never
    stored), ``replay:<file>``. Plug-ins add more (the micro world adds ``micro``). ``fast.reflection_record`` /
    ``fast.reflection_replay`` wrap any of them.
    Fallback: ``<module>:<attr>``, an importable callable (or a zero-argument factory of one).
    """
    from fastslow import registry
    from fastslow.reflectors import wrap_record_replay

    found = registry.reflector_factory(spec)
    if found is not None:
        factory, rest = found
        return wrap_record_replay(factory(rest, cfg), cfg)
    kind, _, name = spec.partition(":")
    if kind and name:
        try:
            obj = getattr(importlib.import_module(kind), name)
        except Exception as exc:  # noqa: BLE001 - the user's module failing at import: one redacted line
            raise ConfigError(f"field 'fast.reflector': cannot import {spec!r}: {one_line(exc)}") from None
        if isinstance(obj, type) or getattr(obj, "__code__", None) and obj.__code__.co_argcount == 0:
            try:
                obj = obj()
            except Exception as exc:  # noqa: BLE001 - a broken factory is bad input, reported in one line
                raise ConfigError(f"field 'fast.reflector': {spec!r} failed to build: {one_line(exc)}") from None
        if not callable(obj):
            raise ConfigError(f"field 'fast.reflector': {spec!r} is not callable")
        return wrap_record_replay(obj, cfg)
    raise ConfigError(
        f"field 'fast.reflector': unknown reflector {spec!r}: use one of {registry.known('reflectors')} "
        "or <module>:<attr>"
    )


def _litellm_factory(prefix: str) -> Callable[[str, Any], ReflectionLM]:
    def build(name: str, cfg: Any = None) -> ReflectionLM:
        if not name:
            raise ConfigError(f"field 'fast.reflector': {prefix}: needs a model name, e.g. {prefix}:gpt-4o-mini")
        return _LiteLLM(name if prefix == "litellm" else f"openai/{name}")

    return build


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


def propose_from(reply: str) -> str:
    """The prompt GEPA takes from a reflection reply (its own extractor: first to last fence, or the whole reply)."""
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    return InstructionProposalSignature.output_extractor(reply)["new_instruction"]


class GuardedReflector:
    """Wraps a reflection model: timeout per call, bounded retries, garbage rejected, faults counted.

    After ``retries`` failures a call raises :class:`ReflectionError`; GEPA then skips that proposal.
    After ``max_consecutive_failures`` failed calls in a row the guard is ``exhausted``: the round driver
    ends the round (the population is kept) and :meth:`new_round` starts counting again.
    ``last_error`` is the latest fault as one redacted line (for the run log); error text never carries keys.
    """

    def __init__(self, lm: ReflectionLM, *, retries: int = 2, timeout_s: float = 120.0,
                 max_consecutive_failures: int = 3, max_reply_chars: int = 50_000,
                 max_prompt_chars: int = 8_000) -> None:
        self.lm, self.retries, self.timeout_s = lm, retries, timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        # Size caps: a 10 MB reply would stall GEPA's parsing and every later rollout of the prompt it yields.
        self.max_reply_chars, self.max_prompt_chars = max_reply_chars, max_prompt_chars
        self.calls = 0
        self.errors = 0  # failed tries (retries included)
        self.failed_calls = 0  # calls that raised after all their tries
        self.consecutive_failures = 0
        self.last_error: str | None = None

    @property
    def exhausted(self) -> bool:
        """True once ``max_consecutive_failures`` calls in a row have failed (until :meth:`new_round`)."""
        return self.consecutive_failures >= self.max_consecutive_failures

    def new_round(self) -> None:
        self.consecutive_failures = 0

    def __call__(self, prompt: Any) -> str:
        self.calls += 1
        for _ in range(self.retries + 1):
            try:
                reply = call_with_timeout(self.lm, prompt, timeout_s=self.timeout_s)
                if not isinstance(reply, str) or not reply.strip():
                    raise ReflectionError(f"reflection model returned {type(reply).__name__} {reply!r:.60}")
                if len(reply) > self.max_reply_chars:
                    raise ReflectionError(f"reply of {len(reply)} characters exceeds fast.max_reply_chars="
                                          f"{self.max_reply_chars}")
                proposal = propose_from(reply)  # the size of what GEPA will take as the new prompt
                if len(proposal.strip()) > self.max_prompt_chars:
                    raise ReflectionError(f"proposed prompt of {len(proposal.strip())} characters exceeds "
                                          f"fast.max_prompt_chars={self.max_prompt_chars}")
                self.consecutive_failures = 0
                # A reply may quote the key (a hostile or echoing server): nothing downstream (prompts,
                # state, summary, report) may carry it.
                return redact(reply)
            except Exception as exc:  # noqa: BLE001 - any fault of the model is counted and retried
                self.errors += 1
                # The text may quote an API key (client errors often do): only a redacted copy is kept, and
                # the original exception is not chained, so no traceback printer can show it either.
                self.last_error = one_line(f"{type(exc).__name__}: {exc}", 300)
        self.consecutive_failures += 1
        self.failed_calls += 1
        raise ReflectionError(f"reflection failed after {self.retries + 1} tries: {self.last_error}") from None


def _register_builtins() -> None:
    from fastslow import registry

    registry.register_reflector("litellm:", _litellm_factory("litellm"), "any litellm model (keys from the env)")
    from fastslow.reflectors import register

    register()  # feedback, hf:, openai: (an OpenAI-compatible server, no litellm needed), replay:


_register_builtins()
