"""RL lift per micro task, through the engine: `rl` from the seed prompt with the demo's slow settings.

Prints one JSON line per task: greedy eval curve (seed prompt), lift, steps to +0.3, seconds per slow step.
`--stream` trains the STREAM tasks in turn instead and prints the accuracy matrix (RL-only forgetting).

    .venv/bin/python benchmarks/world_rl_lift.py --tasks flip caesar --steps 100
    .venv/bin/python benchmarks/world_rl_lift.py --stream --steps 90
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fastslow.config import load_config
from fastslow.loop import train
from fastslow.world.tasks import MICRO_TASKS, STREAM

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_rl(tasks: list[str], args: argparse.Namespace, out: Path) -> tuple[dict, list[dict]]:
    stages = ", ".join(f"{{task: micro/{t}, steps: {args.steps}}}" for t in tasks)
    cfg = load_config(DEMO, [
        "method=rl", f"stages=[{stages}]", f"slow.lr={args.lr}", f"eval.every={args.eval_every}",
        f"drift.every={args.eval_every}", f"eval.n={args.n_eval}", f"seed={args.seed}", f"out={out}",
    ])
    summary = train(cfg, force=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=MICRO_TASKS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--n-eval", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="train the STREAM tasks in turn, print the matrix")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.stream:
            summary, _ = run_rl(STREAM, args, Path(tmp) / "stream")
            print(json.dumps({"stream": STREAM, "steps_per_task": args.steps, "base": summary["base_rewards"],
                              "matrix": summary["matrix"], "cl": summary["cl"]}))
            return
        for name in args.tasks:
            _, rows = run_rl([name], args, Path(tmp) / name)
            curve = [(r["step"], round(r[f"eval/{name}/reward"], 4)) for r in rows if f"eval/{name}/reward" in r]
            timing = json.loads((Path(tmp) / name / "timing.json").read_text())
            base = curve[0][1]
            print(json.dumps({
                "task": name, "lift": round(curve[-1][1] - base, 4), "curve": curve,
                "steps_to_lift_0.3": next((s for s, r in curve if r - base >= 0.3), None),
                "s_per_slow_step": round(timing["mean_slow_step_s"], 3),
            }), flush=True)


if __name__ == "__main__":
    main()
