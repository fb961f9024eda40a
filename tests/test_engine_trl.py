"""Engine trl: TRL's GRPOTrainer behind the loop's seams (mapping, parity with native, run dir, two processes)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import VowelTask, small_config

from fastslow.config import ConfigError, load_config

pytest.importorskip("trl")

from fastslow.engines.trl import (  # noqa: E402
    EngineUnavailable,
    LockstepReflector,
    TrlEngine,
    grpo_kwargs,
    require_trl,
    sharding_of_accelerate_config,
    sharding_of_env,
)
from fastslow.launch import dry_run, launch_command  # noqa: E402
from fastslow.loop import Trainer  # noqa: E402
from fastslow.policy import Policy  # noqa: E402
from fastslow.reflect import GuardedReflector, ReflectionError  # noqa: E402
from fastslow.slow import Rollouts, SlowLearner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_mapping_carries_every_slow_field():
    cfg = load_config(None, [
        "stages=[{task: 'conftest:vowel_task', steps: 1}]", "slow.tau=3.5", "slow.kl_coef=0.002", "slow.group_size=6",
        "fast.population=3",
        "slow.batch_problems=4", "slow.lr=0.0003", "slow.warmup_steps=7", "slow.betas=[0.8, 0.95]",
        "slow.weight_decay=0.01", "slow.max_grad_norm=0.5", "slow.max_new_tokens=33", "slow.temperature=0.7",
        "slow.top_p=0.9", "slow.updates_per_batch=2", "scale.vllm=server", "scale.vllm_server_port=9001",
    ])
    kw = grpo_kwargs(cfg, world_size=2, cuda=False)
    assert kw["loss_type"] == "cispo" and kw["epsilon_high"] == 3.5 and kw["beta"] == 0.002
    assert kw["num_generations"] == 6 and kw["per_device_train_batch_size"] == 2 * 6  # 4 problems over 2 ranks
    assert (kw["learning_rate"], kw["warmup_steps"], kw["adam_beta1"], kw["adam_beta2"]) == (0.0003, 7, 0.8, 0.95)
    assert (kw["weight_decay"], kw["max_grad_norm"], kw["max_completion_length"]) == (0.01, 0.5, 33)
    assert (kw["temperature"], kw["top_p"], kw["num_iterations"]) == (0.7, 0.9, 2)
    assert kw["use_vllm"] and kw["vllm_mode"] == "server" and kw["vllm_server_port"] == 9001
    with pytest.raises(ConfigError, match="batch_problems"):
        grpo_kwargs(cfg, world_size=3)


def test_missing_trl_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(EngineUnavailable, match=r"pip install 'fastslow\[scale\]'"):
        require_trl()


def test_launch_uses_torchrun_on_cpu_and_accelerate_on_gpus():
    cpu = launch_command(Path("c.yaml"), ["--out", "x"], nproc=2, gpu=False)
    assert cpu[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and cpu[4] == "2"
    assert cpu[-5:] == ["fastslow.cli", "run", "c.yaml", "--out", "x"] and "--standalone" in cpu
    gpu = launch_command(Path("c.yaml"), [], nproc=8, nnodes=2, node_rank=1, main_address="10.0.0.1",
                         accelerate_config="configs/accelerate/zero3.yaml", gpu=True)
    assert "accelerate.commands.launch" in gpu and gpu[gpu.index("--num_processes") + 1] == "16"
    assert gpu[gpu.index("--machine_rank") + 1] == "1" and gpu[gpu.index("--config_file") + 1].endswith("zero3.yaml")


@pytest.mark.slow
def test_8_gpu_config_dry_runs_from_the_cli_without_a_gpu():
    cmd = [sys.executable, "-m", "fastslow.cli", "run", str(ROOT / "configs" / "qwen3-8b.yaml"), "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout)
    assert info["engine"] == "trl" and info["world_size"] == 8 and info["vllm"] == "colocate"
    assert info["grpo_config"]["per_device_train_batch_size"] == 4 * 8  # 32 problems over 8 GPUs, G = 8
    assert info["accelerate_config"].endswith("fsdp2.yaml") and info["sharding"] == "FSDP2"


@pytest.mark.parametrize("config", ["qwen3-8b.yaml", "qwen3-0.6b-1gpu.yaml"])
def test_gpu_configs_resolve_without_a_gpu(config, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    cfg = load_config(ROOT / "configs" / config)
    info = dry_run(cfg)
    assert info["engine"] == "trl" and info["grpo_config"]["loss_type"] == "cispo"
    assert info["world_size"] == cfg.scale.nproc
    assert info["grpo_config"]["per_device_train_batch_size"] * info["world_size"] == info["rows_per_step"]
    assert info["grpo_config"]["bf16"] is True  # resolved for the config's device, not this machine's


def test_dry_run_rejects_a_batch_that_does_not_split(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "r", extra=["engine=trl"])
    with pytest.raises(ConfigError, match="batch_problems"):
        dry_run(cfg, world_size=3)
    assert not (tmp_path / "r").exists()


def _fixed_rollouts(policy: Policy, task: VowelTask, groups: int, g: int) -> Rollouts:
    """Equal-length completions (no eos): TRL's token-mean then equals our per-group mean (see ScaleConfig)."""
    problems = [p for p in task.problems("train")[:groups] for _ in range(g)]
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdeiou xyz") for _ in range(6)) for _ in problems]
    prompts = [policy.format(task.seed_prompt, p.prompt) for p in problems]
    rewards = torch.tensor([task.verify(p, t).reward for p, t in zip(problems, texts)]).view(groups, g)
    return Rollouts(policy.make_batch(prompts, texts, add_eos=False), rewards)


