"""Fail before spending compute: what a run needs is checked before step 0, and a dead fast channel stops it.

:func:`check_model` runs before the weights load; :func:`check_reflector` makes one short real call to the
reflection model (``fast.preflight: false`` skips it). Each failure is a :class:`ConfigError` whose one line
names the field and what to do. :class:`ReflectionHealth` counts reflection faults per round and says when
``fast.stop_after_failed_rounds`` consecutive rounds had every reflection call fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastslow.config import Config, ConfigError, FastConfig
from fastslow.guard import call_with_timeout
from fastslow.util import one_line

PROBE_PROMPT = (
    "I provided an assistant with the following instructions to perform a task for me:\n```\n"
    "Answer the question.\n```\n\nWrite a better instruction for the assistant. "
    "Provide the new instructions within ``` blocks."
)


def check_model(cfg: Config) -> str:
    """``model.path`` -> a local folder holding a model, or a hub id when the hub may be used. Returns it."""
    return check_model_spec(cfg.model.path, f"field 'model.path' {cfg.model.path!r}")


def check_model_spec(spec: str, field: str) -> str:
    """A model alias, folder or hub id -> a local folder holding a model, or a hub id when the hub may be used.

    Raises :class:`ConfigError` naming ``field`` (one line) when neither is there.
    """
    from fastslow.registry import resolve_model

    try:
        path = resolve_model(spec)
    except FileNotFoundError as exc:  # an alias not installed yet: its message says which command installs it
        raise ConfigError(f"{field}: {one_line(exc)}") from None
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{field}: {local} has no config.json: not a Hugging Face model folder")
        return str(local)
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not local.suffix
    if not looks_like_id or local.exists():
        raise ConfigError(f"{field}: no model folder at {local} (for the packaged models: `fastslow models list`)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError(f"{field}: no model folder at {local}, and as a hub id it needs the hub, which is off "
                          "(HF_HUB_OFFLINE=1): give a model folder, `fastslow models fetch <name>` (see "
                          "`fastslow models list`), or set HF_HUB_OFFLINE=0 to download")
    return path


def _advice(error: str, spec: str) -> str:
    if "No module named 'litellm'" in error:
        return "litellm is not installed: pip install 'fastslow[api]' (or openai:<model> + fast.reflector_base_url)"
    if "Connection refused" in error or "Name or service not known" in error or "urlopen error" in error:
        return f"{error} (is the server up? is there a network?)"
    return error


def check_reflector(fast: FastConfig, lm: Any) -> None:
    """One short real call to the reflection model; a fault or an empty reply is a one-line ConfigError."""
    if not fast.preflight:
        return
    spec = fast.reflector
    try:
        reply = call_with_timeout(lm, PROBE_PROMPT, timeout_s=fast.reflection_timeout_s)
    except Exception as exc:  # noqa: BLE001 - whatever the reflector raises, the run must not start
        error = one_line(f"{type(exc).__name__}: {exc}")
        raise ConfigError(f"field 'fast.reflector' {spec}: test call failed: {_advice(error, spec)} "
                          "(fast.preflight: false skips this check)") from None
    if not isinstance(reply, str) or not reply.strip():
        raise ConfigError(f"field 'fast.reflector' {spec}: test call returned {type(reply).__name__} "
                          f"{one_line(repr(reply), 60)}, not text")


class ReflectionHealth:
    """Per-round reflection bookkeeping for the loop: totals, and the streak of rounds where every call failed.

    A round with no reflection call neither extends nor breaks the streak.
    """

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.calls = self.failed_calls = self.accepted = self.rounds_nothing_accepted = self.streak = 0

    def record(self, calls: int, failed: int, accepted: int) -> bool:
        """Count one round; True when the run should stop (``stop_after`` all-failed rounds in a row)."""
        self.calls += calls
        self.failed_calls += failed
        self.accepted += accepted
        self.rounds_nothing_accepted += accepted == 0
        if calls:
            self.streak = self.streak + 1 if failed >= calls else 0
        return bool(self.stop_after) and self.streak >= self.stop_after

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update({k: v for k, v in state.items() if k in vars(self)})

    def summary(self) -> dict[str, int]:
        return {"reflection_calls": self.calls, "reflection_errors": self.failed_calls,
                "accepted_total": self.accepted, "rounds_nothing_accepted": self.rounds_nothing_accepted}
