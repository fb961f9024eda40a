"""build_report on synthetic run dirs: sections present, PNGs embedded, nothing loaded from the network."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fastslow.report import build_report, discover

TASKS = ["alpha", "beta", "gamma"]
STAGE_STEPS = 20
EVAL_EVERY = 5

SECTIONS = [
    "What happened", "Reward vs rollouts", "Drift frontier", "Stream", "Accuracy matrix", "Plasticity",
    "Channel attribution", "Final reward per task", "Continual-learning metrics", "Final drift",
    "Sample efficiency vs RL", "KL at matched reward", "Sigmoid fit", "Final prompt population",
]


def _reward(method: str, task_i: int, step: int) -> float:
    """A task rises while it is trained, then decays; fst learns faster, gepa is flat-ish."""
    start = task_i * STAGE_STEPS
    speed = {"rl": 0.08, "fst": 0.2, "gepa": 0.0}[method]
    prompt = {"rl": 0.0, "fst": 0.15, "gepa": 0.2}[method]
    learned = 0.6 * (1 - math.exp(-speed * max(0, min(step, start + STAGE_STEPS) - start)))
    decay = 0.5 if method == "rl" else 0.8
    if step > start + STAGE_STEPS:
        learned *= decay
    return round(min(1.0, 0.1 + prompt + learned), 4)


def write_run(d: Path, method: str) -> Path:
    d.mkdir(parents=True)
    total = STAGE_STEPS * len(TASKS)
    rows = []
    for step in range(0, total + 1):
        row = {"step": step, "rollouts": 0 if method == "gepa" else 16 * step,
               "fast_rollouts": 0 if method == "rl" else 40 * (step // 10 + 1),
               "slow/reward_mean": 0.3}
        if step % EVAL_EVERY == 0:
            for i, t in enumerate(TASKS):
                row[f"eval/{t}/reward"] = _reward(method, i, step)
                row[f"eval/{t}/reward_seed_prompt"] = _reward(method, i, step) * 0.8
            row["drift/kl_rev"] = 0.0 if method == "gepa" else step * (0.002 if method == "rl" else 0.001)
        rows.append(row)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    n = len(TASKS)
    matrix = [[_reward(method, j, STAGE_STEPS * (i + 1)) for j in range(n)] for i in range(n)]
    summary = {
        "method": method, "seed": 0, "steps": total, "rollouts": rows[-1]["rollouts"],
        "fast_rollouts": rows[-1]["fast_rollouts"],
        "stages": [{"task": t, "steps": STAGE_STEPS} for t in TASKS], "tasks": TASKS,
        "final": {t: {"reward": matrix[-1][j], "reward_seed_prompt": 0.8 * matrix[-1][j]}
                  for j, t in enumerate(TASKS)},
        "drift": {"kl_rev": rows[-1]["drift/kl_rev"], "kl_fwd": 0.01, "weight_l2": 0.5, "entropy": 1.2},
        "matrix": matrix, "base_rewards": {t: 0.1 for t in TASKS},
        "cl": {"acc": 0.0, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0},
        "prompts": [] if method == "rl" else [f"Solve the {method} task <carefully> & check.", "Be brief."],
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    demo = tmp_path / "demo"
    for m in ("rl", "gepa", "fst"):
        write_run(demo / m, m)
    arms = {n: {"final": f, "auc": f * 0.7, "curve": [[0, 0.1], [5, f * 0.8], [10, f]]}
            for n, f in {"base": 0.4, "rl": 0.25, "fst": 0.45, "gepa": 0.4}.items()}
    (demo / "plasticity.json").write_text(json.dumps({"task": "delta", "steps": 10, "arms": arms}))
    cell = {"base_seed": 0.1, "base_evolved": 0.3, "trained_seed": 0.4, "trained_evolved": 0.6}
    (demo / "attribution.json").write_text(json.dumps({"fst": {t: cell for t in TASKS}}))
    (demo / "notes").mkdir()  # a subfolder that is not a run must be ignored
    return demo


@pytest.mark.slow
def test_full_report(demo_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    path = build_report([demo_dir], out)
    text = path.read_text()
    assert path == out / "report.html"
    for title in SECTIONS:
        assert title in text, title
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 5
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["accuracy_matrix.png", "drift_frontier.png", "plasticity.png", "reward_vs_rollouts.png",
                    "stream.png"]
    for p in (out / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # Prompts are escaped, not injected as markup.
    assert "&lt;carefully&gt; &amp; check." in text and "<carefully>" not in text
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["baseline"] == "rl" and set(analysis["vs_rl"]) == {"gepa", "fst"}
    # CL metrics are recomputed from the matrix, not copied from the summary's placeholder zeros.
    assert analysis["runs"]["rl"]["cl"]["forgetting"] > 0


@pytest.mark.slow
def test_single_run_dir_skips_missing_pieces(tmp_path: Path):
    run = write_run(tmp_path / "lonely" / "fst", "fst")
    text = build_report([run], tmp_path / "out").read_text()
    assert "No plasticity.json found." in text and "No attribution.json found." in text
    assert "need an rl run" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 4


def test_empty_input_still_writes_a_report(tmp_path: Path):
    text = build_report([tmp_path / "missing"], tmp_path / "out").read_text()
    assert "No run directories found" in text


def test_discover_run_and_demo_dirs(demo_dir: Path):
    runs, extras = discover([demo_dir, demo_dir / "rl"])
    assert [p.name for p in runs] == ["fst", "gepa", "rl"]
    assert demo_dir.resolve() in extras


def _pair_run(d: Path, method: str, evals: list[tuple[int, float, float]], final_kl: float, n: int) -> Path:
    """A 12-step SmolLM2-like run: (step, eval reward, KL) at each eval; eval.n = n in its config.yaml."""
    d.mkdir(parents=True)
    rows = [{"step": st, "rollouts": 16 * st, "fast_rollouts": 0, "eval/arith/reward": r, "drift/kl_rev": k}
            for st, r, k in evals]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": 0, "steps": 12, "tasks": ["arith"],
                                                "drift": {"kl_rev": final_kl}}))
    (d / "config.yaml").write_text(f"method: {method}\neval: {{every: 6, n: {n}}}\n")
    return d


@pytest.mark.parametrize("n", [32, 200_000])
def test_matched_reward_headline_says_too_little_evidence_when_eval_n_cannot_carry_it(tmp_path: Path, n: int):
    # The pair: at matched reward 0.229 FST's interpolated KL is 0.0094 vs RL's 0.0401 ("76% less drift"),
    # while FST's final KL (0.0508) is above RL's; eval n = 32 at 3 points cannot carry a ratio.
    rl = _pair_run(tmp_path / "rl", "rl", [(0, 0.1, 0.0), (6, 0.2, 0.02), (12, 0.229, 0.0401)], 0.0401, n)
    fst = _pair_run(tmp_path / "fst", "fst", [(0, 0.1, 0.0), (6, 0.25, 0.011), (12, 0.24, 0.0508)], 0.0508, n)
    build_report([rl, fst], tmp_path / "out")
    text = re.sub(r"<[^>]+>", "", (tmp_path / "out" / "report.html").read_text())
    happened = text.split("What happened", 1)[1].split("Reward vs rollouts", 1)[0]
    assert "final KL fst 0.0508 vs RL 0.0401" in happened  # the measured values beside the interpolated ones
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    kl = analysis["vs_rl"]["fst"]["kl_at_matched_reward"]
    assert kl["ratio"] == pytest.approx(0.0095 / 0.0401, rel=0.02)
    assert analysis["runs"]["fst"]["eval_n"] == n and analysis["runs"]["fst"]["peak_ci"][0] < 0.25
    if n == 32:
        assert "too little evidence" in happened and "76% less" not in happened
        assert kl["evidence"]["enough"] is False and kl["evidence"]["interval"][0] < 1
    else:  # a huge eval set makes the same curves decisive
        assert "76% less drift" in happened and "too little evidence" not in happened
        assert kl["evidence"]["enough"] is True and kl["evidence"]["interval"][1] < 1


@pytest.mark.slow
def test_task_agnostic_numbers_are_reported_beside_the_task_aware_ones(tmp_path: Path):
    # A memory-style run with per-task contexts: its summary carries the task-agnostic scenario too
    run = write_run(tmp_path / "fst", "fst")
    summary = json.loads((run / "summary.json").read_text())
    summary["cl_agnostic"] = {"acc": 0.123, "bwt": -0.045, "fwt": 0.0, "forgetting": 0.067}
    for j, t in enumerate(TASKS):
        summary["final"][t]["reward_agnostic"] = 0.301 + j / 100
    (run / "summary.json").write_text(json.dumps(summary))
    build_report([run, write_run(tmp_path / "rl", "rl")], tmp_path / "out")
    text = re.sub(r"<[^>]+>", " ", (tmp_path / "out" / "report.html").read_text())
    assert "fst (task-agnostic)" in text and "0.123" in text and "0.067" in text
    assert "task-agnostic" in text.split("Final reward per task", 1)[1][:200] and "0.311" in text
    assert "rl (task-agnostic)" not in text  # rl has one context for every task: nothing separate to report
