"""Run a call with a wall-clock limit, so a hung plug-in (verifier, reflection model) costs one call."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
    """``fn(*args)``, or TimeoutError after ``timeout_s``. A hung call is left in a daemon thread:
    Python cannot kill a thread, and leaving it costs less than losing the run."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"call exceeded {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
