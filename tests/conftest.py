"""Shared fixtures: a tiny random-init Llama with a character tokenizer, tiny tasks, and test helpers."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# As the CLI does before transformers is imported: no test ever waits on a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fastslow.tasks import Problem, Verdict
from fastslow.tiny import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run with ``threads:`` sets torch's global thread count: put it back after every test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_rows(run_dir: Path) -> list[dict]:
    """The metric rows of a run directory, parsed."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    """A CLI result that failed the promised way: exit ``code``, one line, no traceback, naming ``fragments``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)

class EchoTask:
    """Answer = the input reversed; reward = fraction of positions right (partial credit)."""

    seed_prompt = "Answer."

    def __init__(self, name: str = "echo", n_train: int = 64, n_eval: int = 16) -> None:
        self.name = name
        rng = random.Random(name)
        words = ["".join(rng.choice("abc") for _ in range(3)) for _ in range(n_train + n_eval)]
        probs = [Problem(f"{name}-{i}", w, w[::-1]) for i, w in enumerate(words)]
        self._split = {"train": probs[:n_train], "eval": probs[n_train:]}

    def problems(self, split):
        return self._split[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = completion.strip()
        hits = sum(a == b for a, b in zip(got, problem.answer))
        reward = hits / max(len(problem.answer), len(got), 1)
        return Verdict(reward, f"output {got!r}, expected {problem.answer!r}")


def echo_task() -> EchoTask:
    return EchoTask()


def echo_task_b() -> EchoTask:
    return EchoTask("echo_b")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def canned_reflector(prompt) -> str:
    """A reflection model stand-in: appends one hint line; deterministic."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    current = text.split("```", 2)[1].strip()
    return f"```\n{current} Reverse it.\n```"


class VowelTask(EchoTask):
    """Reward = share of vowels in the output: dense, so every group has reward variance."""

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = completion.strip()
        reward = sum(c in "aeiou" for c in got) / max(len(got), 1)
        return Verdict(reward, f"output {got!r}: {reward:.2f} vowels")


def vowel_task() -> VowelTask:
    return VowelTask("vowel")


def small_config(model: Path, out: Path, method: str = "fst", steps: int = 4, task: str = "conftest:vowel_task",
                 extra: list[str] = ()):
    from fastslow.config import load_config

    return load_config(None, [
        f"method={method}", f"model.path={model}", f"stages=[{{task: '{task}', steps: {steps}}}]", f"out={out}",
        "fast.every=2", "fast.budget=8", "fast.val_size=4", "fast.reflector=conftest:canned_reflector",
        "fast.population=2", "eval.every=2", "eval.n=8", "drift.every=2", "drift.probe_size=4",
        "slow.batch_problems=4", "slow.group_size=4", "slow.max_new_tokens=8", "slow.lr=0.01", "slow.warmup_steps=0",
        "checkpoint_every=2", *extra,
    ])
