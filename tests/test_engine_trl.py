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
    assert (kw["learning_rate"], kw["adam_beta1"], kw["adam_beta2"]) == (0.0003, 0.8, 0.95)
    assert kw["lr_scheduler_type"] == "constant"  # the warm-up is fastslow's schedule, not TRL's
    assert (kw["weight_decay"], kw["max_grad_norm"], kw["max_completion_length"]) == (0.01, 0.5, 33)
    assert (kw["temperature"], kw["top_p"], kw["num_iterations"]) == (0.7, 0.9, 2)
    assert kw["use_vllm"] and kw["vllm_mode"] == "server" and kw["vllm_server_port"] == 9001
    assert kw["vllm_importance_sampling_correction"] and kw["vllm_importance_sampling_mode"] == "sequence_mask"
    with pytest.raises(ConfigError, match="batch_problems"):
        grpo_kwargs(cfg, world_size=3)


def test_missing_trl_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(EngineUnavailable, match=r"pip install 'fastslow\[scale\]'"):
        require_trl()


def test_launch_uses_torchrun_on_cpu_and_accelerate_on_gpus():
    cpu = launch_command(Path("c.yaml"), ["--out", "x"], nproc=2, gpu=False)
    assert cpu[1:4] == ["-m", "fastslow.launch", "--nproc_per_node"] and cpu[4] == "2"  # torchrun, wrapped
    assert cpu[-5:] == ["fastslow.cli", "run", "c.yaml", "--out", "x"] and "--standalone" in cpu
    gpu = launch_command(Path("c.yaml"), [], nproc=8, nnodes=2, node_rank=1, main_address="10.0.0.1",
                         accelerate_config="configs/accelerate/zero3.yaml", gpu=True)
    assert gpu[1:4] == ["-m", "fastslow.launch", "--accelerate"] and gpu[gpu.index("--num_processes") + 1] == "16"
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
    assert info["lr_schedule"]["warmup_updates"] == 10 and info["gradient_checkpointing"] is True
    assert info["vllm_importance_sampling"]["mode"] == info["grpo_config"]["vllm_importance_sampling_mode"]


