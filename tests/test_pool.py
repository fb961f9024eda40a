"""Runs trained side by side in worker processes (fastslow.pool): steps relayed, a failure raised once."""

from __future__ import annotations

import pytest

from fastslow.demo import demo_config
from fastslow.pool import Workers


@pytest.mark.slow
def test_a_failing_run_in_a_worker_is_raised_here_and_the_steps_of_the_others_reach_the_caller(tmp_path):
    good = demo_config("rl", quick=True, seed=0, out=tmp_path / "good", steps=2, eval_n=8)
    bad = good.model_copy(update={"model": good.model.model_copy(update={"path": str(tmp_path / "no-such-model")}),
                                  "out": str(tmp_path / "bad")})
    seen: list[tuple[str, int, int]] = []
    with Workers(2) as workers:
        summaries = workers.train([("good", good)], lambda label, done, total, row: seen.append((label, done, total)))
        assert summaries[0]["steps"] == good.total_steps
        assert seen[-1] == ("good", good.total_steps, good.total_steps)  # the last step arrives before train returns
        with pytest.raises(Exception, match="no-such-model") as failure:
            workers.train([("bad", bad), ("good again", good.model_copy(update={"out": str(tmp_path / "again")}))])
    assert type(failure.value).__name__ == "ConfigError"  # the error of the run, not the pool's
