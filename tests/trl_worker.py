"""Run by torchrun in tests/test_engine_trl.py: one fastslow run with engine trl, then each rank saves its
trained weights and its population, so the test can compare ranks."""

from __future__ import annotations

import json
import sys

import torch

from fastslow.loop import Trainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import small_config  # noqa: E402

model, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
cfg = small_config(model, out, steps=3, extra=["engine=trl", "fast.every=2", "eval.every=3", "drift.every=3",
                                              "checkpoint_every=3"])
trainer = Trainer(cfg)
trainer.run()
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
weights = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}
torch.save(weights, f"{out}.rank{rank}.pt")
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"population": trainer.fast.population, "best": trainer.fast.best,
               "world_size": trainer.engine.world_size}, f)