@pytest.mark.parametrize("nproc", [1, 2, 8])
def test_8_gpu_config_warms_up_over_10_updates_whatever_the_process_count(nproc, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    info = dry_run(load_config(ROOT / "configs" / "qwen3-8b.yaml"), world_size=nproc)
    assert info["world_size"] == nproc and info["lr_schedule"]["warmup_updates"] == 10
    assert info["lr_schedule"]["first_update_lr"] == pytest.approx(1e-6)  # lr / 10, not 0
    assert info["grpo_config"]["lr_scheduler_type"] == "constant"  # TRL's own schedule is not used
    assert info["gradient_checkpointing"] is True and info["grpo_config"]["gradient_checkpointing"] is True
    assert info["vllm_importance_sampling"] == {
        "mode": "sequence_mask", "cap": 3.0,
        "ratio": "exp(trainer log-prob - vLLM's sampling log-prob) per TRL's mode; off: none"}
    assert info["grpo_config"]["vllm_importance_sampling_correction"] is True


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
@pytest.mark.slow
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
    assert sharding_of_accelerate_config(zero2) == "DeepSpeed ZeRO-2"
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text("distributed_type: FSDP\nfsdp_config: {fsdp_sharding_strategy: FULL_SHARD}\n")
    assert sharding_of_accelerate_config(fsdp1) == "FSDP1"
    with pytest.raises(ConfigError, match="scale.accelerate_config"):
        sharding_of_accelerate_config(tmp_path / "missing.yaml")
    assert sharding_of_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == (
        "DeepSpeed ZeRO-3")
    assert sharding_of_env({"ACCELERATE_USE_FSDP": "true"}) == "FSDP1"
    assert sharding_of_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "FSDP2"
    assert sharding_of_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == (
        "DeepSpeed ZeRO-2")


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


# ---- what the run reports is what was measured (issue 16) ---------------------------------------------------------


def _moved_weights(tiny_model: Path, out: Path) -> Path:
    """The tiny model's weights moved as training would move them, saved as a checkpoint's model/ dir."""
    from fastslow.config import ModelConfig

    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.save(out)
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("resumed", [False, True])
def test_drift_on_trl_is_measured_against_the_real_base(tiny_model, tmp_path, resumed):
    """Full weights, kl_coef 0: the base is a frozen copy of the initial weights, before and after --resume."""
    from fastslow.drift import DriftMeter

    cfg = small_config(tiny_model, tmp_path / "r", extra=["method=rl", "drift.max_new_tokens=6"])
    moved = _moved_weights(tiny_model, tmp_path / "moved")
    engine = TrlEngine(cfg, weights=moved if resumed else None)
    if not resumed:  # trained in place, as the slow channel's updates do
        state = Policy.load(cfg.model, weights=moved).model.state_dict()
        engine.policy.model.load_state_dict(state)
    native = Policy.load(cfg.model, weights=moved)
    task = VowelTask("vowel")
    probes = [native.format(task.seed_prompt, p.prompt) for p in task.problems("eval")[:4]]
    for p in (engine.policy, native):
        p.version = 1  # past the first update
    got = DriftMeter(engine.policy, probes, cfg.drift, seed=0).measure()
    want = DriftMeter(native, probes, cfg.drift, seed=0).measure()
    assert got["drift/kl_rev"] > 0 and got["drift/kl_fwd"] > 0
    for key in ("drift/kl_rev", "drift/kl_fwd", "drift/weight_l2", "drift/entropy"):
        assert _rel(got[key], want[key]) <= 1e-5, (key, got[key], want[key])
    engine.close()


def test_each_update_uses_the_logged_lr_on_both_engines(tiny_model, tmp_path):
    """Warm-up 2: updates use lr/2, lr, lr on both engines; the first update is not a no-op."""
    cfg = small_config(tiny_model, tmp_path / "r", extra=["method=rl", "slow.warmup_steps=2", "slow.lr=0.01"])
    engine = TrlEngine(cfg)
    native = Policy.load(cfg.model)
    learner = SlowLearner(native, cfg.slow)
    rollouts = _fixed_rollouts(native, VowelTask("vowel"), groups=4, g=4)
    before = {n: p.detach().clone() for n, p in engine.policy.trainable_parameters()}
    trl_lr, native_lr = [], []
    for i in range(3):
        trl_lr.append(engine.slow.step(rollouts)["slow/lr"])
        native_lr.append(learner.step(rollouts)["slow/lr"])
        if i == 0:
            assert any(not torch.equal(p, before[n]) for n, p in engine.policy.trainable_parameters())
    assert trl_lr == native_lr == [0.005, 0.01, 0.01]
    assert engine.describe()["lr_schedule"]["first_update_lr"] == 0.005
    engine.close()


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_is_on_when_asked_and_still_trains(tiny_model, tmp_path, lora):
    extra = ["method=rl", "slow.warmup_steps=0", "scale.gradient_checkpointing=true"]
    cfg = small_config(tiny_model, tmp_path / "r", extra=extra + (["model.lora={r: 4}"] if lora else []))
    engine = TrlEngine(cfg)
    inner = engine.trainer.model.get_base_model() if lora else engine.trainer.model
    assert inner.is_activation_checkpointing
    rollouts = _fixed_rollouts(engine.policy, VowelTask("vowel"), groups=4, g=4)
    before = {n: p.detach().clone() for n, p in engine.policy.trainable_parameters()}
    engine.slow.step(rollouts)
    assert any(not torch.equal(p, before[n]) for n, p in engine.policy.trainable_parameters())
    engine.close()


def test_trl_scales_log_probs_by_the_sampling_temperature(tiny_model, tmp_path):
    """The by-design difference ScaleConfig documents: TRL's log-probs are of logits / slow.temperature."""
    cfg = small_config(tiny_model, tmp_path / "r", extra=["method=rl", "slow.temperature=0.5"])
    engine = TrlEngine(cfg)
    native = Policy.load(cfg.model)
    batch = _fixed_rollouts(native, VowelTask("vowel"), groups=1, g=4).batch
    inputs = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
              "completion_mask": batch.completion_mask}
    with torch.no_grad():
        trl = engine.slow._logps(inputs, reference=False)
        logits = native.completion_logits(batch)
    assert torch.allclose(trl, Policy.token_logprobs(logits / 0.5, batch.completion_ids), atol=1e-5)
    assert not torch.allclose(trl, Policy.token_logprobs(logits, batch.completion_ids), atol=1e-3)
    from fastslow.config import ScaleConfig

    assert "slow.temperature" in ScaleConfig.__doc__ and "temperature scaling" in ScaleConfig.__doc__
    engine.close()


