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