@pytest.mark.parametrize("lora", [False, True])
def test_first_update_parity_with_native(tiny_model, tmp_path, lora):
    extra = ["method=rl", "slow.warmup_steps=0", "slow.group_size=8"] + (["model.lora={r: 4}"] if lora else [])
    cfg = small_config(tiny_model, tmp_path / "r", extra=extra)
    engine = TrlEngine(cfg)
    native = Policy.load(cfg.model)
    if lora:  # the same adapter initialisation on both sides
        native.model.load_state_dict(engine.policy.model.state_dict())
    rollouts = _fixed_rollouts(native, VowelTask("vowel"), groups=4, g=8)
    learner = SlowLearner(native, cfg.slow)
    before_n = {n: p.detach().clone() for n, p in native.trainable_parameters()}
    before_t = {n: p.detach().clone() for n, p in engine.policy.trainable_parameters()}
    assert sorted(before_n) == sorted(before_t)
    learner.step(rollouts)
    engine.slow.step(rollouts)
    moved_n = torch.cat([(p.detach() - before_n[n]).flatten() for n, p in native.trainable_parameters()])
    moved_t = torch.cat([(p.detach() - before_t[n]).flatten() for n, p in engine.policy.trainable_parameters()])
    assert moved_t.norm() > 0
    assert torch.nn.functional.cosine_similarity(moved_n, moved_t, dim=0) > 0.99


@pytest.mark.slow
def test_one_process_run_dir_contract(tiny_model, tmp_path):
    out = tmp_path / "run"
    extra = ["engine=trl", "model.lora={r: 4}", "slow.kl_target=1e-5"]  # a budget these steps overrun
    summary = Trainer(small_config(tiny_model, out, extra=extra)).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5))
    assert all(r["rollouts"] == r["step"] * 16 for r in rows)
    assert any("slow/loss" in r for r in rows) and any("fast/front_size" in r for r in rows)
    coefs = [r["slow/kl_coef"] for r in rows if "slow/kl_coef" in r]
    assert coefs[-1] > coefs[0]  # over budget: the drift budget raises TRL's beta
    saved = json.loads((out / "summary.json").read_text())
    assert saved["engine"] == "trl" and saved["world_size"] == 1 and saved["steps"] == 4
    assert saved["prompts"] == summary["prompts"] and saved["drift"]["weight_l2"] > 0
    assert (out / "checkpoints" / "step_000004" / "model" / "adapter_model.safetensors").is_file()


