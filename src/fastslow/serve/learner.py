"""What is served (weights + fast context + version) and the background learner that improves it from traffic.

    feedback rows (durable, serve.sqlite)
        -> fast channel: a GEPA round on the SERVED weights every fast_every_n_feedbacks   -> new context at once
           and/or memory curated from those feedback rows (fast.kind memory | gepa+memory) -> retrieved per request
        -> slow channel: CISPO steps on a COPY of the weights, every every_n_feedbacks or when idle
        -> gate: exact KL(pi||base) on the probe set <= max_kl and held-out reward >= served - max_regression
        -> promoted: weights copied into the served model under the swap lock (between two batches)
           rejected: the copy is reset to the served weights; the reason is a metrics.jsonl row

A feedback row is one rollout: (formatted prompt, completion, reward). Traffic rarely repeats a problem, so a
training batch of ``serve.train_batch`` rollouts is one advantage group (the batch mean is the baseline).
Only the first step after a reset is exactly on-policy (the answers came from the served weights, the copy
starts equal to them); CISPO's truncated ratio is computed against the copy's own weights, as in the loop.

With an experience memory (``method: memory``, or ``fst`` with ``fast.kind: memory | gepa+memory``) a request's
context is the served prompt (the task's seed, or GEPA's best) plus what the memory retrieves for its user turn from
the served task's lessons and cases (:meth:`Served.context_for`, the task-aware view). The memory learns only from
traffic that got feedback: each feedback row is an attempt (user turn, answer, reward, feedback text) for
:meth:`fastslow.memory.MemoryChannel.learn` (cases, the curator through the reflector seam, marks from which
answers were shown a lesson), merged by delta operations between two batches; held-out problems never enter it.
A changed memory is a new context version, saved with the served version (``versions/step_<n>/state.json``; its
files in ``memory/``, as in a training run), so a restart serves the same memory. ``method: memory`` never changes
the weights (no slow channel: KL exactly 0).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastslow.channels import slow_on
from fastslow.checkpoint import latest_good_checkpoint, save_checkpoint
from fastslow.config import Config
from fastslow.drift import DriftMeter
from fastslow.memory import GepaMemoryChannel, MemoryChannel
from fastslow.memory.channel import Attempt
from fastslow.policy import Policy
from fastslow.rollout import PolicySampler, score_prompt
from fastslow.serve.store import Feedback, FeedbackStore
from fastslow.slow import Rollouts, SlowLearner
from fastslow.tasks import Problem, Task
from fastslow.util import derive_seed, one_line

VERSIONS = "versions"


def policy_view(policy: Policy) -> Policy:
    """The same weights with their own tokenizer: a second thread may sample with it while the generation
    thread uses ``policy`` (a fast tokenizer refuses concurrent calls that change its padding)."""
    view = _moved_like(Policy(policy.model, copy.deepcopy(policy.tokenizer), policy.device,
                              base_model=None if policy.is_lora else policy.base_model), policy)
    view.version = policy.version
    return view


def _moved_like(new: Policy, source: Policy) -> Policy:
    """``new`` holds ``source``'s weights: trained ones when ``source`` was loaded trained or has been updated
    (the drift meter checks base == policy only for weights that start at the base)."""
    new.trained_start = source.trained_start or source.version > 0
    return new


def trainable_copy(policy: Policy) -> Policy:
    """A copy of the served weights to train (the frozen base is shared; under LoRA only the adapter trains)."""
    model = copy.deepcopy(policy.model)
    for name, param in model.named_parameters():
        param.requires_grad_(not policy.is_lora or "lora_" in name)
    copied = _moved_like(Policy(model, copy.deepcopy(policy.tokenizer), policy.device,
                                base_model=None if policy.is_lora else policy.base_model), policy)
    copied.version = policy.version
    return copied


@dataclass
class ServedState:
    """Counters a restart resumes from (saved with every served version)."""

    weights_version: int = 0  # promotions so far
    context_version: int = 0  # fast-context changes so far
    context: str = ""
    kl_rev: float = 0.0  # the served weights' exact KL(pi||base) per token on the probe set
    heldout: float | None = None  # the served version's held-out reward (gate_n eval problems, greedy)
    slow_cursor: int = 0  # last feedback seq trained on
    fast_cursor: int = 0  # last feedback seq seen by a fast round
    steps: int = 0  # CISPO steps taken on candidates
    rollouts: int = 0  # feedback rollouts trained on
    fast_rollouts: int = 0  # rollouts of fast-channel rounds
    gates: int = 0  # candidates gated (promoted + rejected)
    best_heldout: float | None = None  # the best held-out reward served under the current context (a ratchet)
    snapshots: int = 0  # versions saved


def fast_parts(fast) -> tuple[object | None, MemoryChannel | None]:
    """(GEPA's channel, the memory) of a fast channel (either may be None)."""
    if isinstance(fast, GepaMemoryChannel):
        return fast.gepa, fast.memory
    if isinstance(fast, MemoryChannel):
        return None, fast
    return fast, None


def traffic_problem(user: str) -> Problem:
    """A user turn that is no problem of the task, as a problem (its id: the text's hash; no known answer)."""
    text = user.strip()
    return Problem(f"user-{hashlib.sha256(text.encode()).hexdigest()[:16]}", text, "")


class Served:
    """What the next batch is answered with. The generation thread holds ``lock`` for a whole batch; a
    promotion copies new weights in (a memory merges) under the same lock, so a batch never sees two versions.
    ``problems``: user turn -> problem of the task; ``memory``: the experience memory retrieved per request."""

    def __init__(self, policy: Policy, task: Task, state: ServedState, system_message: str, *,
                 problems: dict[str, Problem] | None = None, memory: MemoryChannel | None = None) -> None:
        self.policy, self.task, self.state = policy, task, state
        self.system_message = system_message
        self.problems, self.memory = problems or {}, memory
        self.lock = threading.Lock()
        self.memory_lock = threading.Lock()  # retrieval (any thread) and merges: the memory is not thread-safe
        if not state.context:
            state.context = task.seed_prompt

    @property
    def fingerprint(self) -> str:
        return f"fastslow-w{self.state.weights_version}-c{self.state.context_version}"

    def context_for(self, user: str) -> str:
        """The fast context of one request: the served task's best prompt, plus with a memory what it retrieves
        for this user turn from the task's lessons and cases (a known problem's own case is not shown for it)."""
        if self.memory is None:
            return self.state.context
        problem = self.problems.get(user.strip()) or traffic_problem(user)
        with self.memory_lock:
            return self.memory.context(self.state.context, self.task, problem, "task")[0]

    def system_for(self, user: str, system: str | None) -> str:
        """The system turn a request is answered with, by ``serve.system_message``."""
        context = self.context_for(user)
        if system is None or self.system_message == "replace":
            return context
        if self.system_message == "keep":
            return system
        return f"{context}\n\n{system}" if context else system


class MetricsLog:
    """Appends rows to the run dir's metrics.jsonl, each written whole and fsynced (rows are rare)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():  # a kill -9 mid-write may leave a partial last line: cut it
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[: data.rfind(b"\n") + 1])
        self._lock = threading.Lock()

    def write(self, row: dict) -> None:
        line = (json.dumps(row) + "\n").encode()
        with self._lock, self.path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def save_version(out: Path, served: Served, fast_state: dict | None, keep: int) -> Path:
    """Seal the served weights, context and counters as ``versions/step_<n>`` (atomic; see checkpoint.py)."""
    st = served.state
    st.snapshots += 1

    def write(tmp: Path) -> None:
        served.policy.save(tmp / "model")
        (tmp / "state.json").write_text(json.dumps({"served": asdict(st), "fast": fast_state}))

    return save_checkpoint(out / VERSIONS, st.snapshots, write, keep=keep)


def latest_version(out: Path, warn: Callable[[str], None]) -> tuple[Path, ServedState, dict | None] | None:
    """The last saved version of a serve run dir: (weights dir, counters, fast-channel state), or None."""
    ckpt = latest_good_checkpoint(out / VERSIONS, warn=warn)
    if ckpt is None:
        return None
    state = json.loads((ckpt / "state.json").read_text())
    return ckpt / "model", ServedState(**state["served"]), state.get("fast")


class _Asked:
    """The served task with the problems users asked as its train split (for a fast round)."""

    def __init__(self, task: Task, asked: list) -> None:
        self._task, self._asked = task, asked
        self.name, self.seed_prompt = task.name, task.seed_prompt

    def problems(self, split: str):
        return self._asked if split == "train" else self._task.problems(split)

    def verify(self, problem, completion: str):
        return self._task.verify(problem, completion)


class Learner:
    """The background thread: fast rounds on the served weights, slow training on a copy, the drift gate."""

    def __init__(self, cfg: Config, out: Path, served: Served, store: FeedbackStore, metrics: MetricsLog, *,
                 fast=None, view: Policy | None = None, rate: Callable[[], float], log: Callable[[str], None],
                 on_gate: Callable[[bool, ServedState], None] = lambda promoted, state: None) -> None:
        self.cfg, self.out, self.served, self.store, self.metrics = cfg, out, served, store, metrics
        self.fast, self.rate, self.log, self.on_gate = fast, rate, log, on_gate
        self.gepa, self.memory = fast_parts(fast)
        self.task = served.task
        self.known = {p.id: p for p in self.task.problems("train")}
        # Answers to held-out problems never train either channel: the gate's held-out reward stays held out.
        self.heldout_ids = {p.id for p in self.task.problems("eval")}
        self.view = view or policy_view(served.policy)  # the learner's sampler on the served weights
        self.slow_on = slow_on(cfg.method)
        self.candidate = trainable_copy(served.policy) if self.slow_on else None
        self.slow = SlowLearner(self.candidate, cfg.slow) if self.candidate is not None else None
        probes = [served.policy.format(self.task.seed_prompt, p.prompt)
                  for p in list(self.task.problems("eval"))[: cfg.drift.probe_size]]
        self.meter = DriftMeter(self.candidate, probes, cfg.drift, seed=cfg.seed) if self.candidate else None
        self.gated_version = self.candidate.version if self.candidate else 0  # the weights last gated (or reset)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastslow-learner", daemon=True)
        self.t0 = time.time()
        self.last_window = time.time()
        self.window_seq = served.state.slow_cursor
        self.error: str | None = None

    # ---- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the learner failing must not take the server down
                self.error = one_line(f"{type(exc).__name__}: {exc}")
                self.log(f"learner: {self.error}; it retries in 5 s")
                self.metrics.write(self._row("serve_learner_error", {"reason": self.error}))
                self._stop.wait(5.0)

    def tick(self) -> None:
        """One look at the feedback: a fast round, a training window + gate, a served-reward row, when due."""
        st, scfg = self.served.state, self.cfg.serve
        if self.fast is not None and self.store.count_after(st.fast_cursor) >= scfg.fast_every_n_feedbacks:
            self.fast_round()
        pending = self.store.count_after(st.slow_cursor)
        if self.slow_on and (pending >= scfg.every_n_feedbacks
                             or (self.rate() < scfg.idle_rps and pending >= scfg.train_batch)):
            self.train_and_gate()
        if time.time() - self.last_window >= scfg.idle_window_s:
            self.window_row()

    # ---- rows -----------------------------------------------------------------------------------
    def _row(self, event: str, values: dict) -> dict:
        st = self.served.state
        return {"step": st.steps, "rollouts": st.rollouts, "fast_rollouts": st.fast_rollouts, "event": event,
                "time": round(time.time(), 3), "serve/weights_version": st.weights_version,
                "serve/context_version": st.context_version, **values}

    def window_row(self) -> None:
        """Served reward over time: mean reward of the feedback stored since the last such row."""
        rows = self.store.feedback_after(self.window_seq, 100_000)
        now = time.time()
        if rows:
            self.window_seq = rows[-1].seq
            self.metrics.write(self._row("serve_window", {
                "serve/reward": sum(r.reward for r in rows) / len(rows), "serve/feedbacks": len(rows),
                "serve/window_s": round(now - self.last_window, 3), "drift/kl_rev": self.served.state.kl_rev}))
        self.last_window = now

    # ---- fast channel -----------------------------------------------------------------------------
    def fast_round(self) -> None:
        """A fast round on the feedback since the last one: a GEPA round and/or the memory curated from it."""
        st = self.served.state
        rows = self.store.feedback_after(st.fast_cursor, 1_000_000)
        st.fast_cursor = rows[-1].seq if rows else st.fast_cursor
        t0 = time.perf_counter()
        version = st.context_version
        rounds = ([self.gepa_round(rows)] if self.gepa is not None else []) + (
            [self.memory_round(rows)] if self.memory is not None else [])
        values: dict = {}
        for rnd in rounds:
            st.fast_rollouts += rnd.rollouts
            values.update(rnd.metrics)
        changed = st.context_version != version
        reason = "; ".join(rnd.error for rnd in rounds if rnd.error)
        self.metrics.write(self._row("serve_fast_round", {**values, "serve/round_s": time.perf_counter() - t0,
                                                          "serve/context_changed": changed,
                                                          **({"reason": reason} if reason else {})}))
        if changed:
            save_version(self.out, self.served, self.fast.state_dict(), self.cfg.serve.keep_versions)

    def gepa_round(self, rows: list[Feedback]):
        """A GEPA round on the served weights, on the problems users asked since the last round when enough of
        them are known problems of the task (its verifier can then score new prompts on them), else on its own."""
        st = self.served.state
        asked = list(dict.fromkeys(r.problem_id for r in rows if r.problem_id in self.known))
        task = _Asked(self.task, [self.known[i] for i in asked]) if len(asked) >= self.cfg.fast.val_size else self.task
        rnd = self.gepa.run_round(task, workdir=self.out)
        rnd.metrics["serve/round_problems_from_traffic"] = float(len(asked) if task is not self.task else 0)
        best = self.gepa.best.get(self.task.name, st.context)
        if best != st.context:
            with self.served.lock:  # the next batch gets the new context and its version together
                st.context, st.context_version = best, st.context_version + 1
            st.best_heldout = None  # held-out rewards under the old context do not compare
        return rnd

    def memory_round(self, rows: list[Feedback]):
        """The memory curated from feedback rows (no sampling); answers to held-out problems are left out."""
        memory = self.memory
        attempts = []
        for r in rows:
            problem = self.known.get(r.problem_id)
            if problem is None and r.user is not None and r.problem_id not in self.heldout_ids:
                problem = traffic_problem(r.user)
            if problem is not None:
                attempts.append(Attempt(problem, r.completion, r.reward,
                                        r.text or f"The user rated this answer {r.reward:.2f} (0 to 1).",
                                        frozenset(memory.shown(self.task, r.prompt))))
        return memory.learn(self.task, attempts, lock=self._memory_swap())

    @contextlib.contextmanager
    def _memory_swap(self) -> Iterator[None]:
        """A merge between two batches, with its context version: a batch sees one memory, named by its
        fingerprint (retrieval also holds ``memory_lock``: the HTTP threads retrieve to count a prompt's tokens)."""
        before = self.memory.store.state_dict()
        with self.served.lock, self.served.memory_lock:
            yield
            if self.memory.store.state_dict() != before:
                self.served.state.context_version += 1
                self.served.state.best_heldout = None  # held-out rewards under the old memory do not compare

    # ---- slow channel and gate --------------------------------------------------------------------
    def train_and_gate(self) -> None:
        st, scfg = self.served.state, self.cfg.serve
        trained = 0
        for _ in range(scfg.train_steps):
            rows = self.store.feedback_after(st.slow_cursor, scfg.train_batch)
            if len(rows) < 2:
                break
            cursor = rows[-1].seq
            rows = [r for r in rows if r.problem_id not in self.heldout_ids]
            if len(rows) < 2:
                st.slow_cursor = cursor
                continue
            batch = self.candidate.make_batch([r.prompt for r in rows], [r.completion for r in rows],
                                              add_eos=[r.stopped for r in rows])
            rewards = torch.tensor([[r.reward for r in rows]], dtype=torch.float32)
            metrics = self.slow.step(Rollouts(batch, rewards))
            st.slow_cursor, st.steps, st.rollouts = cursor, st.steps + 1, st.rollouts + len(rows)
            trained += 1
            self.metrics.write(self._row("serve_train", metrics))
        if trained and self.candidate.version != self.gated_version:  # flat rewards leave the weights as they were
            self.gate()

    def heldout_contexts(self) -> str | list[str]:
        """The context the first gate_n eval problems are served with (with a memory: each its own)."""
        if self.memory is None:
            return self.served.state.context
        return [self.served.context_for(p.prompt) for p in list(self.task.problems("eval"))[: self.cfg.serve.gate_n]]

    def heldout(self, policy: Policy, context: str | list[str]) -> float:
        """Reward of ``policy`` with ``context`` (one per problem, or one for all) on the first gate_n eval
        problems (greedy)."""
        return score_prompt(PolicySampler(policy, verify_timeout_s=self.cfg.verify_timeout_s), self.task, context,
                            self.cfg.serve.gate_n, max_new_tokens=self.cfg.slow.max_new_tokens,
                            seed=derive_seed(self.cfg.seed, "serve-gate")).mean_reward

    def gate(self) -> bool:
        """Measure the candidate; promote it (atomic swap) or discard it, with a metrics row either way."""
        st, scfg = self.served.state, self.cfg.serve
        st.gates += 1
        self.gated_version = self.candidate.version
        context = self.heldout_contexts()
        kl = self.meter.measure()["drift/kl_rev"]
        served_reward = self.heldout(self.view, context)  # the served version, with the context served now
        reward = self.heldout(self.candidate, context)
        # Against the best version served under this context, not only the current one: small regressions within
        # the budget must not compound over promotions.
        reference = max(served_reward, st.best_heldout if st.best_heldout is not None else served_reward)
        regression = reference - reward
        reasons = []
        if kl > scfg.max_kl:
            reasons.append(f"KL {kl:.4f} > serve.max_kl {scfg.max_kl}")
        if regression > scfg.max_regression:
            reasons.append(f"held-out reward {reward:.3f} fell {regression:.3f} below the best served "
                           f"{reference:.3f} (> serve.max_regression {scfg.max_regression})")
        promoted = not reasons
        values = {"serve/candidate_kl": kl, "serve/candidate_reward": reward, "serve/served_reward": served_reward,
                  "serve/reference_reward": reference, "serve/regression": regression}
        if promoted:
            weights = {k: v.detach().clone() for k, v in self.candidate.model.state_dict().items()}
            with self.served.lock:  # between two batches: in-flight requests finished on the old version
                self.served.policy.model.load_state_dict(weights)
                self.served.policy.version = self.view.version = self.candidate.version
                st.weights_version, st.kl_rev, st.heldout = st.weights_version + 1, kl, reward
                st.best_heldout = max(reference, reward)
            save_version(self.out, self.served, self.fast.state_dict() if self.fast else None, scfg.keep_versions)
            self.metrics.write(self._row("serve_promoted", {**values, "drift/kl_rev": kl}))
            self.log(f"promoted {self.served.fingerprint}: KL {kl:.4f}, held-out reward {reward:.3f} "
                     f"(was {served_reward:.3f})")
        else:
            st.best_heldout = reference
            reason = "; ".join(reasons)
            self.metrics.write(self._row("serve_rejected", {**values, "drift/kl_rev": st.kl_rev, "reason": reason}))
            self.log(f"candidate rejected: {reason}")
            self.reset_candidate()
        self.on_gate(promoted, st)
        return promoted

    def reset_candidate(self) -> None:
        """Back to the served weights, with a fresh optimizer (a rejected candidate's moments are not reused)."""
        self.candidate.model.load_state_dict(self.served.policy.model.state_dict())
        self.candidate.version += 1  # new weights: the drift meter must measure again
        self.gated_version = self.candidate.version
        self.slow = SlowLearner(self.candidate, self.cfg.slow)