class FakeVLLM:
    """Stands in for TRL's ``VLLMGeneration`` on CPU: samples with the trainer's model at the settings TRL's
    generator holds at call time, and returns token ids and their log-probs as vLLM does (one top-1 list per
    token), shifted by ``logprob_shift`` so a test can tell the ratio was computed from them."""

    def __init__(self, engine: TrlEngine, logprob_shift: float) -> None:
        args = engine.trainer.args
        self.model, self.tokenizer, self.shift = engine.trainer.model, engine.policy.tokenizer, logprob_shift
        self.temperature, self.top_p, self.max_completion_length = args.temperature, args.top_p, 16
        self.generation_kwargs: dict = {}
        self.calls: list[dict] = []

    def sync_weights(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        seen = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_completion_length,
                "seed": self.generation_kwargs.get("seed")}
        self.calls.append(seen)
        torch.manual_seed(seen["seed"])
        eos, completions, logprobs = self.tokenizer.eos_token_id, [], []
        for ids in prompts:
            x = torch.tensor([ids])
            sampling = ({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}
                        if self.temperature > 0 else {"do_sample": False})
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), eos_token_id=eos,
                                      pad_token_id=eos, max_new_tokens=self.max_completion_length, **sampling)
            comp = out[0, len(ids):].tolist()
            comp = comp[: comp.index(eos) + 1] if eos in comp else comp
            logits = self.model(input_ids=torch.tensor([ids + comp])).logits[0, len(ids) - 1: len(ids) - 1 + len(comp)]
            lp = torch.log_softmax(logits / max(self.temperature, 1e-6), -1).gather(-1, torch.tensor(comp)[:, None])
            completions.append(comp)
            logprobs.append([[v - self.shift] for v in lp.squeeze(1).tolist()])
        return prompts, completions, logprobs, None


def test_vllm_rollouts_honour_each_call_and_feed_the_importance_ratio(tiny_model, tmp_path):
    """TRL's vLLM path switched on with a stand-in generator (vLLM needs a GPU): per-call sampling settings and
    seeds reach vLLM, its log-probs travel with the rollouts, and the slow step supplies TRL's ratio."""
    extra = ["method=rl", "scale.vllm_importance_sampling=token_truncate", "slow.warmup_steps=0"]
    cfg = small_config(tiny_model, tmp_path / "r", extra=extra)
    engine = TrlEngine(cfg)
    tr = engine.trainer
    fake = FakeVLLM(engine, logprob_shift=0.05)
    tr.use_vllm, tr.vllm_generation, tr._last_loaded_step = True, fake, 0
    tr.vllm_importance_sampling_correction, tr.vllm_importance_sampling_mode = True, "token_truncate"
    task = VowelTask("vowel")
    problems = task.problems("train")[:4]
    greedy = engine.sample(task, [(task.seed_prompt, p) for p in problems], temperature=0.0, top_p=0.9,
                           max_new_tokens=5, seed=7)
    assert fake.calls[-1] == {"temperature": 0.0, "top_p": 0.9, "max_tokens": 5, "seed": 7}
    assert fake.temperature == 1.0 and fake.generation_kwargs == {}  # TRL's own settings are put back
    assert greedy.batch.completion_mask.sum(1).max() <= 5
    pairs = [(task.seed_prompt, p) for p in problems for _ in range(4)]
    scored = engine.sample(task, pairs, temperature=1.0, max_new_tokens=8, seed=3)
    assert scored.batch.logprobs is not None
    seen = {}
    compute_loss = tr.compute_loss

    def recording(model, inputs, **kw):
        seen.update(inputs)
        return compute_loss(model, inputs, **kw)

    tr.compute_loss = recording
    rewards = torch.tensor(scored.rewards, dtype=torch.float32).view(4, 4)
    metrics = engine.slow.step(Rollouts(scored.batch, rewards))
    assert math.isfinite(metrics["slow/loss"]) and metrics["slow/grad_norm"] > 0
    mask = seen["completion_mask"].bool()
    ratio = seen["importance_sampling_ratio"][mask]
    assert torch.allclose(ratio, torch.full_like(ratio, math.exp(0.05)), rtol=1e-4)  # exp(trainer - vLLM)
    engine.close()


