"""Engine conformance: any registered engine held to ``native`` (the reference) on the numbers a run reports.

``fastslow selftest --engine NAME`` runs :func:`selftest` on this machine's hardware with a tiny model and prints,
for each check, the largest relative difference found and the tolerance it must meet:

- ``lr``: the learning rate each of the first updates used (warm-up 2), equal;
- ``drift``: the drift meter on the same weights (reverse and forward KL, weight distance, entropy), 1e-5;
- ``first_update``: with the objectives put on one definition (:data:`ALIGNED`), the whole first update
  vector and the step's metrics, 1e-4;

each over full weights and LoRA, with ``kl_coef`` 0 and > 0 where it matters; and

- ``memory``: the experience memory (``method: memory``, greedy rounds, :func:`lesson_reflector`) on the same
  weights: after two rounds the store and the context every eval problem retrieves (task-aware and
  task-agnostic) identical, the rounds' metrics 1e-5 (a difference in store or contexts counts 1).
 ``tests/test_engine_conformance.py``
runs this and, on whole runs, the metrics rows, kill -9 and ``--resume``, and two processes.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastslow.config import Config, load_config
from fastslow.slow import Rollouts
from fastslow.tasks import Problem, Verdict

# The options that put engine trl on native's definitions (the remaining by-design differences, see ScaleConfig):
# native's advantages and flat groups, native's k3 gradient, TRL's token aggregation on native, temperature 1,
# no weight decay.
ALIGNED = ("scale.advantages=native", "scale.kl_bias_correction=false", "slow.loss_aggregation=tokens",
           "slow.temperature=1.0", "slow.weight_decay=0")
TOLERANCE = {"lr": 0.0, "drift": 1e-5, "first_update": 1e-4, "memory": 1e-5}


class VowelTask:
    """Three-letter words; reward = share of vowels in the completion (dense: groups are rarely flat)."""

    seed_prompt = "Answer."

    def __init__(self, name: str = "vowel", n: int = 48) -> None:
        self.name = name
        rng = random.Random(name)
        words = ["".join(rng.choice("abcdeiou") for _ in range(3)) for _ in range(n)]
        probs = [Problem(f"{name}-{i}", w, w[::-1]) for i, w in enumerate(words)]
        self._split = {"train": probs[: n * 3 // 4], "eval": probs[n * 3 // 4:]}

    def problems(self, split: str) -> list[Problem]:
        return self._split[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = completion.strip()
        reward = sum(c in "aeiou" for c in got) / max(len(got), 1)
        return Verdict(reward, f"output {got!r}: {reward:.2f} vowels")


def vowel_task() -> VowelTask:
    return VowelTask()


def lesson_reflector(prompt: str) -> str:
    """The memory check's reflection model: the instruction plus one lesson named after the whole prompt (the
    round's attempts included), so engines that sampled differently store different lessons."""
    import hashlib

    current = prompt.split("```", 2)[1].strip()
    return f"```\n{current}\nCheck rule {hashlib.sha256(prompt.encode()).hexdigest()[:8]}.\n```"


