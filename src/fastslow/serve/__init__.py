"""``fastslow serve``: an OpenAI-compatible endpoint over the live policy that learns from its traffic.

- :mod:`fastslow.serve.app`: the HTTP routes, Prometheus metrics and the generation thread (batches);
- :mod:`fastslow.serve.learner`: what is served (weights, fast context, version), the background learner
  (feedback -> rollouts, fast rounds, CISPO on a copy) and the drift gate that promotes or rejects a candidate;
- :mod:`fastslow.serve.store`: durable feedback (SQLite WAL, synchronous=FULL) in the run dir.

Run dir of a serving run (the only place written): ``config.yaml``, ``metrics.jsonl`` (``event`` rows:
serve_start, serve_window, serve_train, serve_fast_round, serve_promoted, serve_rejected), ``serve.sqlite``
(answers and feedback), ``versions/step_<n>/`` (the served weights, context, fast-channel state (the memory
included) and counters, atomic; a restart resumes from the newest), ``memory/`` (with an experience memory: its
store, as a training run writes it; ``fastslow memory show RUN_DIR``). Serving a training run's dir writes all of
this under ``RUN_DIR/serve/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastslow.config import Config, ConfigError
from fastslow.rundir import RunDirLock

if TYPE_CHECKING:  # torch, transformers, fastapi: loaded when a server is built, not to validate a config
    from fastslow.serve.app import ServerState
    from fastslow.serve.learner import Learner

__all__ = ["Server", "open_server", "resolve_target", "run_server", "serve_plan"]


def resolve_target(target: Path, out: str | None, overrides: list[str]) -> tuple[Config, Path, Path | None]:
    """``fastslow serve TARGET``: a config file (run dir from --out or its ``out``), a serving run dir (restart),
    or a training run dir (its final weights and prompts, served from ``RUN_DIR/serve``).
    Returns (config, serving run dir, training run dir to start from or None)."""
    from fastslow.config import load_config
    from fastslow.serve.learner import VERSIONS

    if target.is_file():
        cfg = load_config(target, overrides + ([f"out={out}"] if out else []))
        return cfg, Path(cfg.out), None
    if not target.is_dir():
        raise ConfigError(f"serve: {target} is neither a config file nor a run directory")
    if not (target / "config.yaml").is_file():
        raise ConfigError(f"serve: {target} holds no config.yaml (not a fastslow run directory)")
    if (target / "serve.sqlite").exists() or (target / VERSIONS).exists():
        return load_config(target / "config.yaml", overrides + [f"out={target}"]), target, None
    if (target / "checkpoints").is_dir():
        dest = Path(out) if out else target / "serve"
        return load_config(target / "config.yaml", overrides + [f"out={dest}"]), dest, target
    raise ConfigError(f"serve: {target} holds neither a serving run nor a training run's checkpoints")


def _api_key(cfg: Config, host: str) -> str | None:
    import os

    from fastslow.serve.app import LOOPBACK

    key = os.environ.get(cfg.serve.api_key_env) or None
    if key is None and host not in LOOPBACK:
        raise ConfigError(f"--host {host}: serving beyond loopback needs an API key in the environment variable "
                          f"{cfg.serve.api_key_env} (serve.api_key_env)")
    return key


def serve_plan(cfg: Config, out: Path, *, host: str, port: int, learn: bool) -> dict:
    """What ``fastslow serve --dry-run`` prints: the resolved settings, and for ``serve.backend: vllm`` the
    vLLM command and the adapter pushes a promotion would make (that path was never run on this project's
    machines: they have no GPU)."""
    from fastslow.serve.learner import VERSIONS

    _api_key(cfg, host)
    plan: dict = {"run_dir": str(out), "host": host, "port": port, "learn": learn, "method": cfg.method,
                  "model": cfg.model.path, "serve": cfg.serve.model_dump(mode="json"),
                  "api_key": f"${cfg.serve.api_key_env}" + ("" if host in ("127.0.0.1", "localhost", "::1")
                                                            else " (required)"),
                  "routes": ["GET /v1/models", "POST /v1/chat/completions", "POST /v1/feedback", "GET /healthz",
                             "GET /metrics"]}
    if cfg.serve.backend != "vllm":
        return plan
    if cfg.model.lora is None:
        raise ConfigError("serve.backend vllm pushes promoted LoRA adapters to vLLM: set model.lora")
    url = cfg.serve.vllm_url.rstrip("/")
    adapter = f"{out}/{VERSIONS}/step_<n>/model"
    plan["vllm"] = {
        "status": "dry run only: this path was not run here (no GPU on this project's machines)",
        "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        "command": ["vllm", "serve", cfg.model.path, "--enable-lora", "--max-lora-rank", str(cfg.model.lora.r),
                    "--max-loras", "2", "--served-model-name", cfg.serve.model_name, "--host", "127.0.0.1",
                    "--port", url.rsplit(":", 1)[-1]],
        "on_promotion": [
            {"method": "POST", "url": f"{url}/v1/load_lora_adapter",
             "json": {"lora_name": "fastslow-w<version>", "lora_path": adapter}},
            {"method": "POST", "url": f"{url}/v1/unload_lora_adapter", "json": {"lora_name": "fastslow-w<previous>"}},
        ],
        "clients": "send model 'fastslow-w<version>' (GET /v1/models on vLLM lists the loaded adapters); fastslow's "
                   "learner trains on the feedback it stores and gates each candidate exactly as on the native path",
    }
    return plan


@dataclass
class Server:
    """A loaded server, not yet listening: :func:`run_server` runs it under uvicorn; tests drive ``asgi``."""

    state: ServerState
    asgi: Any  # the FastAPI app behind the body-size limit
    learner: Learner | None
    lock: RunDirLock

    def start(self) -> None:
        self.state.generator.start()
        if self.learner is not None:
            self.learner.start()

    def close(self) -> None:
        if self.learner is not None:
            self.learner.stop()
        self.state.generator.stop()
        self.state.store.close()
        self.lock.release()


def open_server(cfg: Config, out: Path, *, host: str = "127.0.0.1", learn: bool = False, source: Path | None = None,
                log: Callable[[str], None] = print) -> Server:
    """Check everything, claim the run dir, load the served version (the newest saved one on a restart) and
    build the app and the threads (not started)."""
    import yaml

    from fastslow.channels import fast_on
    from fastslow.checkpoint import latest_good_checkpoint
    from fastslow.drift import DriftMeter
    from fastslow.errors import load_policy
    from fastslow.loop import load_stream
    from fastslow.preflight import check_model, check_reflector
    from fastslow.rundir import RunDirError, check_run_dir, claim
    from fastslow.serve.app import ServerState, _BodyLimit, create_app
    from fastslow.serve.learner import MetricsLog, Served, ServedState, latest_version, policy_view, save_version
    from fastslow.serve.store import FeedbackStore
    from fastslow.util import redact

    key = _api_key(cfg, host)
    if cfg.serve.backend == "vllm":
        raise ConfigError("serve.backend vllm: only `fastslow serve ... --dry-run` (the plan) exists; it was not run "
                          "here (no GPU); use backend native")
    if cfg.engine != "native":
        raise ConfigError(f"serve runs the native engine (engine: {cfg.engine}); on GPUs see serve.backend vllm")
    tasks, _ = load_stream(cfg)
    name = cfg.serve.task or list(tasks)[-1]
    if name not in tasks:
        raise ConfigError(f"field 'serve.task': {name!r} is not a task of the stream ({', '.join(tasks)})")
    task = tasks[name]
    check_model(cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    check_run_dir(out, resume=True, force=False)  # a file or the user's folder: refused, nothing written
    if (out / "checkpoints").exists():
        raise RunDirError(f"{out} holds a training run: serve it with `fastslow serve {out}` (which writes "
                          f"{out / 'serve'}), or choose another --out")
    lock = RunDirLock(out)
    lock.acquire()
    try:
        claim(out, resume=True, force=False)
        restored = latest_version(out, warn=log)
        if restored is not None:
            _same_model(out / "config.yaml", cfg)
        fast_state = None
        if restored is not None:
            weights, state, fast_state = restored
        else:
            state, weights = ServedState(), None
            if source is not None:  # a training run: its last good checkpoint's weights and prompts
                ckpt = latest_good_checkpoint(source / "checkpoints", warn=log)
                if ckpt is None:
                    raise ConfigError(f"serve: {source} has no usable checkpoint")
                weights = ckpt / "model"
                fast_state = json.loads((ckpt / "state.json").read_text()).get("fast")
        policy = load_policy(cfg.model, weights)
        policy.model.requires_grad_(False).eval()
        # user turn -> problem; a text in both splits counts as the train problem (answering it may train)
        problems = {p.prompt.strip(): p for split in ("eval", "train") for p in task.problems(split)}
        served = Served(policy, task, state, cfg.serve.system_message, problems=problems)
        view = policy_view(policy)
        fast = None
        if fast_on(cfg.method) and (learn or fast_state):
            fast = _fast_channel(cfg, served, view, out)
            if fast_state:
                fast.load_state_dict(fast_state)
            if learn:
                check_reflector(cfg.fast, fast.reflector.lm)  # one short real call (fast.preflight: false skips)
        if restored is None and fast is not None and task.name in fast.best:
            state.context = fast.best[task.name]
        if restored is None and weights is not None:  # a trained start: its drift is measured, not assumed 0
            probes = [policy.format(task.seed_prompt, p.prompt) for p in list(task.problems("eval"))[
                : cfg.drift.probe_size]]
            state.kl_rev = DriftMeter(view, probes, cfg.drift, seed=cfg.seed).measure()["drift/kl_rev"]
        (out / "config.yaml").write_text(redact(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))
        metrics = MetricsLog(out / "metrics.jsonl")
        if restored is not None:
            _recover_promotion_row(metrics, state)
        store = FeedbackStore(out / "serve.sqlite")
        server_state = ServerState(cfg, served, store, learn=learn, api_key=key, problems=problems)
        metrics.write({"step": state.steps, "rollouts": state.rollouts, "fast_rollouts": state.fast_rollouts,
                       "event": "serve_start", "time": round(time.time(), 3), "serve/restored": restored is not None,
                       "serve/weights_version": state.weights_version, "serve/context_version": state.context_version,
                       "drift/kl_rev": state.kl_rev, "serve/learn": learn})
        learner = None
        if learn:
            from fastslow.serve.learner import Learner  # noqa: F811 - the runtime import of the TYPE_CHECKING name

            def on_gate(promoted: bool, _state) -> None:
                server_state.metrics.gates.labels("promoted" if promoted else "rejected").inc()

            learner = Learner(cfg, out, served, store, metrics, fast=fast, view=view, rate=server_state.rate,
                              log=log, on_gate=on_gate)
            if restored is None:
                save_version(out, served, fast.state_dict() if fast else None, cfg.serve.keep_versions)
        app = create_app(server_state)
        return Server(server_state, _BodyLimit(app, cfg.serve.max_body_bytes), learner, lock)
    except BaseException:
        lock.release()
        raise


def _fast_channel(cfg: Config, served, view, out: Path):
    """The fast channel ``cfg.fast_kind`` names, on the served weights (``view``): GEPA's population, the
    experience memory (its files in ``out/memory``; ``served`` retrieves from it per request), or both."""
    from fastslow.checks import context_limit
    from fastslow.engines.native import build_fast
    from fastslow.rollout import PolicySampler
    from fastslow.serve.app import format_prompt
    from fastslow.serve.learner import policy_view

    # The memory's own view and tokenizer: retrieval runs on any thread (under Served.memory_lock) while the
    # learner samples.
    mine = policy_view(view)
    tokenizer, limit = mine.tokenizer, context_limit(mine)
    budget = cfg.serve.default_max_tokens or cfg.slow.max_new_tokens

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def fits(context: str, problem) -> bool:  # the request as served (no system message of its own) is accepted
        n = count_tokens(format_prompt(tokenizer, context, [], problem.prompt))
        return n <= cfg.serve.max_prompt_tokens and (limit is None or n + budget <= limit)

    fast = build_fast(cfg, mine, PolicySampler(view, verify_timeout_s=cfg.verify_timeout_s), out,
                      version=lambda: served.state.weights_version, budget=budget, count_tokens=count_tokens,
                      fits=fits)
    if "memory" in cfg.fast_kind:
        served.memory = getattr(fast, "memory", fast)
    return fast


def _recover_promotion_row(metrics, state) -> None:
    """A kill between sealing a promoted version and logging its row leaves the version without its row: write it
    from the version's own record (marked recovered), so every promotion served is a row of metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.path.read_text().splitlines()] if metrics.path.is_file() else []
    logged = max((r.get("serve/weights_version", 0) for r in rows if r.get("event") == "serve_promoted"), default=0)
    if state.weights_version > logged:
        metrics.write({"step": state.steps, "rollouts": state.rollouts, "fast_rollouts": state.fast_rollouts,
                       "event": "serve_promoted", "time": round(time.time(), 3), "serve/recovered": True,
                       "serve/weights_version": state.weights_version, "serve/context_version": state.context_version,
                       "serve/candidate_kl": state.kl_rev, "serve/candidate_reward": state.heldout,
                       "drift/kl_rev": state.kl_rev})


