"""Issue 21 (reliability round three and the newcomer's path): one test per numbered case (1-2 are in
test_forgery.py and test_sandbox.py). Each failed on the code before the fix; what is injected is named."""

from __future__ import annotations

import errno
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from test_faults import _one_line, _yaml
from typer.testing import CliRunner

from fastslow.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from fastslow.cli import app

runner = CliRunner()
KEY = "plainsecretvalue42XYZ"  # no known key shape, in a variable whose name says nothing


def _files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


# ---- 6, 7. a custom-named key and a hostile server never leak; recordings are capped -------------------------
class _Hostile:
    """An OpenAI-compatible server that quotes the Authorization header back (in a reply, or a 401 with ANSI
    escapes), or answers 20 MB."""

    def __init__(self, mode: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization", "")
                if mode == "401":
                    body, status = f"\x1b[2J\x1b[31minvalid key {auth} ({auth.split()[-1]})\x1b[0m".encode(), 401
                else:
                    said = f"Solve it. {auth}" if mode == "echo" else "x" * 20_000_000
                    text = f"```\n{said}\n```"
                    body, status = json.dumps({"choices": [{"message": {"content": text}}]}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def _fst_yaml(tmp_path, tiny_model, url, record):
    extra = (f"fast: {{reflector: 'openai:x', reflector_base_url: '{url}', reflector_key_env: MYKEY, every: 1, "
             f"budget: 8, val_size: 2, population: 2, reflection_retries: 0, reflection_record: '{record}', "
             "stop_after_failed_rounds: 0}\n")
    cfg = _yaml(tmp_path, tiny_model, extra=extra)
    cfg.write_text(cfg.read_text().replace("method: rl", "method: fst"))
    return cfg


def test_6_a_custom_named_key_in_a_401_body_is_masked_and_escapes_stripped(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MYKEY", KEY)
    server = _Hostile("401")
    try:
        out = tmp_path / "run"
        result = runner.invoke(app, ["run", str(_fst_yaml(tmp_path, tiny_model, server.url, tmp_path / "rec.jsonl")),
                                     "--out", str(out)])
    finally:
        server.httpd.shutdown()
    line = _one_line(result, 2, "HTTP 401")
    assert KEY not in result.output and "\x1b" not in result.output and "***" in line
    assert not out.exists() or KEY not in _files_text(out)


@pytest.mark.slow
def test_7_an_echoing_server_never_puts_the_key_in_any_file_and_recordings_are_capped(tiny_model, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("MYKEY", KEY)
    server = _Hostile("echo")
    out, record = tmp_path / "run", tmp_path / "reflections.jsonl"
    try:
        result = runner.invoke(app, ["run", str(_fst_yaml(tmp_path, tiny_model, server.url, record)),
                                     "--out", str(out)])
    finally:
        server.httpd.shutdown()
    assert result.exit_code == 0, result.output
    assert record.is_file() and KEY not in result.output
    assert KEY not in _files_text(out)  # summary, state, metrics, config, checkpoints
    assert KEY not in record.read_text() and "***" in record.read_text()

    from fastslow.config import FastConfig
    from fastslow.reflect import make_reflector

    big = _Hostile("big")
    try:
        lm = make_reflector("openai:x", FastConfig(reflector="openai:x", reflector_base_url=big.url,
                                                   reflection_record=str(tmp_path / "big.jsonl")))
        for _ in range(3):
            lm("prompt")
    finally:
        big.httpd.shutdown()
    assert (tmp_path / "big.jsonl").stat().st_size < 10_000  # not 3 x 20 MB
    replay = make_reflector(f"replay:{tmp_path / 'big.jsonl'}", FastConfig(reflector="feedback"))
    with pytest.raises(RuntimeError, match="exceeds fast.max_reply_chars"):
        replay("prompt")


# ---- 9. split sizes are capped; a seed is an integer ------------------------------------------------------------
@pytest.mark.parametrize(("spec", "named"), [("rg:basic_arithmetic?train=99999999999", "100000"),
                                             ("rg:basic_arithmetic?seed=abc", "seed must be an integer")])
def test_9_13_rg_sizes_and_seed_are_checked_in_one_line_even_under_dry_run(tiny_model, tmp_path, spec, named):
    cfg = _yaml(tmp_path, tiny_model, task=spec)
    _one_line(runner.invoke(app, ["run", str(cfg), "--dry-run"]), 2, named)


# ---- 10. a plug-in that fails to import is the user's environment ------------------------------------------------
def test_10_a_plugin_failing_to_import_exits_2(monkeypatch, tmp_path):
    from fastslow import registry

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setenv("FASTSLOW_PLUGINS", "nonexistent_mod_xyz")
    _one_line(runner.invoke(app, ["eval", "--model", "micro", "--task", "micro/flip"]), 2, "nonexistent_mod_xyz")


# ---- 11. report: invalid UTF-8, mathtext in names, HTML in summary values ----------------------------------------
@pytest.mark.slow
def test_11_report_survives_bad_bytes_and_escapes_every_value(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(_yaml(tmp_path, tiny_model, steps=1)), "--out", str(out),
                                 "--set", "stages.0.name=$x^2$ and $\\frac{1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    summary["method"] = "<img src=x onerror=alert(1)>"
    (out / "summary.json").write_bytes(json.dumps(summary).encode().replace(b'"seed"', b'"\xff\xfeseed"'))
    with (out / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 99, "note": "\xff\xfe"}\n')
    rl = tmp_path / "rl"
    assert runner.invoke(app, ["run", str(_yaml(tmp_path, tiny_model, steps=1)), "--out", str(rl)]).exit_code == 0
    result = runner.invoke(app, ["report", str(out), str(rl), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x" in page


# ---- 13. one line for a full disk, escapes, markup, a non-UTF-8 replay, and consistent units -----------------
def test_13_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path):
    from fastslow.errors import describe, exit_code

    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, lambda tmp: (tmp / "a.txt").write_text("one"))

    def full(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    for writer in (full, torch_full):
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(root, 2, writer)
        assert exit_code(err.value) == 2 and str(root) in describe(err.value) and "step_000001" in str(err.value)
        assert [p.name for p in list_checkpoints(root)] == ["step_000001"]
        assert [p.name for p in root.iterdir()] == ["step_000001"]  # the half-written one is gone


def test_13_user_text_is_not_markup_and_escapes_are_stripped(tmp_path):
    model = tmp_path / ":x: [bold red]nope[/] \x1b]0;pwned\x07\x1b[31m"
    result = runner.invoke(app, ["eval", "--model", str(model), "--task", "micro/flip"])
    line = _one_line(result, 2)
    assert ":x: [bold red]nope[/]" in line and "\x1b" not in result.output and "\x07" not in result.output


def test_13_a_replay_file_that_is_not_utf8_is_named_as_such(tiny_model, tmp_path):
    bad = tmp_path / "rec.jsonl"
    bad.write_bytes(b'{"hash": "\xff\xfe"}\n')
    cfg = _yaml(tmp_path, tiny_model, extra=f"fast: {{reflector: micro, reflection_replay: '{bad}'}}\n")
    cfg.write_text(cfg.read_text().replace("method: rl", "method: fst").replace("model: {path:", "model: {path:"))
    _one_line(runner.invoke(app, ["run", str(cfg), "--dry-run"]), 2, "not UTF-8")


def failing_reflector(prompt) -> str:
    raise ConnectionError("down")


def test_13_the_done_line_counts_failed_calls_over_calls(tiny_model, tmp_path):
    extra = ("fast: {reflector: 'test_reliability3:failing_reflector', every: 1, budget: 8, val_size: 2, "
             "population: 2, reflection_retries: 2, stop_after_failed_rounds: 0, preflight: false}\n")
    cfg = _yaml(tmp_path, tiny_model, extra=extra)
    cfg.write_text(cfg.read_text().replace("method: rl", "method: fst"))
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    fast = json.loads((tmp_path / "r" / "summary.json").read_text())["fast"]
    assert fast["reflection_calls"] > 0
    assert f"reflection errors {fast['reflection_calls']}/{fast['reflection_calls']}" in result.output


# ---- 3. nothing fastslow writes follows a link out of the run dir ------------------------------------------------
@pytest.mark.parametrize("name", [".fastslow.lock", ".fastslow-run", "config.yaml", "metrics.jsonl"])
@pytest.mark.slow
def test_3_a_planted_link_is_refused_and_the_users_file_is_untouched(tiny_model, tmp_path, name):
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, tiny_model)
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's own data\n")
    (out / name).unlink()
    (out / name).symlink_to(victim)
    _one_line(runner.invoke(app, ["run", str(cfg), "--out", str(out), "--resume"]), 2, "symbolic link", name)
    assert victim.read_text() == "the user's own data\n"


# ---- 5. a verifier stuck in a busy loop is killed; the stop rule holds for short runs -----------------------------
class Spinning:
    """A verifier that spins forever (pure Python, holding the GIL) on every call."""

    name, seed_prompt = "spin", "Answer."

    def __init__(self) -> None:
        from conftest import EchoTask

        self._task = EchoTask("spin")

    def problems(self, split):
        return self._task.problems(split)

    def verify(self, problem, completion):
        while True:
            pass


def spinning_task() -> Spinning:
    return Spinning()


def _spinning_threads() -> int:
    return sum(t.is_alive() and t.daemon for t in threading.enumerate())


@pytest.mark.slow
def test_5_a_spinning_verifier_is_killed_and_a_short_run_still_stops(tiny_model, tmp_path):
    import psutil

    threads_before = _spinning_threads()
    cfg = _yaml(tmp_path, tiny_model, task="test_reliability3:spinning_task", steps=1, extra="verify_timeout_s: 0.05\n")
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    # fewer calls than verifier_error_window (256), every one failed: exit 1, not 0
    _one_line(result, 1, "verifier failed on")
    assert _spinning_threads() == threads_before  # no thread left spinning
    me = psutil.Process()
    # (multiprocessing's resource tracker outlives any spawned pool an earlier test of this worker used: not ours)
    busy = [c for c in me.children(recursive=True) if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
            and "resource_tracker" not in " ".join(c.cmdline())]
    assert busy == []  # and no process either
    assert me.cpu_percent(interval=0.3) < 50  # nothing of ours keeps a core busy


# ---- 4. a task file edited under the same path is not resumed silently --------------------------------------------
def test_4_resume_refuses_a_task_file_whose_contents_changed(tiny_model, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"q{i}", "answer": str(i), "split": "eval" if i < 4 else "train"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, cfg = tmp_path / "run", _yaml(tmp_path, tiny_model, task=f"jsonl:{data}", steps=3)
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out), "--set", "stages.0.steps=2"]).exit_code == 0
    before = (out / "metrics.jsonl").read_bytes()
    data.write_text("\n".join(json.dumps({**r, "answer": r["answer"] + "0"}) for r in rows) + "\n")
    _one_line(runner.invoke(app, ["run", str(cfg), "--out", str(out), "--resume"]), 2, "changed since the checkpoint",
              "qa")
    assert (out / "metrics.jsonl").read_bytes() == before
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # restored: resumes
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out), "--resume"]).exit_code == 0


