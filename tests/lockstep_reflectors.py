"""Reflection models for the two-process lockstep tests (tests/trl_worker.py): each counts its calls in
this process, so a test can tell which ranks called the model."""

from __future__ import annotations

import os

calls = 0


def per_process_reflector(prompt) -> str:
    """Replies differ per rank and per call: ranks that each called it would evolve different prompts."""
    global calls
    calls += 1
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    current = text.split("```", 2)[1].strip()
    return f"```\n{current} Hint {os.environ.get('RANK', '0')}-{calls}: reverse it.\n```"


def failing_reflector(prompt) -> str:
    global calls
    calls += 1
    raise RuntimeError(f"reflection service down (call {calls} in process {os.getpid()})")