def _two_processes(tiny_model: Path, out: Path, *args: str) -> tuple[dict, dict]:
    """tests/trl_worker.py on two processes (torchrun, gloo); each rank's record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "trl_worker.py"), str(tiny_model), str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.slow
def test_two_processes_agree_on_weights_and_population(tiny_model, tmp_path):
    out = tmp_path / "run"
    # Replies carry the rank and a call counter: had each rank called its own model, the ranks'
    # prompts would differ. Lockstep: rank 0 calls it, every rank evolves with rank 0's replies.
    p0, p1 = _two_processes(tiny_model, out, "lockstep_reflectors:per_process_reflector")
    w0, w1 = (torch.load(f"{out}.rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    base = Policy.load(small_config(tiny_model, tmp_path / "b").model).model.state_dict()
    assert any(not torch.equal(w0[k], base[k]) for k in w0)  # they trained, and trained alike
    assert p0["world_size"] == 2 and p0["population"] == p1["population"] and p0["best"] == p1["best"]
    assert p0["fast"] == p1["fast"] and p0["fast"]["rounds"] == 2 and p0["fast"]["reflection_calls"] > 0
    # The preflight's test call too is made on rank 0 alone (before, it was skipped with several processes).
    assert p0["reflector_calls"] == p0["fast"]["reflection_calls"] + 1 and p1["reflector_calls"] == 0
    # Rank 1 sampled with rank 0's replies (its own model would have said "Hint 1-...").
    assert p1["hints"] and p1["hints"] == p0["hints"] and all(h.startswith("Hint 0-") for h in p1["hints"])
    # Every generate call has the same batch size on both ranks (short shares padded): no rank ever makes
    # a forward the other skips, which sharded weights need. GEPA's minibatch of 3 gives shares of 2 and 1.
    assert p0["generate_rows"] == p1["generate_rows"] and 2 in p0["generate_rows"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_processes_lose_a_failing_reflectors_round_alike(tiny_model, tmp_path):
    out = tmp_path / "run"
    # (fast.preflight off: its test call would refuse this reflector before step 0, see the next test)
    p0, p1 = _two_processes(tiny_model, out, "lockstep_reflectors:failing_reflector", "gepa", "fast.preflight=false")
    assert p0["fast"] == p1["fast"] and p0["population"] == p1["population"]
    assert p0["fast"]["reflection_errors"] > 0 and p0["reflector_calls"] > 0 and p1["reflector_calls"] == 0
    rounds = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "fast/accepted" in r]
    assert rounds and all(r["fast/accepted"] == 0 and r["fast/new_reflection_errors"] > 0 for r in rounds)


@pytest.mark.slow
def test_two_processes_refuse_a_dead_reflector_before_step_0_alike(tiny_model, tmp_path):
    """The preflight's test call runs on rank 0 with several processes too; every rank stops on its verdict."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "trl_worker.py"), str(tiny_model), str(out), "lockstep_reflectors:failing_reflector",
           "gepa"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0
    refusals = re.findall(r"\[rank(\d)\]: fastslow\.config\.ConfigError: (.*test call failed.*)", done.stderr)
    assert sorted(r for r, _ in refusals) == ["0", "1"] and len({line for _, line in refusals}) == 1
    assert not (out / "metrics.jsonl").exists()  # nothing ran


class _Pair:
    """Rank 0 and rank 1 guards in one process: rank 0's broadcast records what rank 1's returns."""

    def __init__(self, lm, **limits) -> None:
        self.sent: list = []
        self.main = LockstepReflector(GuardedReflector(lm, **limits), is_main=True, broadcast=self._send)
        self.other = LockstepReflector(GuardedReflector(self._never, **limits), is_main=False,
                                       broadcast=lambda _: self.sent.pop(0))

    def _send(self, obj):
        self.sent.append(obj)
        return obj

    @staticmethod
    def _never(prompt):
        raise AssertionError("only the main process calls the reflection model")

    def both(self, prompt) -> list:
        """Each side's reply, or its error text."""
        out = []
        for side in (self.main, self.other):
            try:
                out.append(side(prompt))
            except ReflectionError as exc:
                out.append(f"error: {exc}")
        return out


def test_lockstep_reflector_gives_every_rank_the_main_reply_and_counters():
    counter = iter(range(100))
    pair = _Pair(lambda prompt: f"```new {next(counter)}```", retries=1, timeout_s=5)
    assert pair.both("p") == ["```new 0```"] * 2 and pair.both("p") == ["```new 1```"] * 2
    assert pair.main.calls == pair.other.calls == 2 and pair.other.errors == 0