# ---- 8, 15. models fetch: killed, concurrent, shared; progress lines with elapsed time and ETA ----------------------
_FETCH = """\
import sys, time
sys.path.insert(0, {tests!r})
from fastslow import models
from gguf_tiny import write_tiny_gguf
from pathlib import Path
models.packaged_gguf = lambda spec: Path(write_tiny_gguf(Path({gguf!r})))
if {hang!r}:
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: time.sleep(120)
from fastslow.cli import main
sys.argv = ["fastslow", "models", "fetch", "smollm2-135m"]
sys.exit(main())
"""


def _fetch_proc(tmp_path, name, hang=False):
    import subprocess
    import sys

    script = tmp_path / f"{name}.py"
    script.write_text(_FETCH.format(tests=str(Path(__file__).parent), gguf=str(tmp_path / f"{name}.gguf"), hang=hang))
    env = {**os.environ, "FASTSLOW_HOME": str(tmp_path / "home"), "FASTSLOW_PROGRESS_EVERY_S": "0",
           "PYTHONPATH": os.environ.get("PYTHONPATH") or str(Path(__file__).parents[1] / "src")}
    return subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_8_15_fetch_killed_then_concurrent_leaves_one_readable_folder_and_prints_progress(tmp_path):
    import signal
    import time

    models_dir = tmp_path / "home" / "models"
    killed = _fetch_proc(tmp_path, "k", hang=True)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".smollm2-135m-") and p.is_dir() for p in models_dir.glob(".*")):
        assert time.monotonic() < deadline and killed.poll() is None, killed.communicate()
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    a, b = _fetch_proc(tmp_path, "a"), _fetch_proc(tmp_path, "b")
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    folder = models_dir / "smollm2-135m"
    assert {o.strip().splitlines()[-1] for o, _ in outs} == {str(folder)}
    logs = "\n".join(e for _, e in outs)
    assert logs.count("reading the GGUF file") == 1, logs  # one conversion: the other waited and found it
    assert "elapsed" in logs and "left" in logs  # plain progress lines, though stderr is no terminal
    leftovers = [p.name for p in models_dir.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # the killed fetch's temporary folder is gone
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()} == {0o644}


