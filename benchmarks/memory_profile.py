"""Where resident memory goes in a run: RSS and peak RSS after each phase of the loop.

    python benchmarks/memory_profile.py configs/smollm2-cpu.yaml stages.0.steps=2 eval.n=8 out=/tmp/mem

Wraps the engine's sampler, the slow step, the fast round, the drift meter and the evaluation of one
``fastslow.loop.Trainer`` and prints, after each call, the resident set and the peak so far (ru_maxrss is
monotonic: the phase after which the peak rises is the one that set it). Overrides as ``--set`` takes them.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

from fastslow import loop  # noqa: E402
from fastslow.config import load_config  # noqa: E402

PROC = psutil.Process()


def mark(what: str) -> None:
    rss = PROC.memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{what:30s} rss {rss:6.0f} MB  peak {peak:6.0f} MB", flush=True)


def wrap(obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        out = fn(*args, **kwargs)
        mark(label)
        return out

    setattr(obj, name, marked)


def main() -> None:
    mark("start")
    cfg = load_config(sys.argv[1], sys.argv[2:])
    setup = loop.Trainer._setup

    def marked_setup(self, **kwargs):
        setup(self, **kwargs)
        mark("setup (model loaded)")
        wrap(self.engine, "sample", "sample")
        if self.slow is not None:
            wrap(self.slow, "step", "slow.step")
        if self.fast is not None:
            wrap(self.fast, "run_round", "fast.run_round")
        wrap(self.drift, "measure", "drift.measure")
        wrap(self, "_evaluate", "evaluate")

    loop.Trainer._setup = marked_setup
    t0 = time.time()
    loop.train(cfg, force=True, log=lambda m: None)
    mark(f"end ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