def test_lockstep_reflector_sends_a_timeout_as_the_same_error_to_every_rank():
    import threading

    hang = threading.Event()
    pair = _Pair(lambda prompt: hang.wait(5) or "late", retries=1, timeout_s=0.05, max_consecutive_failures=2)
    try:
        first = pair.both("p")
        assert first[0] == first[1] and "exceeded 0.05s" in first[0]
        assert pair.other.errors == pair.main.errors == 2 and not pair.other.exhausted  # retried on rank 0 only
        pair.both("p")
        assert pair.main.exhausted and pair.other.exhausted  # the round ends on every rank together
    finally:
        hang.set()


def test_sharded_accelerate_configs_are_recognised(tmp_path):
    assert sharding_of_accelerate_config(ROOT / "configs" / "accelerate" / "zero3.yaml") == "DeepSpeed ZeRO-3"
    assert sharding_of_accelerate_config(ROOT / "configs" / "accelerate" / "fsdp2.yaml") == "FSDP2"
    assert sharding_of_accelerate_config(ROOT / "configs" / "accelerate" / "ddp.yaml") is None
    zero2 = tmp_path / "zero2.yaml"
    zero2.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n")
    assert sharding_of_accelerate_config(zero2) is None
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text("distributed_type: FSDP\nfsdp_config: {fsdp_sharding_strategy: FULL_SHARD}\n")
    assert sharding_of_accelerate_config(fsdp1) == "FSDP1"
    with pytest.raises(ConfigError, match="scale.accelerate_config"):
        sharding_of_accelerate_config(tmp_path / "missing.yaml")
    assert sharding_of_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == (
        "DeepSpeed ZeRO-3")
    assert sharding_of_env({"ACCELERATE_USE_FSDP": "true"}) == "FSDP1"
    assert sharding_of_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "FSDP2"
    assert sharding_of_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) is None