def test_15_a_run_whose_output_is_no_terminal_prints_plain_progress_lines(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_PROGRESS_EVERY_S", "0")
    result = runner.invoke(app, ["run", str(_yaml(tmp_path, tiny_model, steps=3)), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if ": step " in line]
    assert [line.split(": step ")[1].split()[0] for line in lines] == ["1/3", "2/3", "3/3"], result.output
    assert all("elapsed, about" in line and line.endswith(tuple("0123456789")) for line in lines)
    assert result.output.strip().splitlines()[-1].startswith("done:")


# ---- 14. the newcomer's path ----------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_14_eval_uses_the_tasks_own_budget_and_its_help_lists_the_families(tiny_model, monkeypatch):
    import fastslow.rollout as rollout

    budgets = []
    real = rollout.score_prompt

    def spy(sample, task, prompt, n, **kw):
        budgets.append(kw["max_new_tokens"])
        return real(sample, task, prompt, n, **{**kw, "max_new_tokens": 2})

    monkeypatch.setattr(rollout, "score_prompt", spy)
    for spec in ("humaneval", "rg:basic_arithmetic?max_terms=2&max_digits=1", "micro/flip"):
        result = runner.invoke(app, ["eval", "--model", str(tiny_model), "--task", spec, "--n", "1"])
        assert result.exit_code == 0, result.output
    assert budgets == [256, 32, 24]  # humaneval's function bodies, the shipped smollm2 config's 32, the default
    help_text = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert all(family in help_text for family in ("rg:", "humaneval", "jsonl:", "micro/"))


def test_14_the_readme_example_extracts_the_number_and_says_how_fastslow_gets_on_the_path():
    readme = (ROOT / "README.md").read_text()
    example = next(line for line in readme.splitlines() if "--model smollm2-135m" in line)
    assert "extract=last_number" in example
    assert ". .venv/bin/activate" in readme and ".venv/bin/fastslow" in readme


# ---- 12. fastslow launch: refusals before any process starts, one line from a dead rank, process groups -----------
def test_12_launch_refuses_an_unsplittable_batch_and_a_busy_port_before_starting(tiny_model, tmp_path):
    import socket

    cfg = _yaml(tmp_path, tiny_model, extra="engine: trl\n")
    cfg.write_text(cfg.read_text().replace("batch_problems: 2", "batch_problems: 4"))
    _one_line(runner.invoke(app, ["launch", "--nproc", "3", str(cfg), "--out", str(tmp_path / "r")]), 2,
              "batch_problems", "3 processes")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _one_line(runner.invoke(app, ["launch", "--nproc", "2", "--nnodes", "2", "--main-port", str(port), str(cfg),
                                      "--out", str(tmp_path / "r")]), 2, f"--main-port {port}", "not free")
    assert not (tmp_path / "r").exists()


def rank1_dies_task():
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank one's task failed to load")
    from conftest import vowel_task

    return vowel_task()


def sleeping_task():
    import time

    time.sleep(300)


def _launcher(tmp_path, tiny_model, task):
    import subprocess
    import sys

    cfg = _yaml(tmp_path, tiny_model, task=task, extra="engine: trl\n")
    out = tmp_path / f"run-{task.rsplit(':', 1)[1]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.environ.get("PYTHONPATH") or str(ROOT / "src"), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, "-m", "fastslow.cli", "launch", "--nproc", "2", str(cfg), "--out",
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, str(out)


def _ours(marker: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _wait_for(condition, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.slow
def test_12_a_dead_rank_is_one_line_not_torchruns_traceback(tiny_model, tmp_path):
    proc, _ = _launcher(tmp_path, tiny_model, "test_reliability3:rank1_dies_task")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("launch: /")]
    assert any("rank one's task failed to load" in line for line in lines), err  # the rank's own line
    assert any(line.startswith("launch: rank 1 exited with status 2") for line in lines), err
    assert len(lines) <= 3, err  # the command line, the rank's error, launch's verdict


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["launcher", "torchrun"])
def test_12_killing_the_launcher_or_torchrun_ends_every_process_with_one_line(tiny_model, tmp_path, victim):
    import signal

    proc, marker = _launcher(tmp_path, tiny_model, "test_reliability3:sleeping_task")
    try:
        _wait_for(lambda: len([p for p in _ours(marker) if "run" in p.info["cmdline"]]) >= 3)  # torchrun + 2 ranks
        if victim == "launcher":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            starter = next(p for p in _ours(marker) if "fastslow.launch" in p.info["cmdline"])
            starter.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 2 and "Traceback" not in err
            assert "killed by SIGKILL" in err.strip().splitlines()[-1], err
        _wait_for(lambda: not _ours(marker), timeout=30)  # torchrun and both ranks are gone
    finally:
        for p in _ours(marker):
            p.kill()
        if proc.poll() is None:
            proc.kill()


# ---- 16. report_to: the same rows in the trackers' own files ------------------------------------------------------
def _metric_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    from fastslow.trackers import numeric

    series: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in numeric(row).items():
            series.setdefault(key, []).append((row["step"], value))
    return series


def test_16_tensorboard_event_files_hold_every_metrics_row(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = _yaml(tmp_path, tiny_model, extra="report_to: [tensorboard]\n")
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = _metric_series(out)
    assert set(events.Tags()["scalars"]) == set(expected) and "slow/loss" in expected
    for key, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 on disk


@pytest.mark.slow
def test_16_wandb_offline_and_mlflow_local_get_the_same_rows(tiny_model, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (the tracker sets it too; restored after the test)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, tiny_model, extra="report_to: [wandb, mlflow]\n")
    result = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = _metric_series(out)

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fastslow").experiment_id])
    for key, points in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points]), key

    (offline,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing left the machine
    rows = _wandb_history(offline)
    for key, points in expected.items():
        got = [(r["_step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points]), key
    assert wandb.run is None  # finished


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run file (a LevelDB-style log of protobuf records: 7-byte headers, 32 KiB
    blocks), read back with wandb's own record type."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in items})
    return rows


def test_16_a_tracker_that_cannot_start_is_one_line_before_step_0(tiny_model, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, tiny_model, extra="report_to: [tensorboard, wandb]\n")
    _one_line(runner.invoke(app, ["run", str(cfg), "--out", str(out)]), 2, "report_to", "wandb", "fastslow[trackers]")
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""  # no step ran


@pytest.mark.parametrize("field", ["fast.reflector_key_env", "serve.api_key_env"])
def test_6_any_configured_key_env_is_masked_whatever_its_shape(field, monkeypatch):
    from fastslow.config import load_config
    from fastslow.util import one_line, redact

    name, value = f"ODDLY_NAMED_{field.split('.')[0].upper()}", f"zz9plural-{field.split('.')[0]}"
    monkeypatch.setenv(name, value)
    assert redact(f"it is {value}") == f"it is {value}"  # not a key until a config says so
    load_config(None, ["stages=[{task: micro/flip, steps: 1}]", f"{field}={name}"])
    assert value not in redact(f"it is {value}") and value not in one_line(f"x {value}")


@pytest.mark.slow
def test_12_the_accelerate_starter_also_ends_in_one_line(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "dies.py"
    script.write_text("import sys\nprint('error: the run said why', file=sys.stderr)\nsys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "fastslow.launch", "--accelerate", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("launch: the run exited with status 2"), done.stderr
