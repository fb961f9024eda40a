"""Test-only: run accelerate's own FSDP2 path on CPU processes (gloo).

accelerate applies FSDP on accelerators only (a CPU run stays plain data parallel), so on this machine the
tests make its state report FSDP after it is set up: ``Accelerator.prepare`` then shards the model with
``fully_shard`` exactly as it does on GPUs, and every sharded code path of engine ``trl`` runs for real.
Import this module before fastslow builds the engine.
"""

from __future__ import annotations

import os

import accelerate.state
from accelerate.utils import DistributedType

os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                  FSDP_STATE_DICT_TYPE="FULL_STATE_DICT", FSDP_RESHARD_AFTER_FORWARD="true")
_init = accelerate.state.AcceleratorState.__init__
_plugin: list = []  # the plugin accelerate built from the FSDP_* variables (its later state lookups pass none)


def _fsdp_on_cpu(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None:
        _plugin[:] = [kwargs["fsdp_plugin"]]
    if self.distributed_type == DistributedType.MULTI_CPU and _plugin:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
