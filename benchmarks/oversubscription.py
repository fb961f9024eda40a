"""Thread hygiene under load: the SmolLM2 eval beside a second CPU-bound fastslow process.

    python benchmarks/oversubscription.py [--n 8] [--reps 1] [--base /tmp/speed-base/src]
    (make bench-oversubscription)

A second ``fastslow eval`` (the hog, this checkout's defaults) runs in a loop for the whole benchmark. Beside
it, the measured eval runs with:

- ``default``: no thread options (this checkout: passive OpenMP waiting, one thread per usable CPU);
- ``threads1``: ``--threads 1``, spinning waits allowed (OMP_WAIT_POLICY=ACTIVE, the OpenMP default before);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` and ``--threads`` = usable CPUs (the best manual setting found
  in issue 19);
- ``old-default`` (with ``--base``): the older code's defaults (spinning waits, torch's thread count).

ratio = default / min(threads1, passive): the target is <= 1.5. Written to benchmarks/results/oversubscription.json.
The machine may be shared with other work too: the load average at start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from benchutil import put_section  # noqa: E402

SRC = ROOT / "src"
TASK = "rg:basic_arithmetic?max_terms=2&max_digits=1&operators=+,-&extract=last_number&train=256&eval=32"


def eval_cmd(n: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastslow.cli", "eval", "--model", "smollm2-135m", "--task", TASK, "--n", str(n),
            "--max-new-tokens", "24", *extra]


def clean_env(src: Path, **overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    env.update(overrides)
    return env


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-1500:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="eval problems of the measured eval")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--base", type=Path, default=None, help="older code's src/ for an old-default arm")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "oversubscription.json")
    ap.add_argument("--readme", default=str(HERE / "README.md"), help="where the table goes ('' for nowhere)")
    args = ap.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    arms = {
        "default": (eval_cmd(args.n, []), clean_env(SRC)),
        "threads1": (eval_cmd(args.n, ["--threads", "1"]), clean_env(SRC, OMP_WAIT_POLICY="ACTIVE")),
        "passive": (eval_cmd(args.n, ["--threads", str(cpus)]), clean_env(SRC, OMP_WAIT_POLICY="PASSIVE")),
    }
    if args.base:
        arms["old-default"] = (eval_cmd(args.n, []), clean_env(args.base))
    load_start = os.getloadavg()[0]
    # the hog: a second fastslow process, CPU-bound for the whole benchmark
    hog_cmd = " ".join(f"'{a}'" for a in eval_cmd(64, []))
    hog = subprocess.Popen(["bash", "-c", f"while true; do {hog_cmd} > /dev/null 2>&1; done"],
                           env=clean_env(SRC), cwd=ROOT, start_new_session=True)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    try:
        time.sleep(15)  # the hog has loaded its model and is computing
        for _ in range(args.reps):
            for arm, (cmd, env) in arms.items():
                times[arm].append(timed(cmd, env))
                print(f"{arm}: {times[arm][-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        os.killpg(hog.pid, 15)
        hog.wait()
    best = {arm: min(t) for arm, t in times.items()}
    manual = min(best["threads1"], best["passive"])
    result = {"n": args.n, "cpus": cpus, "seconds": times, "best_s": best, "ratio_default_over_best_manual":
              best["default"] / manual, "target": 1.5, "load_start": load_start, "load_end": os.getloadavg()[0],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "old-default" in best:
        result["ratio_old_default_over_best_manual"] = best["old-default"] / manual
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.readme:
        put_section(Path(args.readme), readme_block(result), "oversubscription")
    print(json.dumps(result, indent=1))


def readme_block(r: dict) -> str:
    arms = {"default": "default (passive waiting, 1 thread per usable CPU)",
            "threads1": "`--threads 1`, spinning waits",
            "passive": f"`OMP_WAIT_POLICY=PASSIVE --threads {r['cpus']}`", "old-default": "older code's default"}
    lines = ["<!-- oversubscription:start -->", "## Threads beside other work", "",
             f"`make bench-oversubscription` ({r['date']}): `fastslow eval` of SmolLM2-135M on {r['n']} problems "
             f"while a second fastslow eval runs in a loop, {r['cpus']} usable CPUs, load average "
             f"{r['load_start']:.1f} at the start and {r['load_end']:.1f} at the end (the machine is shared).", "",
             "| setting | seconds | / best manual |", "|---|---|---|"]
    manual = min(r["best_s"]["threads1"], r["best_s"]["passive"])
    lines += [f"| {arms[a]} | {t:.1f} | {t / manual:.2f} |" for a, t in r["best_s"].items()]
    lines += ["", f"Target: default <= {r['target']}x the best manual setting.", "<!-- oversubscription:end -->"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
