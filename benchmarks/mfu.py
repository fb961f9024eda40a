"""Utilisation: tokens/s, achieved GFLOP/s and their share of a matmul peak measured in the same run, for
sampling, the slow update and the drift meter, on the micro model and SmolLM2-135M (`make bench-mfu`).

    python benchmarks/mfu.py [--models micro,smollm2-135m] [--reps 2] [--out benchmarks/results/mfu.json]

Each model runs one slow step's work at its shipped settings (micro: the demo's 8 problems x 8 rollouts,
4 prompts, 20 tokens, full weights; SmolLM2: configs/smollm2-cpu.yaml, 4 x 4, 2 prompts, 32 tokens, LoRA):

- sampling: ``policy.generate`` of the step's rows (tokens/s = completion tokens generated per second);
- update: ``SlowLearner.step`` on those rows (tokens/s = prompt + completion tokens scored per second);
- drift: one full ``DriftMeter.measure`` (samples from policy and base, exact KL both ways, entropy).

FLOPs are counted, not estimated from a parameter count: a forward hook on every ``nn.Linear`` (LoRA's A and B
included) adds 2 x in x out per row it runs; a backward pass adds one such product for each input gradient
and one for each trained weight's gradient. Attention scores and elementwise work are not counted (a few %
at these lengths), so achieved GFLOP/s is a lower bound. Peak: the best 2048^3 fp32 ``torch.mm`` in this
process with the same threads, measured before and after the phases (the higher is used). Best of ``--reps``
per phase: on a shared machine the best run is the one least disturbed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from fastslow import threads

threads.hygiene()  # before torch loads, as the fastslow command does

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from benchutil import put_section  # noqa: E402

MFU_START, MFU_END = "<!-- mfu:start -->", "<!-- mfu:end -->"


class FlopCounter:
    """Linear-layer FLOPs of every forward (and the backward it implies) while ``active``."""

    def __init__(self, *models) -> None:
        self.fwd = self.bwd = 0
        self.active = False
        for model in models:
            for module in model.modules():
                if type(module) is torch.nn.Linear:
                    module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if not self.active:
            return
        rows = inputs[0].numel() // module.in_features
        flops = 2 * rows * module.in_features * module.out_features
        self.fwd += flops
        if torch.is_grad_enabled() and output.requires_grad:
            self.bwd += flops * ((inputs[0].requires_grad) + module.weight.requires_grad)

    def measure(self, fn):
        """(result, seconds, GFLOP) of ``fn()``."""
        self.fwd = self.bwd = 0
        self.active = True
        t0 = time.perf_counter()
        try:
            out = fn()
        finally:
            self.active = False
        return out, time.perf_counter() - t0, (self.fwd + self.bwd) / 1e9


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n^3 fp32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_config(name: str):
    from fastslow.config import load_config
    from fastslow.demo import demo_config

    if name == "micro":
        return demo_config("fst", quick=False, seed=0, out=Path("/tmp/unused"))
    if name == "smollm2-135m":
        return load_config(ROOT / "configs" / "smollm2-cpu.yaml", [])
    raise SystemExit(f"unknown model {name!r} (micro, smollm2-135m)")


def measure_model(name: str, reps: int) -> dict:
    from fastslow.drift import DriftMeter
    from fastslow.policy import Policy
    from fastslow.slow import Rollouts, SlowLearner
    from fastslow.tasks import load_task

    cfg = model_config(name)
    policy = Policy.load(cfg.model)
    counter = FlopCounter(policy.model, *([policy._base] if policy._base is not None else []))
    task = load_task(cfg.stages[0].task)
    b, g, k = cfg.slow.batch_problems, cfg.slow.group_size, cfg.fast.population
    contexts = [task.seed_prompt] + [f"{task.seed_prompt} (variant {i}: answer carefully.)" for i in range(1, k)]
    problems = list(task.problems("train"))[:b]
    prompts = [policy.format(contexts[i * k // g], p.prompt) for p in problems for i in range(g)]
    probes = [policy.format(task.seed_prompt, p.prompt) for p in list(task.problems("eval"))[: cfg.drift.probe_size]]
    rewards = torch.tensor([[float(i % 2) for i in range(g)] for _ in range(b)])  # no flat group: all rows train
    phases: dict[str, list[dict]] = {"sampling": [], "update": [], "drift": []}
    for rep in range(reps):
        batch, s, gf = counter.measure(lambda rep=rep: policy.generate(
            prompts, temperature=cfg.slow.temperature, max_new_tokens=cfg.slow.max_new_tokens, seed=rep))
        phases["sampling"].append({"s": s, "gflop": gf, "tokens": int(batch.completion_mask.sum())})
        learner = SlowLearner(policy, cfg.slow)
        _, s, gf = counter.measure(lambda learner=learner, batch=batch: learner.step(Rollouts(batch, rewards)))
        tokens = int(batch.prompt_mask.sum() + batch.completion_mask.sum())
        phases["update"].append({"s": s, "gflop": gf, "tokens": tokens})
        meter = DriftMeter(policy, probes, cfg.drift, seed=rep)
        _, s, gf = counter.measure(meter.measure)
        phases["drift"].append({"s": s, "gflop": gf, "tokens": None})
    out = {"params_m": sum(p.numel() for p in policy.model.parameters()) / 1e6,
           "lora": cfg.model.lora is not None, "rows": len(prompts), "contexts": k,
           "max_new_tokens": cfg.slow.max_new_tokens, "probes": len(probes), "phases": {}}
    for phase, runs in phases.items():
        best = min(runs, key=lambda r: r["s"])
        out["phases"][phase] = {"seconds": best["s"], "gflop": best["gflop"], "gflops": best["gflop"] / best["s"],
                                "tokens": best["tokens"],
                                "tokens_per_s": best["tokens"] / best["s"] if best["tokens"] else None,
                                "all_seconds": [r["s"] for r in runs]}
    return out


def readme_table(result: dict) -> str:
    m = result["meta"]
    lines = [MFU_START, "## Utilisation (MFU)", "",
             f"`make bench-mfu` ({m['date']}, {m['threads']} threads on {m['cpus']} usable CPUs, load average "
             f"{m['load'][0]:.1f} at the start). Matmul peak in the same run: **{result['peak_gflops']:.0f} GFLOP/s** "
             "(best 2048^3 fp32 `torch.mm`). Linear-layer FLOPs counted by hooks (attention scores not counted: a "
             "lower bound); best of "
             f"{m['reps']} per phase. The machine is shared, so shares move with the minute.", "",
             "| model | phase | seconds | tokens/s | GFLOP | GFLOP/s | share of peak |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        for phase, p in r["phases"].items():
            tps = f"{p['tokens_per_s']:.0f}" if p["tokens_per_s"] else "-"
            lines.append(f"| {name} ({r['params_m']:.1f} M{', LoRA' if r['lora'] else ''}) | {phase} | "
                         f"{p['seconds']:.2f} | {tps} | {p['gflop']:.1f} | {p['gflops']:.1f} | "
                         f"{p['share_of_peak']:.1%} |")
    lines += ["", "Sampling: completion tokens per second; update: prompt + completion tokens scored per second; "
              "drift: one full measurement (policy and base samples, exact KL both ways).", MFU_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="micro,smollm2-135m")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "mfu.json")
    ap.add_argument("--readme", default=str(HERE / "README.md"), help="where the table goes ('' for nowhere)")
    args = ap.parse_args(argv)
    n_threads = threads.apply(None)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "threads": n_threads,
            "cpus": threads.usable_cpus(), "load": list(os.getloadavg()), "reps": args.reps,
            "torch": torch.__version__}
    peak = matmul_peak()
    models = {}
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        models[name] = measure_model(name, args.reps)
    peak_after = matmul_peak()
    result = {"meta": meta, "peak_gflops": max(peak, peak_after), "peak_gflops_before_after": [peak, peak_after],
              "models": models}
    for r in models.values():
        for p in r["phases"].values():
            p["share_of_peak"] = p["gflops"] / result["peak_gflops"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.readme:
        put_section(Path(args.readme), readme_table(result), "mfu")
    print(readme_table(result))


if __name__ == "__main__":
    main()
