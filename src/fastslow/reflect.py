"""Reflection models for the fast channel, and a guard that keeps their faults from costing a run.

A reflection model is anything GEPA accepts as ``reflection_lm``: a callable taking the reflection
prompt (a string, or chat messages) and returning the reply text (the new prompt inside ``` ```).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from fastslow.config import ConfigError
from fastslow.guard import call_with_timeout

ReflectionLM = Callable[[Any], str]


class ReflectionError(RuntimeError):
    """A reflection call failed after its retries."""


# ---- secrets ------------------------------------------------------------------------------------
# API keys live only in the environment. Error text from plug-ins (an API client's exception, a
# verifier's traceback message) may quote them, so every such text is passed through ``redact`` before
# it is logged, stored in the run dir, or shown to a reflection model.
SECRET_ENV_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
_MIN_SECRET_LEN = 6  # shorter values (e.g. SOME_KEY=1) would mask ordinary words
_SECRET_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9][A-Za-z0-9_\-]{5,}"  # OpenAI / Anthropic style keys (sk-..., sk-proj-..., sk-ant-...)
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face tokens
    r"|(?<=Bearer )[A-Za-z0-9._\-]{12,})"  # bearer tokens quoted from HTTP headers
)
REDACTED = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names end in _KEY/_TOKEN/_SECRET/_PASSWORD, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if k.upper().endswith(SECRET_ENV_SUFFIXES) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with secret env values and key-shaped strings (``sk-...``, ``hf_...``) masked as ``***``."""
    text = str(text)
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


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
            raise ConfigError(f"field 'fast.reflector': cannot import {spec!r}: {exc}") from None
        if isinstance(obj, type) or getattr(obj, "__code__", None) and obj.__code__.co_argcount == 0:
            try:
                obj = obj()
            except Exception as exc:  # noqa: BLE001 - a broken factory is bad input, reported in one line
                raise ConfigError(f"field 'fast.reflector': {spec!r} failed to build: {redact(exc)}") from None
        if not callable(obj):
            raise ConfigError(f"field 'fast.reflector': {spec!r} is not callable")
        return obj
    raise ConfigError(
        f"field 'fast.reflector': unknown reflector {spec!r}: use micro, litellm:<model>, openai:<model> "
        "or <module>:<attr>"
    )


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
    ``last_error`` is the latest fault as one redacted line (for the run log); error text never carries keys.
    """

    def __init__(self, lm: ReflectionLM, *, retries: int = 2, timeout_s: float = 120.0) -> None:
        self.lm, self.retries, self.timeout_s = lm, retries, timeout_s
        self.calls = 0
        self.errors = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None

    def __call__(self, prompt: Any) -> str:
        self.calls += 1
        for _ in range(self.retries + 1):
            try:
                reply = call_with_timeout(self.lm, prompt, timeout_s=self.timeout_s)
                if not isinstance(reply, str) or not reply.strip():
                    raise ReflectionError(f"reflection model returned {type(reply).__name__} {reply!r:.60}")
                self.consecutive_failures = 0
                return reply
            except Exception as exc:  # noqa: BLE001 - any fault of the model is counted and retried
                self.errors += 1
                # The text may quote an API key (client errors often do): only a redacted copy is kept, and
                # the original exception is not chained, so no traceback printer can show it either.
                self.last_error = redact(" ".join(f"{type(exc).__name__}: {exc}".split()))[:300]
        self.consecutive_failures += 1
        raise ReflectionError(f"reflection failed after {self.retries + 1} tries: {self.last_error}") from None
