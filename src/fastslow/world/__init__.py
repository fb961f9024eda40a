"""The embedded micro world: instruction language, tiny base model, tasks and an offline reflector.

- :mod:`fastslow.world.language`: string transforms x answer formats, with English paraphrases.
- :mod:`fastslow.world.build`: character tokenizer + a 0.49 M-parameter Llama pretrained on
  ``context + input -> output`` chats; ``build_base`` rebuilds it, ``base/`` ships it.
- :mod:`fastslow.world.tasks`: ``micro_task(name)``, ``MICRO_TASKS``, ``STREAM``, ``HELDOUT`` (prompt-dominant)
  and ``WEIGHT_TASKS``, ``WEIGHT_STREAM``, ``WEIGHT_HELDOUT`` (weight-dominant).
- :mod:`fastslow.world.reflector`: ``MicroReflector``, a deterministic GEPA ``reflection_lm``.
- :mod:`fastslow.world.check`: ``check_world``, the properties the design asks of this world.

Imports here are lazy on purpose: importing the reflector must not import the tasks (hidden specs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent / "base"


def base_model_path() -> str:
    """Directory of the shipped micro base model (loadable with ``AutoModelForCausalLM``/``AutoTokenizer``)."""
    return str(BASE_DIR)


def build_base(out_dir: Path, seed: int = 0, steps: int | None = None) -> dict:
    """Rebuild the micro base model deterministically (see :func:`fastslow.world.build.build_base`)."""
    from fastslow.world.build import build_base as _build

    return _build(Path(out_dir), seed=seed, steps=steps)


def check_world(model_path: str | None = None, n: int = 200, seed: int = 0, rl_steps: int = 0,
                tasks: list[str] | None = None) -> dict[str, Any]:
    """Per-task regime, rewards with the seed prompt, the rule text and the reflector's proposal, and the
    regime's baseline properties (``rl_steps`` > 0: with an RL baseline run on weight-dominant tasks);
    ``tasks`` restricts it to those micro tasks (default: all)."""
    from fastslow.world.check import check_world as _check

    return _check(model_path=model_path, n=n, seed=seed, rl_steps=rl_steps, tasks=tasks or None)


def _register() -> None:
    """The micro world as a plug-in: model alias ``micro``, tasks ``micro/<name>``, reflector ``micro``."""
    from fastslow import registry

    def task(name: str):
        from fastslow.world.tasks import micro_task

        return micro_task(name)

    def reflector(rest: str, cfg: Any = None):
        from fastslow.world.reflector import MicroReflector

        return MicroReflector()

    registry.register_model("micro", base_model_path, "the embedded micro-world base model (0.49 M params)")
    registry.register_task("micro/", task, "a task of the embedded micro world")
    registry.register_reflector("micro", reflector, "the micro world's offline, deterministic reflector")


_register()

__all__ = ["BASE_DIR", "base_model_path", "build_base", "check_world"]
