"""Seconds per slow step: native vs trl (1 process) vs trl (2 processes, torchrun/gloo), same shape, interleaved.

    .venv/bin/python benchmarks/engines.py [--model micro] [--model smollm2-135m --lora] [--reps 2] [--steps 4]
                                            [--fsdp2] [--out benchmarks/results/engines.json]

Each arm is a real ``fastslow run`` (method rl, the micro world's flip task) in a fresh process; its
``timing.json`` gives the mean slow step (sampling + verification + update; the first step included).
Arms run A, B, C, A, B, C, ... so that machine load drifts over all of them alike. Evaluation and drift
are pushed past the end so they do not run between steps (they are not part of a slow step anyway).
SmolLM2-135M: convert it first (configs/smollm2-cpu.yaml says how) and pass its directory with --lora.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"native": ("native", 1), "trl-1proc": ("trl", 1), "trl-2proc": ("trl", 2)}
# --fsdp2: two processes with the weights sharded by accelerate's FSDP2 (forced on CPU as in the tests).
FSDP2_ARM = {"trl-2proc-fsdp2": ("trl-fsdp2", 2)}


def arm_command(config: Path, out: Path, engine: str, nproc: int) -> list[str]:
    run = ["--out", str(out), "--set", f"engine={engine.removesuffix('-fsdp2')}"]
    if engine.endswith("-fsdp2"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                str(ROOT / "tests" / "fsdp2_cli.py"), "run", str(config), *run]
    if nproc == 1:
        return [sys.executable, "-m", "fastslow.cli", "run", str(config), *run]
    return [sys.executable, "-m", "fastslow.cli", "launch", "--nproc", str(nproc), str(config), *run]


def write_config(path: Path, model: str, *, lora: bool, steps: int, problems: int, group: int, tokens: int) -> None:
    lora_line = "  lora: {r: 8, alpha: 16, target_modules: all-linear}\n" if lora else ""
    path.write_text(f"""method: rl
model:
  path: '{model}'
{lora_line}stages: [{{task: micro/flip, steps: {steps}}}]
slow: {{batch_problems: {problems}, group_size: {group}, max_new_tokens: {tokens}, lr: 0.0001, warmup_steps: 0,
       kl_coef: 0.001}}
drift: {{every: {steps + 100}, probe_size: 2, max_new_tokens: 4}}
eval: {{every: {steps + 100}, n: 2}}
checkpoint_every: {steps + 100}
threads: 1
seed: 0
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="micro")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--problems", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="Merge the result into this JSON file (keyed by --label).")
    ap.add_argument("--label", default=None, help="Key of this result in --out (default: the model's name).")
    ap.add_argument("--fsdp2", action="store_true", help="Add a two-process arm with FSDP2-sharded weights.")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    arms = {**ARMS, **(FSDP2_ARM if args.fsdp2 else {})}
    samples: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        write_config(config, args.model, lora=args.lora, steps=args.steps, problems=args.problems,
                     group=args.group, tokens=args.tokens)
        for rep in range(args.reps):
            for name, (engine, nproc) in arms.items():
                out = Path(tmp) / f"{name}-{rep}"
                done = subprocess.run(arm_command(config, out, engine, nproc), env=env, cwd=ROOT,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
                timing = json.loads((out / "timing.json").read_text())
                samples[name].append(timing["mean_slow_step_s"])
                print(f"rep {rep} {name}: {timing['mean_slow_step_s']:.3f} s/slow step", file=sys.stderr)
    native = statistics.median(samples["native"])
    result = {
        "model": args.model, "lora": args.lora,
        "shape": {"problems": args.problems, "group": args.group, "max_new_tokens": args.tokens,
                  "steps_per_run": args.steps, "reps": args.reps},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "slow_step_s": {name: {"median": statistics.median(xs), "runs": [round(x, 3) for x in xs],
                               "vs_native": statistics.median(xs) / native} for name, xs in samples.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        table = json.loads(args.out.read_text()) if args.out.exists() else {}
        table[args.label or Path(args.model).name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
