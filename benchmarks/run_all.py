"""`make bench`: every benchmark in turn, each printing JSON (reproductions and timings, not tests)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ["smoke_timing.py", "--model", "tiny", "--threads", "1"],
    ["smoke_timing.py", "--model", "micro", "--threads", "1"],
    ["world_rl_lift.py"],
]

for bench in BENCHES:
    print(f"== {' '.join(bench)}", flush=True)
    subprocess.run([sys.executable, str(HERE / bench[0]), *bench[1:]], check=False)
