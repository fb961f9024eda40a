"""The drift meter's run-time invariant: the base is the initial weights, never the live policy."""

from __future__ import annotations

import pytest
import torch
from conftest import EchoTask

from fastslow.config import DriftConfig, ModelConfig
from fastslow.drift import DriftMeter
from fastslow.errors import TrainingError, describe
from fastslow.policy import Policy


def _probes(policy: Policy) -> list[str]:
    task = EchoTask()
    return [policy.format(task.seed_prompt, p.prompt) for p in task.problems("eval")[:4]]


def _nudge(policy: Policy) -> None:
    """An update's worth of movement, as the slow channel would make it."""
    with torch.no_grad():
        for _, p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.version += 1


def test_an_aliased_base_stops_the_run_once_the_weights_moved(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    # The bug the invariant exists for (engine trl once had it): a copy of the weights whose forward still runs
    # the live policy, so weight_l2 sees the copy while every KL compares the policy with itself.
    policy._base.forward = policy.model.forward
    meter = DriftMeter(policy, _probes(policy), DriftConfig(max_new_tokens=6), seed=0)
    assert meter.measure()["drift/kl_rev"] == 0.0  # before any update: nothing to tell yet
    _nudge(policy)
    torch.manual_seed(0)
    with pytest.raises(TrainingError, match="the base model is the live policy") as err:
        meter.measure()
    assert "\n" not in describe(err.value)  # one line (TrainingError: exit 1 from the CLI)


def test_a_base_whose_forward_is_not_the_policys_is_refused_before_any_update(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    forward = policy._base.forward

    def other_model(*args, **kwargs):  # e.g. another attention kernel, a patched head: same weights, other numbers
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.01
        return out

    policy._base.forward = other_model
    meter = DriftMeter(policy, _probes(policy), DriftConfig(max_new_tokens=6), seed=0)
    with pytest.raises(TrainingError, match="before any update the base's logits differ from the policy's"):
        meter.measure()


def test_a_real_base_passes_and_measures(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    meter = DriftMeter(policy, _probes(policy), DriftConfig(max_new_tokens=6), seed=0)
    assert meter.measure()["drift/kl_fwd"] == 0.0
    _nudge(policy)
    after = meter.measure()
    assert after["drift/kl_rev"] > 0 and after["drift/kl_fwd"] > 0 and after["drift/weight_l2"] > 0


def test_trained_weights_loaded_fresh_are_measured_not_refused(tiny_model, tmp_path):
    """Weights loaded from a training run (serving it): no update here yet, but not the base either."""
    trained = Policy.load(ModelConfig(path=str(tiny_model)))
    _nudge(trained)
    trained.save(tmp_path / "model")
    policy = Policy.load(ModelConfig(path=str(tiny_model)), weights=tmp_path / "model")
    assert policy.version == 0
    drift = DriftMeter(policy, _probes(policy), DriftConfig(max_new_tokens=6), seed=0).measure()
    assert drift["drift/kl_rev"] > 0 and drift["drift/weight_l2"] > 0
