"""`make bench`: every benchmark in turn, each printing JSON (reproductions and timings, not tests).

Resumable: each finished benchmark's output is kept in runs/bench/run_all/ (``<name>.out`` and a ``<name>.done``
record written after it exited 0); a rerun prints the kept output instead of running it again. Progress is a
line per benchmark with elapsed time and an ETA (a bar on a terminal). `benchmarks/claims.py`, which `make bench`
runs next, resumes the same way run by run.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchutil import BenchProgress  # noqa: E402

# (name, argv, relative cost for the ETA)
BENCHES = [
    ("smoke-tiny", ["smoke_timing.py", "--model", "tiny", "--threads", "1"], 1.0),
    ("smoke-micro", ["smoke_timing.py", "--model", "micro", "--threads", "1"], 2.0),
    ("world-rl-lift", ["world_rl_lift.py"], 30.0),
]


def finished(root: Path, name: str) -> bool:
    try:
        return json.loads((root / f"{name}.done").read_text()).get("rc") == 0 and (root / f"{name}.out").is_file()
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("runs") / "bench" / "run_all")
    args = ap.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    progress = BenchProgress("benchmarks", sum(c for *_, c in BENCHES), len(BENCHES))
    try:
        for name, bench, cost in BENCHES:
            out = args.root / f"{name}.out"
            if finished(args.root, name):
                print(f"== {' '.join(bench)} (reused {out})", flush=True)
                print(out.read_text(), end="", flush=True)
                progress.advance(cost, reused=True, what=name)
                continue
            print(f"== {' '.join(bench)}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, str(HERE / bench[0]), *bench[1:]], check=False,
                                  stdout=subprocess.PIPE, text=True)
            print(done.stdout, end="", flush=True)
            if done.returncode == 0:
                out.write_text(done.stdout)
                (args.root / f"{name}.done").write_text(json.dumps({"rc": 0, "seconds": time.perf_counter() - t0}))
            progress.advance(cost, what=f"{name} (exit {done.returncode})")
    finally:
        progress.close()


if __name__ == "__main__":
    main()
