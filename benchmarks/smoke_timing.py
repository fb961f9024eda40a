"""Seconds per fst step and per GEPA round for configs/smoke.yaml, and peak memory.

    .venv/bin/python benchmarks/smoke_timing.py [--model micro|tiny] [--threads N]

`tiny` is the random model the tests make (fastslow.tiny); `micro` the shipped micro-world base.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fastslow.config import load_config
from fastslow.loop import train
from fastslow.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"out={tmp}/run"]
        if args.model == "tiny":
            overrides.append(f"model.path={make_tiny_model(Path(tmp) / 'tiny')}")
        if args.threads:
            overrides.append(f"threads={args.threads}")
        cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
        t0 = time.perf_counter()
        summary = train(cfg, force=True)
        wall = time.perf_counter() - t0
        timing = json.loads((Path(tmp) / "run" / "timing.json").read_text())
    print(json.dumps({"model": args.model, "threads": args.threads, "wall_s": round(wall, 2),
                      "steps": summary["steps"], "fast_rollouts": summary["fast_rollouts"],
                      "rollouts": summary["rollouts"], **{k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in timing.items()}}, indent=2))


if __name__ == "__main__":
    main()
