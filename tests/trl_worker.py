"""Run by torchrun in tests/test_engine_trl.py: one fastslow run with engine trl, then each rank saves its
trained weights, its fast channel's state, its reflection-model calls, the batch size of every generate
call, the reflection replies it sampled with and every context its fast channel gave, so the test can compare
ranks.

usage: trl_worker.py MODEL OUT [REFLECTOR [METHOD [KEY=VALUE ...]]]"""

from __future__ import annotations

import json
import re
import sys

import torch

from fastslow.loop import Trainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import lockstep_reflectors  # noqa: E402
from conftest import small_config  # noqa: E402

model, out = sys.argv[1], sys.argv[2]
reflector = sys.argv[3] if len(sys.argv) > 3 else "conftest:canned_reflector"
method = sys.argv[4] if len(sys.argv) > 4 else "fst"
torch.set_num_threads(1)
cfg = small_config(model, out, method=method, steps=3, extra=[
    "engine=trl", "fast.every=2", "fast.budget=24", "eval.every=3", "drift.every=3", "checkpoint_every=3",
    f"fast.reflector={reflector}", "fast.reflection_retries=1", *sys.argv[5:]])
trainer = Trainer(cfg)
generated: list[int] = []  # rows of each generate call the engine's sampler makes (drift: main only)
hints: set[str] = set()  # the reflection replies this rank sampled with
generate, engine = trainer.policy.generate, trainer.engine.sample.engine
sample, in_sampler = engine.sample, []


def counted(prompts, **kwargs):
    if in_sampler:
        generated.append(len(prompts))
    hints.update(h for p in prompts for h in re.findall(r"Hint \d+-\d+", p))
    return generate(prompts, **kwargs)


def sampling(*args, **kwargs):
    in_sampler.append(1)
    try:
        return sample(*args, **kwargs)
    finally:
        in_sampler.pop()


engine.sample = sampling
trainer.policy.generate = counted
seen: list[str] = []  # every context the fast channel gave this rank, in order (slow step and eval alike)
if trainer.fast is not None:
    contexts = trainer.fast.contexts

    def recorded(*args, **kwargs):
        got = contexts(*args, **kwargs)
        seen.extend(got)
        return got

    trainer.fast.contexts = recorded
trainer.run()
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
weights = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}
torch.save(weights, f"{out}.rank{rank}.pt")
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"population": trainer.fast.population, "best": trainer.fast.best, "fast": trainer.fast.state_dict(),
               "world_size": trainer.engine.world_size, "reflector_calls": lockstep_reflectors.calls,
               "generate_rows": generated, "hints": sorted(hints), "contexts": seen}, f)