def test_an_unsupported_sharding_is_refused_in_one_line_before_anything_runs(tiny_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fastslow.cli import app

    zero3 = str(ROOT / "configs" / "accelerate" / "zero3.yaml")
    cfg = small_config(tiny_model, tmp_path / "r", extra=["engine=trl", f"scale.accelerate_config={zero3}"])
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 is not supported.*fsdp2.yaml"):
        dry_run(cfg)
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 is not supported"):  # a one-process run too
        Trainer(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(f"engine: trl\nstages: [{{task: 'conftest:vowel_task', steps: 1}}]\n"
                    f"scale: {{accelerate_config: '{zero3}'}}\n")
    result = CliRunner().invoke(app, ["launch", "--nproc", "2", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not supported" in result.output
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch tells each process (FSDP v1)
    with pytest.raises(ConfigError, match="FSDP1 is not supported"):
        Trainer(small_config(tiny_model, tmp_path / "r", extra=["engine=trl"]))
    assert not (tmp_path / "r").exists()


def _torchrun(cfg: Path, out: Path, *extra: str, fsdp2: bool, wait: bool = True):
    """``fastslow run CFG`` on two processes (torchrun, gloo); ``fsdp2``: accelerate's FSDP2 (force_fsdp2.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    entry = [str(ROOT / "tests" / "fsdp2_cli.py")] if fsdp2 else ["-m", "fastslow.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
           "run", str(cfg), "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # one process group: torchrun and both ranks
    if wait:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    return proc


def _metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    def close(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)
        return x == y

    return len(a) == len(b) and all(x.keys() == y.keys() and all(close(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _trl_config(tmp_path: Path, tiny_model: Path, *, method: str, lora: bool) -> Path:
    cfg = tmp_path / f"{method}-{lora}.yaml"
    cfg.write_text(f"""method: {method}
engine: trl
model: {{path: '{tiny_model}'{", lora: {r: 4}" if lora else ""}}}
stages: [{{task: 'conftest:vowel_task', steps: 4}}]
slow: {{batch_problems: 4, group_size: 4, max_new_tokens: 8, lr: 0.01, warmup_steps: 2, kl_coef: 0.01}}
fast: {{every: 2, population: 2, budget: 8, val_size: 4, reflector: 'conftest:canned_reflector'}}
drift: {{every: 2, probe_size: 4, max_new_tokens: 8}}
eval: {{every: 2, n: 8}}
checkpoint_every: 2
threads: 1
seed: 3
""")
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize(("method", "lora"), [("rl", False), ("fst", True)])
def test_fsdp2_trains_as_ddp_does(tiny_model, tmp_path, method, lora):
    """Sharded (FSDP2) and whole (DDP) weights over two processes: the same run, step by step, and the same
    checkpointed weights (gathered from the shards)."""
    from safetensors.torch import load_file

    cfg = _trl_config(tmp_path, tiny_model, method=method, lora=lora)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(cfg, ddp, fsdp2=False)
    _torchrun(cfg, fsdp, fsdp2=True)
    assert json.loads((fsdp / "summary.json").read_text())["sharding"] == "FSDP2"
    assert json.loads((ddp / "summary.json").read_text())["sharding"] is None
    rows = _metric_rows(fsdp)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["drift/kl_rev"] > 0
    assert _same_rows(rows, _metric_rows(ddp))
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(str(run / "checkpoints" / "step_000004" / "model" / name)) for run in (ddp, fsdp))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_fsdp2_kill_9_then_resume_gives_the_uninterrupted_metrics(tiny_model, tmp_path):
    cfg = _trl_config(tmp_path, tiny_model, method="fst", lora=True)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _torchrun(cfg, whole, fsdp2=True)
    proc = _torchrun(cfg, cut, fsdp2=True, wait=False)
    deadline = time.monotonic() + 600
    while not ((cut / "checkpoints").is_dir() and _rows(cut) >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, at once
    proc.wait()
    assert _rows(cut) < 5  # killed before the end
    _torchrun(cfg, cut, "--resume", fsdp2=True)
    assert (cut / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert json.loads((cut / "summary.json").read_text())["prompts"] == json.loads(
        (whole / "summary.json").read_text())["prompts"]


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_metrics(tiny_model, tmp_path):
    cfg = _trl_config(tmp_path, tiny_model, method="fst", lora=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}

    def start(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fastslow.cli", "run", str(cfg), "--out", str(out), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert start(whole).wait(timeout=600) == 0
    proc = start(cut)
    deadline = time.monotonic() + 600
    while not ((cut / "checkpoints").is_dir() and _rows(cut) >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _rows(cut) < 5  # killed before the end
    resumed = start(cut, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert (cut / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert json.loads((cut / "summary.json").read_text())["prompts"] == json.loads(
        (whole / "summary.json").read_text())["prompts"]


def _rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_launch_refuses_the_native_engine_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from fastslow.cli import app

    cfg = tmp_path / "native.yaml"
    cfg.write_text("stages: [{task: 'conftest:vowel_task', steps: 1}]\n")
    result = CliRunner().invoke(app, ["launch", "--nproc", "2", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "engine 'trl'" in result.output
    assert not (tmp_path / "r").exists()


def test_resumed_weights_replace_the_trained_part_but_not_the_base(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "r", extra=["method=rl"])
    first = TrlEngine(cfg)
    original = {n: p.detach().clone() for n, p in first.policy.trainable_parameters()}
    with torch.no_grad():
        for _, p in first.policy.trainable_parameters():
            p.add_(0.5)
    first.policy.save(tmp_path / "model")
    resumed = TrlEngine(cfg, weights=tmp_path / "model")
    trained = dict(resumed.policy.trainable_parameters())
    base = resumed.policy.base_parameters()
    assert all(torch.allclose(trained[n], original[n] + 0.5) for n in original)
    assert all(torch.equal(base[n], original[n]) for n in original)


def test_drift_budget_starts_and_resumes_alike_on_both_engines(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "r", extra=["method=rl", "slow.kl_target=0.05"])
    engine = TrlEngine(cfg)
    native = SlowLearner(Policy.load(cfg.model), cfg.slow)
    assert engine.trainer.beta == native.kl_coef > 0
    for kl in (0.01, 0.2, 0.3):  # the same measurements move both alike
        engine.slow.observe_drift(kl)
        native.observe_drift(kl)
    assert engine.trainer.beta == pytest.approx(native.kl_coef)
    resumed = TrlEngine(cfg)
    resumed.slow.load_state_dict(engine.slow.state_dict())
    resumed.slow.observe_drift(0.02)
    engine.slow.observe_drift(0.02)
    assert resumed.trainer.beta == pytest.approx(engine.trainer.beta)
    for e in (engine, resumed):
        e.close()
