"""The built-in engines, registered like any plug-in (the ``fastslow.plugins`` entry point ``engines``).

An engine is what :mod:`fastslow.loop` runs on (:class:`fastslow.channels.Engine`); it registers an
:class:`~fastslow.channels.EngineSpec`: how to build it, how ``--dry-run`` describes it, whether
``fastslow launch`` may start it on several processes. Nothing in the core imports this package.
"""

from __future__ import annotations

from fastslow import registry
from fastslow.channels import EngineSpec


def _native_build(cfg, weights):
    from fastslow.engines.native import build

    return build(cfg, weights)


def _native_describe(cfg, world_size):
    from fastslow.slow import schedule_summary

    return {"world_size": 1, "lr_schedule": schedule_summary(cfg.slow)}


def _trl_build(cfg, weights):
    from fastslow.engines.trl import build

    return build(cfg, weights)


def _trl_describe(cfg, world_size):
    from fastslow.engines.trl import describe

    return describe(cfg, world_size)


def _trl_check_launch(cfg, accelerate_config):
    from fastslow.engines.trl import check_launch

    check_launch(cfg, accelerate_config)


registry.register_engine("native", EngineSpec(_native_build, _native_describe),
                         "one process: HF generate + fastslow's CISPO step (the reference)")
registry.register_engine("trl", EngineSpec(_trl_build, _trl_describe, launchable=True, check_launch=_trl_check_launch),
                         "TRL's GRPOTrainer (CISPO) under accelerate/torchrun: pip install 'fastslow[scale]'; "
                         "`fastslow launch` for several processes")
