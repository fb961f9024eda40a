"""``fastslow demo``: RL, GEPA-only, memory-only, FST and FST with memory on the micro world's three-task stream,
then probes and a report.

    1. rl, gepa, memory, fst, fst+memory on the stream (weights, optimizer, population, memory carry across stages)
    2. plasticity probe: fresh RL on the held-out task from each method's final weights and from the base
    3. channel attribution: {base, trained} weights x {seed, evolved} prompt, per task
    4. report.html with the plots

Layout: ``OUT/{rl,gepa,memory,fst,fst+memory}/`` run dirs, ``OUT/probes/<arm>/``, ``OUT/plasticity.json``,
``OUT/attribution.json``, ``OUT/report.html``, ``OUT/plots/``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastslow.checkpoint import write_json_atomic
from fastslow.config import Config, config_from_dict
from fastslow.pool import Watch, Workers
from fastslow.probes import channel_attribution, probe_config, probe_result
from fastslow.tasks import load_task

# Along the drift axis: rl (weights only), fst (both), fst+memory (weights + experience memory), gepa and memory
# (frozen weights: a prompt population, an experience memory).
METHODS = ("rl", "gepa", "memory", "fst", "fst+memory")


def demo_config(method: str, *, quick: bool, seed: int, out: Path, steps: int | None = None,
                eval_n: int | None = None) -> Config:
    """The demo's settings (also in configs/demo.yaml): about 5 minutes on 2 CPU cores with two workers."""
    from fastslow.world.tasks import STREAM

    steps = steps or (12 if quick else 90)
    every = min(6 if quick else 10, steps)
    return config_from_dict(
        {
            "method": method.partition("+")[0],
            "model": {"path": "micro"},
            "stages": [{"task": f"micro/{name}", "steps": steps} for name in STREAM],
            "slow": {"batch_problems": 8, "group_size": 8, "lr": 3e-4, "warmup_steps": 5, "max_new_tokens": 20},
            "fast": {"every": every, "population": 4, "budget": 48 if quick else 64, "val_size": 12,
                     "reflector": "micro", "kind": method.partition("+")[2] or None,
                     # The micro model never saw worked examples in pretraining: shown cases cost it reward
                     # (memory-only, quick demo: ACC 0.42 with 2 cases per context vs 0.64 without).
                     "memory": {"cases_per_context": 0}},
            "drift": {"every": every, "probe_size": 16, "max_new_tokens": 20},
            "eval": {"every": every, "n": eval_n or (48 if quick else 96)},
            "checkpoint_every": steps,
            "seed": seed,
            "out": str(out),
        }
    )


def chosen_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` in the demo's order; ValueError naming the choices for an unknown name or none."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"{', '.join(unknown) or 'none given'}: choose from {','.join(METHODS)}")
    return [m for m in METHODS if m in methods]


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, methods: Sequence[str] = METHODS,
             stage_steps: int | None = None, probe_steps: int | None = None, eval_n: int | None = None,
             workers: int = 1, run: Callable[..., dict] | None = None, watch: Watch | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run everything into ``out``; returns {"report": path, "wall_s": seconds, ...}.

    ``methods``: a subset of :data:`METHODS` (the report shows only these, whatever else ``out`` holds).

    ``stage_steps``/``probe_steps``/``eval_n`` shrink the demo further (tests). With ``workers`` > 1 the runs and
    probes train that many at a time in worker processes (:mod:`fastslow.pool`; the same metrics as one at a time),
    relaying their steps to ``watch(label, done, total, row)``; with 1 they train here, through
    ``run(cfg, label=..., force=...)`` (the CLI passes one that drives its progress display).
    """
    from fastslow.report import build_report
    from fastslow.world.tasks import HELDOUT

    methods = chosen_methods(methods)
    if run is None:
        from fastslow.loop import train

        def run(cfg, label=None, **kw):
            return train(cfg, **kw)

    def train_all(jobs: list[tuple[str, Config]]) -> None:
        if pool is not None:
            # the longest (fst, fst+memory) first: the last job to start ends about when the others do
            pool.train(sorted(jobs, key=lambda job: job[1].method != "fst"), watch)
        else:
            for label, cfg in jobs:
                run(cfg, force=True, label=label)

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    probe_steps = probe_steps or (10 if quick else 30)
    template = demo_config("rl", quick=quick, seed=seed, out=out / "probes", steps=stage_steps, eval_n=eval_n)
    template = template.model_copy(update={"eval": template.eval.model_copy(update={"every": min(5, probe_steps)})})
    heldout = f"micro/{HELDOUT}"

    def probe(arm: str, start: str | Path) -> tuple[str, Config]:
        return f"probe {arm}", probe_config(start, heldout, probe_steps, template, out / "probes" / arm)

    probed = [m for m in methods if m != "memory"]  # memory's weights are the base's
    with Workers(workers) if workers > 1 else contextlib.nullcontext() as pool:
        # 1. the methods on the stream, and the base's probe (it needs no run)
        train_all([(m, demo_config(m, quick=quick, seed=seed, out=out / m, steps=stage_steps, eval_n=eval_n))
                   for m in methods] + [probe("base", "base")])
        # 2. plasticity probes from each method's final weights
        train_all([probe(m, out / m) for m in probed])
    arms = {"base": probe_result("base", out / "probes" / "base")}
    for m in methods:
        arms[m] = ({**arms["base"], "start": f"{out / m} (frozen weights: the base probe)"} if m not in probed
                   else probe_result(out / m, out / "probes" / m))
    write_json_atomic(out / "plasticity.json", {"task": HELDOUT, "steps": probe_steps, "arms": arms})

    tasks = {t.name: t for t in (load_task(s.task) for s in template.stages)}
    attribution = {m: channel_attribution(out / m, template.model, tasks, n=template.eval.n, seed=seed)
                   for m in methods}
    write_json_atomic(out / "attribution.json", attribution)

    report = build_report([out / m for m in methods], out)
    wall = time.perf_counter() - t0
    result = {"report": str(report), "wall_s": wall, "quick": quick, "seed": seed, "workers": workers,
              "methods": methods}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    log(f"report: {report}  ({wall / 60:.1f} min)")
    return result
