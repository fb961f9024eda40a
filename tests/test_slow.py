import math

import pytest
import torch
from conftest import small_config

from fastslow.config import FastConfig
from fastslow.fast import FastChannel
from fastslow.loop import Trainer
from fastslow.slow import group_advantages, policy_loss


def test_cispo_loss_matches_hand_computation():
    # one rollout, two tokens: p = 0.5 and 0.25 now; the sampler had 0.1 and 0.25 -> ratios 5 and 1
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    old = torch.log(torch.tensor([[0.1, 0.25]]))
    adv, mask, group = torch.tensor([2.0]), torch.ones(1, 2), torch.tensor([0])
    loss, stats = policy_loss(logp, old, adv, mask, group, loss="cispo", tau=4.0)
    # ratio 5 is truncated to tau=4 (and stop-gradient), the other stays 1
    expected = -(4.0 * 2.0 * math.log(0.5) + 1.0 * 2.0 * math.log(0.25)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # unlike PPO clipping, the truncated token still gets gradient, scaled by the truncated weight
    assert logp.grad[0].tolist() == pytest.approx([-4.0 * 2.0 / 2, -1.0 * 2.0 / 2])


def test_grpo_clips_the_ratio():
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.25]]))  # ratio 2, clipped to 1.2 for a positive advantage
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), torch.tensor([0]), loss="grpo")
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clip_frac"] == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0  # clipped: no gradient


def test_loss_is_token_mean_per_group_then_mean_over_groups():
    # group 0: one rollout of 1 token; group 1: one rollout of 3 tokens (last one padding)
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.25, 0.9]]))
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0, 1.0]), mask, torch.tensor([0, 1]))
    g0 = -math.log(0.5)
    g1 = -(math.log(0.5) + math.log(0.25)) / 2
    assert loss.item() == pytest.approx((g0 + g1) / 2, rel=1e-6)


def test_advantages_are_per_problem_across_a_group_mixing_prompts():
    channel = FastChannel.__new__(FastChannel)
    channel.cfg, channel.population = FastConfig(population=2), ["prompt A", "prompt B"]

    class T:
        seed_prompt = "seed"

    contexts = channel.contexts(T(), None, 4)
    assert contexts == ["prompt A", "prompt A", "prompt B", "prompt B"]  # G/K = 2 rollouts each
    # prompt A solved once, prompt B never: one advantage per problem over all four rollouts
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    adv, keep = group_advantages(rewards)
    std = math.sqrt(0.1875)
    assert adv[0].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-4)
    assert keep.tolist() == [True, False]  # the flat group is dropped


def test_population_smaller_than_k_is_cycled():
    channel = FastChannel.__new__(FastChannel)
    channel.cfg, channel.population = FastConfig(population=4), ["only"]

    class T:
        seed_prompt = "seed"

    assert channel.contexts(T(), None, 8) == ["only"] * 8


def test_every_trainable_parameter_changes_after_a_few_rl_steps(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run", method="rl", steps=3)
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.policy.trainable_parameters()}
    trainer.run()
    unchanged = [n for n, p in trainer.policy.trainable_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    assert trainer.policy.version == 3
