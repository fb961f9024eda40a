"""`make bench` is resumable run by run: finished runs (a complete summary.json, the same settings) are reused,
the rest run; progress is a line per run with elapsed time and an ETA when not on a terminal."""

import importlib.util
import io
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location("claims", BENCH / "claims.py")
claims = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(claims)
sys.path.insert(0, str(BENCH))
import benchutil  # noqa: E402


def _finish(job: dict, *, steps: int | None = None, summary: str | None = None) -> None:
    from fastslow.config import config_from_dict

    out = Path(job["cfg"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    settings = config_from_dict(job["cfg"]).model_dump(mode="json")
    (out / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (out / "protocol.sha256").write_text(job["protocol"] + "\n")
    total = sum(s["steps"] for s in job["cfg"]["stages"])
    (out / "summary.json").write_text(summary if summary is not None else
                                      json.dumps({"steps": total if steps is None else steps}))


def test_a_killed_bench_reruns_only_the_runs_without_a_complete_summary(tmp_path, monkeypatch, capsys):
    runs, _ = claims.plan(claims.SETTINGS["quick"], tmp_path)
    runs = runs[:5]
    _finish(runs[0])  # finished
    _finish(runs[1], steps=3)  # a summary from a shorter run: not this run's
    _finish(runs[2], summary='{"steps": ')  # cut short
    _finish(runs[3])
    _finish(runs[4])
    (Path(runs[4]["cfg"]["out"]) / "protocol.sha256").write_text("another protocol\n")  # run again
    changed = dict(runs[3], cfg={**runs[3]["cfg"], "seed": 99})  # same dir, other settings: run again
    jobs = [runs[0], runs[1], runs[2], changed, runs[4]]
    ran = []

    def fake_train(job):
        ran.append(job["cfg"]["out"])
        return job["cfg"]["out"]

    monkeypatch.setattr(claims, "train_job", fake_train)
    results = claims.run_pool(claims.train_job, jobs, 1, "run")
    assert ran == [j["cfg"]["out"] for j in jobs[1:]]
    assert results == [j["cfg"]["out"] for j in jobs]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("run 1/5 (1 reused)") and "ETA ?" in lines[0]
    assert lines[-1].startswith("run 5/5 (1 reused)") and "ETA 0:00:00" in lines[-1]


def _sleep_or_fail(job: dict) -> str:
    if job.get("fail"):
        raise ValueError("boom")
    time.sleep(job["sleep"])
    Path(job["marker"]).write_text("ran")
    return job["marker"]


def test_a_failing_job_stops_the_bench_without_running_the_jobs_queued_behind_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "claims", claims)  # the workers find the pool's functions by module name
    jobs = [{"fail": True}] + [{"sleep": 3.0, "marker": str(tmp_path / f"{i}.done")} for i in range(6)]
    with pytest.raises(ValueError, match="boom"):
        claims.run_pool(_sleep_or_fail, jobs, 2, "job")
    # the job running beside the failure is interrupted, and the ones queued (some already handed to a worker)
    # never start: before, the pool ran all six (18 s of 2 workers) before the error was raised
    assert sorted(p.name for p in tmp_path.glob("*.done")) == []


def test_the_eta_weighs_a_run_by_its_method_and_settings_not_only_its_steps(tmp_path):
    runs, _ = claims.plan(claims.SETTINGS["full"], tmp_path)
    cost = {Path(j["cfg"]["out"]).name: claims.job_cost(claims.train_job, j) for j in runs if j["kind"] == "stream"}
    # the same 270 steps: a frozen-weight method is far cheaper than rl, fst dearer; a KL term and LoRA add to it
    assert cost["memory-full-kl0-s0"] < cost["gepa-full-kl0-s0"] < cost["rl-full-kl0-s0"] < cost["fst-full-kl0-s0"]
    assert cost["rl-full-kl0-s0"] < cost["rl-full-kl0.1-s0"] < cost["rl-lora-kl0.1-s0"]


def test_eta_counts_only_work_run_in_this_session():
    now = [0.0]
    out = io.StringIO()
    p = benchutil.BenchProgress("full", total_weight=100, count=4, stream=out, tty=False, clock=lambda: now[0])
    p.advance(50, reused=True)  # instant: says nothing about the rate
    assert p.eta() is None
    now[0] = 100.0
    p.advance(10)  # 10 units in 100 s -> 40 units left take 400 s
    assert p.eta() == 400.0
    assert out.getvalue().splitlines()[-1] == "full 2/4 (1 reused)  elapsed 0:01:40  ETA 0:06:40"
    assert benchutil.hms(3725) == "1:02:05"



def test_a_resumed_bench_reports_the_time_of_every_sitting_that_trained(tmp_path):
    """A bench stopped and resumed twice: the third sitting reuses the others' runs, so its own time is not the
    study's; the README's wall time is the sum over sittings that trained something."""

    def sitting(wall_s: float, ran: int, reused: int, finished: bool) -> None:
        p = benchutil.BenchProgress("full", 10, ran + reused, stream=io.StringIO(), tty=False)
        for i in range(ran + reused):
            p.advance(1, reused=i < reused)
        claims.record_sitting(tmp_path, wall_s, p, finished)

    sitting(600.0, ran=3, reused=0, finished=False)
    sitting(2.0, ran=0, reused=3, finished=False)  # stopped before its first run ended: trained nothing
    sitting(900.0, ran=5, reused=3, finished=True)
    ledger = claims.sittings(tmp_path)
    assert [(r["ran"], r["reused"], r["finished"]) for r in ledger] == [(3, 0, False), (5, 3, True)]
    meta = {"wall_s": sum(r["wall_s"] for r in ledger), "sittings": len(ledger)}
    assert claims.wall_time(meta) == "wall time 25.0 min (sum of 2 sittings; it was resumed)"
    assert claims.wall_time({"wall_s": 60.0}) == "wall time 1.0 min"


def test_a_mangled_sittings_ledger_stops_the_study_before_any_run_with_its_line(tmp_path, monkeypatch):
    (tmp_path / claims.SITTINGS).write_text('{"wall_s": 600.0, "ran": 3}\n{"wall_s": 9\n')
    monkeypatch.setattr(claims, "preregister", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stop:
        claims.main(["--root", str(tmp_path)])
    assert f"{tmp_path / claims.SITTINGS}:2: not a sitting row" in str(stop.value) and "\n" not in str(stop.value)


def test_a_regenerated_benchmarks_readme_keeps_the_mfu_table(tmp_path):
    readme = tmp_path / "README.md"
    block = "<!-- mfu:start -->\n## Utilisation\n| a | b |\n<!-- mfu:end -->"
    readme.write_text(f"# old study text\n\n{block}\n")
    claims.write_plan_readme(readme)
    text = readme.read_text()
    assert "old study text" not in text and text.count(block) == 1
    claims.write_plan_readme(readme)
    assert readme.read_text().count(block) == 1
