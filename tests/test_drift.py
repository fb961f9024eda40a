import math

import pytest
import torch
from conftest import read_rows, small_config

from fastslow.drift import exact_kl
from fastslow.loop import train


def test_exact_kl_matches_brute_force_on_two_token_vocabulary():
    p_logits = torch.tensor([[0.3, -1.2]])
    q_logits = torch.tensor([[-0.5, 0.7]])
    p = torch.softmax(p_logits, -1)[0].tolist()
    q = torch.softmax(q_logits, -1)[0].tolist()
    brute = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    assert exact_kl(p_logits, q_logits).item() == pytest.approx(brute, rel=1e-6)
    reverse = sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
    assert exact_kl(q_logits, p_logits).item() == pytest.approx(reverse, rel=1e-6)
    assert exact_kl(p_logits, p_logits).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_is_zero_at_step_zero_and_positive_after_updates(tiny_model, tmp_path):
    train(small_config(tiny_model, tmp_path / "run", method="rl", steps=4))
    rows = read_rows(tmp_path / "run")
    first, last = rows[0], rows[-1]
    assert first["step"] == 0
    assert first["drift/kl_rev"] == 0.0 and first["drift/kl_fwd"] == 0.0 and first["drift/weight_l2"] == 0.0
    assert last["drift/kl_rev"] > 0 and last["drift/kl_fwd"] > 0 and last["drift/weight_l2"] > 0
    assert any("drift/k3_train" in r for r in rows)


def test_drift_meter_caches_what_cannot_change_and_matches_a_fresh_meter(tiny_model):
    """Base logits on the fixed base samples are computed once; unchanged weights reuse the last numbers;
    after an update the cached meter gives exactly what a fresh meter computes."""
    from fastslow.config import DriftConfig, ModelConfig
    from fastslow.drift import DriftMeter
    from fastslow.policy import Policy

    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    prompts = [policy.format("Answer.", w) for w in ("abc", "cab", "bca")]
    cfg = DriftConfig(probe_size=3, max_new_tokens=6)
    meter = DriftMeter(policy, prompts, cfg, seed=1, chunk=2)
    calls = {"base": 0, "policy": 0}
    scored = policy.completion_logits

    def counting(batch, *, use_base=False):
        calls["base" if use_base else "policy"] += 1
        return scored(batch, use_base=use_base)

    policy.completion_logits = counting
    meter.measure()
    assert calls == {"base": 4, "policy": 4}  # 2 chunks x (policy samples, base samples)
    meter.measure()
    assert calls == {"base": 4, "policy": 4}  # same weights: nothing recomputed
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.version += 1
    after = meter.measure()
    assert calls == {"base": 6, "policy": 8}  # base logits on base samples came from the cache
    policy.completion_logits = scored
    fresh = DriftMeter(policy, prompts, cfg, seed=1, chunk=2).measure()
    assert after == pytest.approx(fresh, rel=1e-6) and after["drift/kl_fwd"] > 0
