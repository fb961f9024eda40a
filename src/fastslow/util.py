"""Small helpers every module may import: stable seeds, secret redaction, one-line error text."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


_MIN_NAMED_SECRET_LEN = 4  # a variable a config names as a key is masked whatever its value looks like
_named_secret_envs: set[str] = set()


def add_secret_env(name: str) -> None:
    """Mask the value of the environment variable ``name`` everywhere from now on (a config's key env, e.g.
    ``fast.reflector_key_env: MYKEY``), whatever its name or its value's shape."""
    if name:
        _named_secret_envs.add(name)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names end in _KEY/_TOKEN/_SECRET/_PASSWORD, or that a config
    named as a key (:func:`add_secret_env`), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if k.upper().endswith(SECRET_ENV_SUFFIXES) and len(v) >= _MIN_SECRET_LEN}
    values |= {env[k] for k in _named_secret_envs if len(env.get(k) or "") >= _MIN_NAMED_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with secret env values and key-shaped strings (``sk-...``, ``hf_...``) masked as ``***``."""
    text = str(text)
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


# Terminal control: ANSI CSI / OSC sequences and other control characters (a remote error body or a path
# may carry them; printed raw they could rewrite the user's terminal).
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clearing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks
    r"|\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # other escapes and control characters (not \t, \n)
)


def clean(text: str) -> str:
    """``text`` redacted, with terminal escape sequences and control characters removed (newlines and tabs kept)."""
    return _CONTROL.sub("", redact(text))


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error as one redacted line of at most ``limit`` characters (user input is quoted, never dumped)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    line = " ".join(clean(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_every_s() -> float:
    """Seconds between plain progress lines (``FASTSLOW_PROGRESS_EVERY_S``, default 10; 0: every update)."""
    try:
        return max(0.0, float(os.environ.get("FASTSLOW_PROGRESS_EVERY_S", 10)))
    except ValueError:
        return 10.0


def die_with_parent(sig: int = 15, parent: int | None = None) -> None:
    """Linux: this process gets ``sig`` (SIGTERM) when its parent dies, so the processes of ``fastslow launch``
    end together. ``parent``: the pid the parent must have; one that already died (before this call) counts."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def launched_rank() -> int:
    """This process's rank as torchrun / accelerate launch announce it (0 when started alone), known before
    any engine is built (the run-dir lock is taken by rank 0 only)."""
    return int(os.environ.get("RANK", "0"))
