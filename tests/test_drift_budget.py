"""The drift budget (slow.kl_target): the adaptive KL coefficient on synthetic signals and in the loop."""

import json
import math

import pytest
from conftest import small_config

from fastslow.loop import Trainer
from fastslow.slow import KLController


def _plant(coef: float) -> float:
    """A synthetic policy whose steady-state KL falls as the penalty grows (KL = 2 / (1 + 10 * coef))."""
    return 2.0 / (1.0 + 10.0 * coef)


@pytest.mark.parametrize("target", [0.05, 0.5, 1.5])
def test_controller_settles_the_kl_at_the_target(target):
    ctl = KLController(target=target, gain=0.5, init=0.01)
    kl = _plant(ctl.coef)
    for _ in range(60):
        ctl.update(kl)
        kl = _plant(ctl.coef)
    assert kl == pytest.approx(target, rel=0.05)
    # the coefficient the plant needs for this target: 2 / (1 + 10 c) = target
    assert ctl.coef == pytest.approx((2.0 / target - 1.0) / 10.0, rel=0.1)


def test_controller_moves_the_right_way_and_bounded_per_update():
    ctl = KLController(target=0.1, gain=0.5, init=1.0)
    ctl.update(0.2)
    assert 1.0 < ctl.coef <= math.exp(0.5 * KLController.MAX_ERR)
    up = ctl.coef
    ctl.update(1e6)  # a wild measurement moves beta by at most exp(gain * MAX_ERR)
    assert ctl.coef == pytest.approx(up * math.exp(0.5 * KLController.MAX_ERR))
    ctl = KLController(target=0.1, gain=0.5, init=1.0)
    ctl.update(0.0)  # the base itself (KL 0) lowers the penalty, without a log(0)
    assert ctl.coef < 1.0
    ctl.update(0.1)  # on target: no change
    assert ctl.coef == pytest.approx(math.exp(-0.5))


def test_loop_logs_an_adapting_coefficient_and_checkpoints_it(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run", method="rl", steps=6,
                       extra=["slow.kl_target=1e-6", "slow.kl_coef=0.05", "drift.every=1"])
    trainer = Trainer(cfg, log=lambda _: None)
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    coefs = [r["slow/kl_coef"] for r in rows if "slow/kl_coef" in r]
    assert len(coefs) == 6
    # the base's KL 0 (step 0) is under budget: the first step already runs with a lower coefficient
    assert coefs[0] < 0.05
    # once the weights move, the KL exceeds the tiny budget and the penalty climbs step after step
    assert coefs[-1] > coefs[1]
    assert trainer.slow.state_dict()["kl_coef"] == pytest.approx(trainer.slow.kl_coef)
    fixed = small_config(tiny_model, tmp_path / "fixed", method="rl", steps=2, extra=["slow.kl_coef=0.05"])
    Trainer(fixed, log=lambda _: None).run()
    rows = [json.loads(x) for x in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    assert {r["slow/kl_coef"] for r in rows if "slow/kl_coef" in r} == {0.05}
