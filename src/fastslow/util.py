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


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error as one redacted line of at most ``limit`` characters (user input is quoted, never dumped)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    line = redact(" ".join(text.split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def launched_rank() -> int:
    """This process's rank as torchrun / accelerate launch announce it (0 when started alone), known before
    any engine is built (the run-dir lock is taken by rank 0 only)."""
    return int(os.environ.get("RANK", "0"))