def test_adapter_names_every_private_trl_member_and_they_are_all_there(monkeypatch):
    from trl import GRPOTrainer

    from fastslow.engines.trl import adapter

    assert adapter.problems() == []
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", lambda self, model, ids: None)
    monkeypatch.delattr(GRPOTrainer, "_generate_single_turn")
    found = adapter.problems()
    assert any("_get_per_token_logps_and_entropies" in f for f in found)
    assert any("_generate_single_turn is gone" in f for f in found)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_1_and_2_are_refused_in_one_line(tiny_model, tmp_path, monkeypatch, stage):
    from typer.testing import CliRunner

    from fastslow.cli import app

    zero = tmp_path / f"zero{stage}.yaml"
    zero.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config: {{zero_stage: {stage}}}\nnum_processes: 2\n")
    cfg = small_config(tiny_model, tmp_path / "r", extra=["engine=trl", f"scale.accelerate_config={zero}"])
    with pytest.raises(ConfigError, match=f"DeepSpeed ZeRO-{stage} is not supported"):
        dry_run(cfg)
    with pytest.raises(ConfigError, match=f"DeepSpeed ZeRO-{stage} is not supported"):
        Trainer(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(f"engine: trl\nstages: [{{task: 'conftest:vowel_task', steps: 1}}]\n"
                    f"scale: {{accelerate_config: '{zero}'}}\n")
    for args in (["launch", "--nproc", "2", str(path)], ["run", str(path), "--dry-run"]):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r")])
        assert result.exit_code == 2 and f"DeepSpeed ZeRO-{stage} is not supported" in result.output
        assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch tells each process
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    with pytest.raises(ConfigError, match=f"DeepSpeed ZeRO-{stage} is not supported"):
        Trainer(small_config(tiny_model, tmp_path / "r", extra=["engine=trl"]))
    assert not (tmp_path / "r").exists()


def _launch(tmp_path: Path, config: str, out: Path) -> tuple[int, list[str]]:
    """``fastslow launch --nproc 2 CONFIG`` (torchrun, gloo): its exit status and the error messages of all ranks
    (each rank prints ``error: <message>``; two ranks' lines may interleave, so they are split at ``error:``)."""
    path = tmp_path / "launch.yaml"
    path.write_text(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fastslow.cli", "launch", "--nproc", "2", str(path), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # a hung rank fails here
    text = "\n".join(line for line in done.stderr.splitlines() if "error:" in line)
    return done.returncode, [m.strip() for m in re.split(r"error:", text) if m.strip()]


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_the_same_line(tiny_model, tmp_path):
    """The verifier fails in rank 0's share only; the verdict is rank 0's alone: both ranks stop with it."""
    code, errors = _launch(tmp_path, f"""method: rl
engine: trl
model: {{path: '{tiny_model}'}}
stages: [{{task: 'rank_tasks:rank0_broken_task', steps: 4}}]
slow: {{batch_problems: 4, group_size: 4, max_new_tokens: 8, lr: 0.01, warmup_steps: 0}}
drift: {{every: 2, probe_size: 4, max_new_tokens: 8}}
eval: {{every: 2, n: 8}}
verifier_error_window: 16
max_verifier_error_share: 0.2
threads: 1
""", tmp_path / "run")
    assert code != 0
    assert len(errors) == 2 and errors[0] == errors[1] and "the verifier failed" in errors[0], errors
    rows = _metric_rows(tmp_path / "run")
    assert rows[-1]["step"] == 1  # the row that showed the counts, then the stop


@pytest.mark.slow
def test_the_evaluation_row_of_distinct_views_is_the_same_on_both_engines(tiny_model, tmp_path):
    """The eval row a user reads (seed, task-aware, task-agnostic rewards, decoded together when greedy) comes out
    the same from the trl engine's sampler as from the native one, on the same weights."""
    rows = []
    for engine in ("native", "trl"):
        trainer = Trainer(small_config(tiny_model, tmp_path / engine, task="conftest:vowel_task",
                                       extra=[f"engine={engine}", "eval.n=16"]))
        task = next(iter(trainer.tasks.values()))
        gen = torch.Generator().manual_seed(0)  # the same weights on both engines, moved so that contexts matter
        with torch.no_grad():
            for q in trainer.policy.model.parameters():
                q.add_(0.5 * torch.randn(q.shape, generator=gen))
        trainer.fast.population = ["Answer with the vowels only.", task.seed_prompt]
        trainer.fast.best[task.name] = "Count the vowels."
        rows.append(trainer._evaluate(step=0))
        trainer.run()
    assert len(rows[0]) == 3 and len(set(rows[0].values())) > 1  # three views, not all alike
    assert rows[0] == rows[1]