def rel(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def config(model: str | Path, engine: str, *, lora: bool, kl_coef: float, extra: tuple[str, ...] = ()) -> Config:
    """A small rl config on the tiny model, objectives aligned."""
    sets = [f"engine={engine}", "method=rl", f"model.path={model}", "stages=[{task: 'fastslow.conformance:vowel_task', "
            "steps: 5}]", "slow.batch_problems=2", "slow.group_size=4", "slow.max_new_tokens=6", "slow.lr=0.01",
            f"slow.kl_coef={kl_coef}", "slow.warmup_steps=2", "drift.max_new_tokens=6", "drift.probe_size=4",
            "out=" + tempfile.gettempdir() + "/fastslow-conformance", *ALIGNED, *extra]
    if lora:
        sets.append("model.lora={r: 4}")
    return load_config(None, sets)


def build(cfg: Config, weights: Path | None = None):
    from fastslow import registry

    return registry.engine_spec(cfg.engine).build(cfg, weights)


def fixed_rollouts(policy, task: VowelTask, groups: int, g: int, seed: int = 0) -> Rollouts:
    """Given completions (random letters, unequal lengths) scored by ``task``: the same batch for every engine."""
    rng = random.Random(seed)
    problems = [p for p in task.problems("train")[:groups] for _ in range(g)]
    texts = ["".join(rng.choice("abcdeiou xyz") for _ in range(rng.randint(2, 6))) for _ in problems]
    prompts = [policy.format(task.seed_prompt, p.prompt) for p in problems]
    rewards = torch.tensor([task.verify(p, t).reward for p, t in zip(problems, texts)]).view(groups, g)
    return Rollouts(policy.make_batch(prompts, texts, add_eos=True), rewards)


def _trained(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in policy.trainable_parameters()}


@dataclass
class Check:
    name: str  # lr, drift, first_update
    cell: str  # e.g. "full kl=0"
    max_rel: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance


@contextmanager
def _engines(cfg_engine: Config, cfg_native: Config, weights: Path | None = None) -> Iterator[tuple[Any, Any]]:
    engine, native = build(cfg_engine, weights), build(cfg_native, weights)
    try:
        yield engine, native
    finally:
        engine.close()
        native.close()


def check_lr(model: Path, engine: str, *, lora: bool, updates: int = 3) -> Check:
    """The learning rate of each update (warm-up 2) on the same rollouts."""
    with _engines(config(model, engine, lora=lora, kl_coef=0.0), config(model, "native", lora=lora, kl_coef=0.0)) as (
            eng, nat):
        rollouts = fixed_rollouts(nat.policy, VowelTask(), groups=2, g=4)
        got = [eng.slow.step(rollouts)["slow/lr"] for _ in range(updates)]
        want = [nat.slow.step(rollouts)["slow/lr"] for _ in range(updates)]
    worst = max(rel(a, b) for a, b in zip(got, want))
    return Check("lr", f"{'lora' if lora else 'full'}", worst, TOLERANCE["lr"], f"{engine} {got} native {want}")


def _moved(model: Path, engine_cfg: Config, out: Path) -> Path:
    """Weights moved as training moves them, saved as a checkpoint's ``model/`` dir (an adapter under LoRA)."""
    eng = build(engine_cfg)
    try:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in eng.policy.trainable_parameters():
                p.add_((0.05 * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype))
        eng.policy.save(out)
    finally:
        eng.close()
    return out


def check_drift(model: Path, engine: str, *, lora: bool) -> Check:
    """The drift meter on the same (moved) weights: both KL directions, weight distance and entropy."""
    from fastslow.drift import DriftMeter

    cfg_e = config(model, engine, lora=lora, kl_coef=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = _moved(model, cfg_e, Path(tmp) / "model")
        with _engines(cfg_e, config(model, "native", lora=lora, kl_coef=0.0), weights) as (eng, nat):
            task = VowelTask()
            probes = [nat.policy.format(task.seed_prompt, p.prompt) for p in task.problems("eval")[:4]]
            found = {}
            for name, e in (("engine", eng), ("native", nat)):
                e.policy.version = 1  # past the first update: measured, not taken as the base
                found[name] = DriftMeter(e.policy, probes, cfg_e.drift, seed=0).measure()
    keys = ("drift/kl_rev", "drift/kl_fwd", "drift/weight_l2", "drift/entropy")
    worst = max(rel(found["engine"][k], found["native"][k]) for k in keys)
    detail = ", ".join(f"{k.removeprefix('drift/')} {found['engine'][k]:.6g}/{found['native'][k]:.6g}" for k in keys)
    return Check("drift", "lora" if lora else "full", worst, TOLERANCE["drift"], detail)


def check_first_update(model: Path, engine: str, *, lora: bool, kl_coef: float) -> Check:
    """The whole first update vector (and the step's metrics) on the same rollouts, objectives aligned.

    Both start from the same moved weights (a resumed run), so the KL penalty's gradient is not 0.
    """
    cfg_e = config(model, engine, lora=lora, kl_coef=kl_coef)
    with tempfile.TemporaryDirectory() as tmp, _engines(
            cfg_e, config(model, "native", lora=lora, kl_coef=kl_coef), _moved(model, cfg_e, Path(tmp) / "m")) as (
            eng, nat):
        rollouts = fixed_rollouts(nat.policy, VowelTask(), groups=2, g=4)
        before_e, before_n = _trained(eng.policy), _trained(nat.policy)
        got = eng.slow.step(rollouts, measure_k3=True)
        want = nat.slow.step(rollouts, measure_k3=True)
        after_e, after_n = _trained(eng.policy), _trained(nat.policy)
    names = sorted(before_n)
    d_e = torch.cat([(after_e[n] - before_e[n]).flatten() for n in names])
    d_n = torch.cat([(after_n[n] - before_n[n]).flatten() for n in names])
    vector = float((d_e - d_n).norm() / d_n.norm().clamp(min=1e-30))
    metrics = {k: rel(got[k], want[k]) for k in want if k in got}
    worst_key = max(metrics, key=metrics.get) if metrics else ""
    worst = max(vector, *metrics.values())
    detail = f"update vector {vector:.2e}, worst metric {worst_key} {metrics.get(worst_key, 0.0):.2e}"
    return Check("first_update", f"{'lora' if lora else 'full'} kl={kl_coef:g}", worst, TOLERANCE["first_update"],
                 detail)


def check_memory(model: Path, engine: str, rounds: int = 2) -> Check:
    """Two memory rounds on each engine: the same store, the same retrieved contexts, the same round metrics."""
    task, found = VowelTask(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (engine, "native"):
            cfg = config(model, name, lora=False, kl_coef=0.0, extra=(
                "method=memory", "fast.reflector=fastslow.conformance:lesson_reflector", "fast.val_size=4",
                "fast.budget=8", f"out={tmp}/{name}"))
            eng = build(cfg)
            try:
                metrics = [eng.fast.run_round(task).metrics for _ in range(rounds)]
                contexts = [eng.fast.contexts(task, p, 1, view)[0] for view in ("task", "agnostic")
                            for p in task.problems("eval")]
                found[name] = metrics, contexts, eng.fast.state_dict()["store"]
            finally:
                eng.close()
    (got, ctx_e, store_e), (want, ctx_n, store_n) = found[engine], found["native"]
    worst = max(rel(a[k], b[k]) for a, b in zip(got, want, strict=True) for k in b)
    same = store_e == store_n and ctx_e == ctx_n
    detail = (f"{len(store_n['lessons'])} lessons, {len(store_n['cases'])} cases; store "
              f"{'equal' if store_e == store_n else 'DIFFERS'}, contexts {'equal' if ctx_e == ctx_n else 'DIFFER'}")
    return Check("memory", "frozen", worst if same else 1.0, TOLERANCE["memory"], detail)


def selftest(engine: str, model: Path | None = None) -> list[Check]:
    """Every check of this module for ``engine`` against native, on a tiny model (made here when not given)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from fastslow.tiny import make_tiny_model

            model = make_tiny_model(Path(tmp) / "tiny")
        checks = [check_lr(model, engine, lora=False)]
        for lora in (False, True):
            checks.append(check_drift(model, engine, lora=lora))
        for lora in (False, True):
            for kl in (0.0, 0.01):
                checks.append(check_first_update(model, engine, lora=lora, kl_coef=kl))
        checks.append(check_memory(model, engine))
    return checks


def format_table(checks: list[Check], engine: str) -> str:
    """The checks as a plain-text table: check, cell, max relative difference, tolerance, verdict, detail."""
    lines = [f"{'check':<13} {'cell':<12} {'max rel diff':>12} {'tolerance':>9}  ok   ({engine} vs native)"]
    for c in checks:
        lines.append(f"{c.name:<13} {c.cell:<12} {c.max_rel:>12.3g} {c.tolerance:>9.0e}  {'yes' if c.ok else 'NO '}  "
                     f"{c.detail}")
    return "\n".join(lines)
