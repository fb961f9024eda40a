"""Engines: what samples rollouts and updates the weights behind the loop's channel protocols.

``native`` (the reference: ``Policy.generate`` + ``slow.SlowLearner``) and ``trl`` (:mod:`fastslow.engines.trl`:
TRL's GRPOTrainer under accelerate). ``Config.engine`` chooses.
"""
