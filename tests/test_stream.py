"""Task streams: CL metrics on a stream that revisits a task, unique task names, schedules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import read_rows, small_config

from fastslow.config import ConfigError
from fastslow.loop import Trainer, load_stream
from fastslow.stream import continual_metrics, stage_at, stage_of, stage_spans, stream_columns

# a -> b -> a -> c: four stages, three columns (a, b, c in order of first appearance).
STAGES = ["a", "b", "a", "c"]
R = [
    [0.6, 0.1, 0.2],  # after stage 0 (a)
    [0.4, 0.7, 0.2],  # after stage 1 (b)
    [0.8, 0.5, 0.3],  # after stage 2 (a again)
    [0.5, 0.3, 0.9],  # after stage 3 (c)
]
BASE = {"a": 0.1, "b": 0.1, "c": 0.1}


def test_revisiting_stream_matches_the_hand_computed_metrics():
    m = continual_metrics(R, STAGES, BASE)
    assert stream_columns(STAGES) == ["a", "b", "c"]
    assert m["acc"] == pytest.approx((0.5 + 0.3 + 0.9) / 3)
    # J = {a (last trained at stage 2), b (stage 1)}; c is trained in the final stage.
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.3 - 0.7)) / 2)  # -0.35
    # forgetting_a = max(R[0..2][a]) - R[3][a] = 0.8 - 0.5; forgetting_b = max(R[1..2][b]) - R[3][b] = 0.7 - 0.3
    assert m["forgetting"] == pytest.approx((0.3 + 0.4) / 2)
    # FWT over tasks first trained after stage 0: b (R[0][b] - base) and c (R[2][c] - base)
    assert m["fwt"] == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)
    per = m["per_task"]
    assert (per["a"]["first"], per["a"]["last"], per["c"]["first"]) == (0, 2, 3)
    assert per["c"]["bwt"] is None and per["c"]["forgetting"] is None  # never "forgot" an untrained task
    assert per["a"]["fwt"] is None  # first trained at stage 0: no transfer term


def test_forgetting_ignores_stages_before_a_task_was_first_trained():
    # task b scores 0.9 before it is ever trained (stage 0), then 0.5 after training: that is not forgetting.
    m = continual_metrics([[0.5, 0.9], [0.5, 0.5], [0.4, 0.4]], ["a", "b", "a"], None)
    assert m["per_task"]["b"]["forgetting"] == pytest.approx(0.5 - 0.4)


def test_matrix_that_does_not_fit_the_stream_is_an_error():
    with pytest.raises(ValueError, match="4 stages and 3 unique tasks"):
        continual_metrics(R[:3], STAGES, BASE)


def test_one_boundary_rule_for_steps_and_rows():
    spans = stage_spans([{"task": "a", "steps": 3}, {"task": "b", "steps": 2}])
    assert spans == [(0, 3), (3, 5)]
    assert [stage_at(s, spans) for s in range(6)] == [0, 0, 0, 1, 1, None]
    # row `done` belongs to the stage that trained step done - 1; row 0 (the base) to stage 0
    assert [stage_of(d, spans) for d in range(7)] == [0, 0, 0, 0, 1, 1, None]


def test_two_specs_with_one_name_are_refused(tmp_path, tiny_model):
    for stem_dir in ("x", "y"):
        (tmp_path / stem_dir).mkdir()
        lines = [{"question": "1+1", "answer": "2", "split": "train"},
                 {"question": "2+2", "answer": "4", "split": "eval"}]
        (tmp_path / stem_dir / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    x, y = tmp_path / "x" / "qa.jsonl", tmp_path / "y" / "qa.jsonl"
    stages = f"stages=[{{task: 'jsonl:{x}', steps: 1}}, {{task: 'jsonl:{y}', steps: 1}}]"
    cfg = small_config(tiny_model, tmp_path / "run", extra=[stages])
    with pytest.raises(ConfigError, match=r"x/qa.jsonl.*y/qa.jsonl.*both named 'qa'"):
        load_stream(cfg)
    renamed = stages.replace("steps: 1}]", "steps: 1, name: qa_y}]")
    tasks, stage_tasks = load_stream(small_config(tiny_model, tmp_path / "run", extra=[renamed]))
    assert stage_tasks == ["qa", "qa_y"] and list(tasks) == ["qa", "qa_y"]


def test_one_name_for_two_specs_in_the_config_is_refused(tmp_path, tiny_model):
    stages = ("stages=[{task: 'conftest:echo_task', steps: 1, name: t},"
              " {task: 'conftest:echo_task_b', steps: 1, name: t}]")
    with pytest.raises(ConfigError, match="'conftest:echo_task' and 'conftest:echo_task_b' are both named 't'"):
        small_config(tiny_model, tmp_path / "run", extra=[stages])


@pytest.mark.slow
def test_revisiting_stream_run_writes_one_row_per_stage(tiny_model, tmp_path):
    stages = ("stages=[{task: 'conftest:vowel_task', steps: 2}, {task: 'conftest:echo_task_b', steps: 2},"
              " {task: 'conftest:vowel_task', steps: 1}]")
    cfg = small_config(tiny_model, tmp_path / "run", method="rl", extra=[stages, "drift.every=4", "eval.every=4"])
    summary = Trainer(cfg).run()
    assert summary["tasks"] == ["vowel", "echo_b"]
    assert [len(row) for row in summary["matrix"]] == [2, 2, 2]
    assert summary["cl"]["per_task"]["echo_b"]["last"] == 1 and summary["cl"]["per_task"]["vowel"]["last"] == 2
    rows = read_rows(tmp_path / "run")
    # drift and the slow step's k3 are measured on the same rows (every 4 steps and the last: 5 is not a multiple)
    assert [r["step"] for r in rows if "drift/kl_rev" in r] == [0, 4, 5]
    assert [r["step"] for r in rows if "drift/k3_train" in r] == [4, 5]


@pytest.mark.slow
def test_loop_does_not_import_any_world():
    code = ("import fastslow.loop, fastslow.fast, fastslow.policy, sys; "
            "bad = [m for m in sys.modules if m.startswith('fastslow.world')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_engine_is_a_config_error(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="unknown engine 'bogus'.*native"):
        small_config(tiny_model, tmp_path / "run", extra=["engine=bogus"])
