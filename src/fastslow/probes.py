"""Probes of a trained run: plasticity (can it still learn?) and channel attribution (which channel gained?).

- Plasticity: from a checkpoint (or the base), a *fresh* RL run of fixed budget on a held-out task;
  plasticity = its final eval reward and the normalised area under its eval curve.
- Attribution (the paper's 2x2): reward of {base, trained} weights x {seed prompt, evolved best prompt}.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastslow.checkpoint import run_weights
from fastslow.config import Config, ModelConfig, StageConfig
from fastslow.policy import Policy
from fastslow.rollout import PolicySampler, score_prompt
from fastslow.tasks import Task
from fastslow.util import derive_seed


def area_under_curve(curve: list[tuple[float, float]]) -> float:
    """Trapezoid area under (step, reward), divided by the step range: a mean reward over the probe."""
    if len(curve) < 2:
        return curve[0][1] if curve else 0.0
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def plasticity_probe(start: str | Path, task: str, steps: int, template: Config, out: Path, *, run=None) -> dict:
    """Fresh ``rl`` on ``task`` for ``steps`` from ``start`` ('base', a run dir, or a model dir).

    ``template`` supplies everything else (model LoRA/dtype, slow/eval settings, seed). The probe's
    weights are a *new* base: its own drift numbers are relative to ``start``. ``run`` is the
    function that trains a config (default :func:`fastslow.loop.train`; the CLI passes its progress bar).
    """
    if run is None:
        from fastslow.loop import train as run
    run(probe_config(start, task, steps, template, out), force=True)
    return probe_result(start, out)


def probe_config(start: str | Path, task: str, steps: int, template: Config, out: Path) -> Config:
    """The config a plasticity probe trains (see :func:`plasticity_probe`)."""
    if str(start) == "base":
        model_path = template.model.path
    elif (Path(start) / "checkpoints").is_dir():
        model_path = str(run_weights(start))
    else:
        model_path = str(start)
    if template.model.lora is not None and str(start) != "base":
        raise ValueError("plasticity probes from LoRA checkpoints need the adapter merged first; use full weights")
    cfg = template.model_copy(
        update={
            "method": "rl",
            "model": ModelConfig(**{**template.model.model_dump(), "path": model_path}),
            "stages": [StageConfig(task=task, steps=steps)],
            "out": str(out),
        }
    )
    return Config.model_validate(cfg.model_dump())


def probe_result(start: str | Path, out: Path) -> dict:
    """A finished probe's {start, final, auc, curve} from its run dir ``out``."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    name = json.loads((Path(out) / "summary.json").read_text())["tasks"][0]
    curve = [(r["step"], r[f"eval/{name}/reward"]) for r in rows if f"eval/{name}/reward" in r]
    return {"start": str(start), "final": curve[-1][1], "auc": area_under_curve(curve), "curve": curve}


def _mean_reward(sample: PolicySampler, task: Task, prompt: str, n: int, max_new_tokens: int, seed: int) -> float:
    return score_prompt(sample, task, prompt, n, max_new_tokens=max_new_tokens,
                        seed=derive_seed(seed, "attribution", task.name)).mean_reward


def channel_attribution(run_dir: str | Path, base: ModelConfig, tasks: dict[str, Task], *, n: int = 64,
                        max_new_tokens: int = 24, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per task: {base,trained} weights x {seed, evolved best} prompt, greedy on the eval split."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    best = summary.get("best_prompts", {})
    # One load: the trained policy carries its base (frozen copy, or the adapter disabled for LoRA).
    policy = Policy.load(base, weights=run_weights(run_dir))
    samplers = {"base": PolicySampler(policy, use_base=True), "trained": PolicySampler(policy)}
    out: dict[str, dict[str, float]] = {}
    for name, task in tasks.items():
        evolved = best.get(name, task.seed_prompt)
        cell = {}
        for weights, sample in samplers.items():
            cell[f"{weights}_seed"] = _mean_reward(sample, task, task.seed_prompt, n, max_new_tokens, seed)
            cell[f"{weights}_evolved"] = (
                cell[f"{weights}_seed"] if evolved == task.seed_prompt
                else _mean_reward(sample, task, evolved, n, max_new_tokens, seed)
            )
        out[name] = cell
    return out
