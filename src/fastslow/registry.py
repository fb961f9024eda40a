"""One registry of model aliases, task specs and reflector kinds; worlds and task families register here.

The core (loop, channels, policy) resolves names through this module and never imports a particular
world. A plug-in is a module that calls ``register_*`` at import time. Plug-ins are found, on the first
lookup, through the ``fastslow.plugins`` entry-point group (``pyproject.toml``) and the ``FASTSLOW_PLUGINS``
environment variable (comma-separated module names, for plug-ins that are not packaged).

Task specs: a key ending in ``/`` or ``:`` is a prefix (``micro/flip``, ``jsonl:data.jsonl``, ``rg:codeio``)
and its factory receives the rest of the spec; any other key is an exact name (``codeio``, ``humaneval``).
The longest matching key wins; ``<module>:<attr>`` is the fallback (see :func:`fastslow.tasks.load_task`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "fastslow.plugins"

ModelResolver = Callable[[], str]  # returns a local directory loadable by AutoModelForCausalLM
TaskFactory = Callable[[str], Any]  # rest of the spec -> a Task
ReflectorFactory = Callable[[str, Any], Any]  # (rest of the spec, FastConfig or None) -> a reflection LM

_models: dict[str, tuple[ModelResolver, str]] = {}
_tasks: dict[str, tuple[TaskFactory, str]] = {}
_reflectors: dict[str, tuple[ReflectorFactory, str]] = {}
_engines: dict[str, tuple[Callable, str]] = {}
_loaded = False


class PluginError(ImportError):
    """A plug-in module named by an entry point or FASTSLOW_PLUGINS cannot be imported."""


def register_model(alias: str, resolve: ModelResolver, help: str = "") -> None:
    """``model.path: <alias>`` resolves to ``resolve()`` (a local directory)."""
    _models[alias] = (resolve, help)


def register_task(key: str, factory: TaskFactory, help: str = "") -> None:
    """``key`` ending in '/' or ':' is a prefix (factory gets the rest of the spec); otherwise an exact name."""
    _tasks[key] = (factory, help)


def register_reflector(key: str, factory: ReflectorFactory, help: str = "") -> None:
    """``fast.reflector`` spec: ``key`` ending in ':' is a prefix, otherwise an exact name."""
    _reflectors[key] = (factory, help)


def register_engine(name: str, spec: Any, help: str = "") -> None:
    """``engine: <name>``: ``spec`` is a :class:`fastslow.channels.EngineSpec` (build, describe, launch checks)."""
    _engines[name] = (spec, help)


def load_plugins() -> None:
    """Import every plug-in module once (entry points first, then FASTSLOW_PLUGINS)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    names = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [m.strip() for m in os.environ.get("FASTSLOW_PLUGINS", "").split(",") if m.strip()]
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is the user's environment: one line
            from fastslow.util import one_line

            raise PluginError(f"fastslow plug-in {name!r} failed to import: {one_line(exc)}") from None


def _match(table: dict[str, tuple[Callable, str]], spec: str) -> tuple[Callable, str] | None:
    """(factory, rest of spec) of the longest key matching ``spec``, or None."""
    load_plugins()
    if spec in table and not spec.endswith(("/", ":")):
        return table[spec][0], ""
    prefixes = [k for k in table if k.endswith(("/", ":")) and spec.startswith(k)]
    if not prefixes:
        return None
    key = max(prefixes, key=len)
    return table[key][0], spec[len(key):]


def resolve_model(path: str) -> str:
    """A registered alias -> its local directory; anything else (a directory or hub id) unchanged."""
    load_plugins()
    if path in _models:
        return _models[path][0]()
    return path


def task_factory(spec: str) -> tuple[TaskFactory, str] | None:
    return _match(_tasks, spec)


def reflector_factory(spec: str) -> tuple[ReflectorFactory, str] | None:
    return _match(_reflectors, spec)


def engine_spec(name: str) -> Any | None:
    """The :class:`fastslow.channels.EngineSpec` registered as ``name``, or None."""
    load_plugins()
    return _engines[name][0] if name in _engines else None


def listing() -> dict[str, dict[str, str]]:
    """Everything registered, with its help line (for ``--help`` texts and error messages)."""
    load_plugins()
    return {
        "models": {k: h for k, (_, h) in _models.items()},
        "tasks": {k: h for k, (_, h) in _tasks.items()},
        "reflectors": {k: h for k, (_, h) in _reflectors.items()},
        "engines": {k: h for k, (_, h) in _engines.items()},
    }


def known(kind: str) -> str:
    """Comma-separated registered keys of ``kind`` ('models', 'tasks', 'reflectors', 'engines')."""
    return ", ".join(f"{k}<...>" if k.endswith(("/", ":")) else k for k in listing()[kind])