def _same_model(saved: Path, cfg: Config) -> None:
    """A restart must serve what was saved: the same model, adapter, method and served task."""
    import yaml

    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.model_dump(mode="json")
    changed = [key for key in ("method", "model") if old.get(key) != new.get(key)]
    if "method" not in changed and _kind(old) != _kind(new):  # what the saved fast state holds
        changed.append("fast.kind")
    if [s.get("task") for s in old.get("stages", [])] != [s["task"] for s in new["stages"]]:
        changed.append("stages")
    if old.get("serve", {}).get("task") != new["serve"]["task"]:
        changed.append("serve.task")
    if changed:
        raise ConfigError(f"restart of {saved.parent} with a config that changes {', '.join(changed)}: its saved "
                          "versions belong to the original; serve into a new directory instead")


def _kind(cfg: dict) -> str | None:
    """A dumped config's fast kind (as :attr:`Config.fast_kind` resolves it)."""
    method = cfg.get("method")
    return None if method == "rl" else (cfg.get("fast") or {}).get("kind") or ("gepa" if method == "fst" else method)


def run_server(cfg: Config, out: Path, *, host: str = "127.0.0.1", port: int = 8000, learn: bool = False,
               source: Path | None = None, log: Callable[[str], None] = print) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:  # a taken port is one line before anything loads, not uvicorn's exit
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server = open_server(cfg, out, host=host, learn=learn, source=source, log=log)
    try:
        server.start()
        log(f"serving {cfg.serve.model_name} ({server.state.served.fingerprint}) on http://{host}:{port}/v1"
            f"{'  learning from feedback' if learn else ''}  run dir {out}")
        config = uvicorn.Config(server.asgi, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off")
        uvicorn.Server(config).run()
    finally:
        server.close()
