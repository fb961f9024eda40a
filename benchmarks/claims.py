"""The drift-plasticity study: the paper's claims over seeds, in both regimes of the micro world.

    python benchmarks/claims.py --quick          # make bench-quick (<= 15 min on 2 quiet cores)
    python benchmarks/claims.py                  # make bench (full; see benchmarks/README.md for its length)
    python benchmarks/claims.py --analyse-only   # rebuild results/ and README.md from the run dirs
    python benchmarks/claims.py --demo [--seeds 0,1,2]   # make bench-demo: only the project README's demo table

1. single-task runs of rl, gepa, fst per task of each regime's stream: sample efficiency, KL (both
   directions) at matched reward, sigmoid asymptote, final KL and entropy;
2. the stream of each regime with rl, gepa, fst: per-stage peaks, ACC/BWT/forgetting/FWT, plasticity
   probe (from base, rl, fst), the 2x2 channel attribution; one verdict per paper claim;
3. the drift-plasticity frontier: KL penalty x {full, LoRA} x {rl, fst} on each stream, plus the drift
   budget (slow.kl_target) as its own series; Spearman's rho of final KL vs plasticity and forgetting.

Every hyper-parameter, the method lists and the verdict rules are pre-registered in benchmarks/protocol.yaml; all
methods share them; all seeds are reported. Its sha256 is written to <root>/claims.json before any run starts and
to every finished run dir; runs, probes and attributions already finished under the same hash are reused (an
interrupted bench resumes; its wall time is the sum of its sittings', <root>/sittings.jsonl), those made under
another are run again. Verdicts: four-way (reproduced, partly, refuted, inconclusive) from paired per-seed
intervals (see protocol.yaml and :func:`verdicts`).
Writes benchmarks/results/{claims,frontier}.json, plots and benchmarks/README.md (generated).

    python benchmarks/claims.py --reverdict      # decide the committed results again under the current protocol
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fastslow import threads  # noqa: E402 - before torch loads: passive OpenMP waiting in this process and its workers
from fastslow.pool import stop_pool  # noqa: E402

threads.hygiene()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchutil import BenchProgress  # noqa: E402 - next to this file

RESULTS = HERE / "results"

PROTOCOL_PATH = HERE / "protocol.yaml"


def load_protocol(path: Path = PROTOCOL_PATH) -> dict:
    """The pre-registered protocol (settings, methods, verdict rules); see benchmarks/protocol.yaml."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def protocol_sha256(path: Path = PROTOCOL_PATH) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


PROTOCOL = load_protocol()
SETTINGS: dict[str, dict[str, Any]] = PROTOCOL["settings"]
METHODS = tuple(PROTOCOL["methods"])
FRONTIER_METHODS = tuple(PROTOCOL["frontier_methods"])
ZERO_DRIFT_METHODS = tuple(PROTOCOL.get("zero_drift_methods") or ())
# Methods whose weights move: plasticity probes start from their weights (the others' weights are the base's).
PROBED = tuple(m for m in METHODS if m not in ZERO_DRIFT_METHODS)


def regimes() -> dict[str, dict[str, Any]]:
    from fastslow.world.tasks import HELDOUT, STREAM, WEIGHT_HELDOUT, WEIGHT_STREAM

    return {"prompt": {"stream": STREAM, "heldout": HELDOUT},
            "weight": {"stream": WEIGHT_STREAM, "heldout": WEIGHT_HELDOUT}}


# ---- configs ------------------------------------------------------------------------------------
def run_config(s: dict, *, method: str, tasks: Sequence[str], steps: int, seed: int, out: Path,
               kl_coef: float = 0.0, weights: str = "full", kl_target: float | None = None) -> dict:
    """One run's config as a dict (the loop's schema)."""
    lora = weights == "lora"
    return {
        "method": method.partition("+")[0],
        "model": {"path": "micro", "device": "cpu", "lora": {"r": s["lora_r"], "alpha": 2 * s["lora_r"]} if lora
                  else None},
        "stages": [{"task": f"micro/{t}", "steps": steps} for t in tasks],
        "slow": {"batch_problems": s["batch_problems"], "group_size": s["group_size"],
                 "lr": s["lora_lr"] if lora else s["lr"], "warmup_steps": s["warmup_steps"],
                 "max_new_tokens": s["max_new_tokens"], "kl_coef": kl_coef, "kl_target": kl_target},
        "fast": {"every": s["fast_every"], "population": s["population"], "budget": s["fast_budget"],
                 "val_size": s["val_size"], "reflector": "micro", "kind": method.partition("+")[2] or None,
                 "memory": {"cases_per_context": 0}},  # the micro model never saw worked examples
        "drift": {"every": s["drift_every"], "probe_size": s["probe_size"], "max_new_tokens": s["max_new_tokens"]},
        "eval": {"every": s["eval_every"], "n": s["eval_n"]},
        "checkpoint_every": steps * len(tasks),
        "keep_checkpoints": 1,
        "threads": 1,
        "seed": seed,
        "out": str(out),
    }


def frontier_id(method: str, weights: str, kl_coef: float, kl_target: float | None) -> str:
    return f"{method}-{weights}-" + (f"target{kl_target:g}" if kl_target else f"kl{kl_coef:g}")


def plan(s: dict, root: Path) -> tuple[list[dict], list[dict]]:
    """(training runs, probes): every run of the study as {key, kind, cfg, ...}, deduplicated by out dir."""
    runs: dict[str, dict] = {}
    probes: list[dict] = []
    sha = protocol_sha256()
    for regime, r in regimes().items():
        for seed in s["seeds"]:
            for task in r["stream"][: s["single_tasks"]]:
                for method in METHODS:
                    out = root / regime / "single" / task / f"{method}-s{seed}"
                    runs[str(out)] = {"kind": "single", "regime": regime, "task": task, "method": method,
                                      "seed": seed, "cfg": run_config(s, method=method, tasks=[task],
                                                                      steps=s["single_steps"], seed=seed, out=out)}
            stream_dirs = {}
            for method in METHODS:
                out = root / regime / "stream" / f"{method}-full-kl0-s{seed}"
                stream_dirs[method] = out
                runs[str(out)] = {"kind": "stream", "regime": regime, "method": method, "seed": seed,
                                  "cfg": run_config(s, method=method, tasks=r["stream"], steps=s["stage_steps"],
                                                    seed=seed, out=out)}
            series = [(m, w, k, None) for m in FRONTIER_METHODS for w in s["weights"] for k in s["kl_coefs"]]
            series += [(m, "full", 0.0, s["kl_target"]) for m in FRONTIER_METHODS]
            for method, weights, kl, target in series:
                fid = frontier_id(method, weights, kl, target)
                out = root / regime / "stream" / f"{fid}-s{seed}"
                key = str(out)
                entry = runs.get(key) or {"kind": "stream", "regime": regime, "method": method, "seed": seed,
                                          "cfg": run_config(s, method=method, tasks=r["stream"],
                                                            steps=s["stage_steps"], seed=seed, out=out,
                                                            kl_coef=kl, weights=weights, kl_target=target)}
                entry["frontier"] = {"id": fid, "weights": weights, "kl_coef": kl, "kl_target": target}
                runs[key] = entry
            heldout = f"micro/{r['heldout']}"
            starts = [("base", "base", None)] + [(m, stream_dirs[m], "full") for m in PROBED]
            starts += [(runs[k]["frontier"]["id"], Path(k), runs[k]["frontier"]["weights"]) for k in runs
                       if runs[k].get("frontier") and runs[k]["regime"] == regime and runs[k]["seed"] == seed
                       and Path(k) not in [stream_dirs[m] for m in PROBED]]
            template = run_config(s, method="rl", tasks=[r["heldout"]], steps=s["probe_steps"], seed=seed,
                                  out=root / "unused")
            template["eval"]["every"] = s["probe_eval_every"]
            for arm, start, weights in starts:
                probes.append({"regime": regime, "seed": seed, "arm": arm, "start": str(start), "task": heldout,
                               "weights": weights, "template": template, "protocol": sha,
                               "out": str(root / regime / "probes" / f"{arm}-s{seed}")})
    for j in runs.values():
        j["protocol"] = sha
    return list(runs.values()), probes


# ---- workers (run in child processes: one torch thread each) --------------------------------------
_STOPPED = _RUNNING = False  # in a worker: Ctrl-C arrived; a job is running


def _on_interrupt(_signum, _frame) -> None:
    global _STOPPED
    _STOPPED = True
    if _RUNNING:  # an idle worker keeps waiting for its pool to shut down
        raise KeyboardInterrupt


def _worker_init(n_threads: int) -> None:
    threads.worker_init(n_threads)
    signal.signal(signal.SIGINT, _on_interrupt)


def _run_job(fn: Callable[[dict], Any], job: dict) -> Any:
    """``fn(job)`` in a worker; after Ctrl-C, jobs the pool had already handed over end at once."""
    global _RUNNING
    if _STOPPED:
        raise KeyboardInterrupt
    _RUNNING = True
    try:
        return fn(job)
    finally:
        _RUNNING = False


def _quiet(_: str) -> None:
    pass


def train_job(job: dict) -> str:
    import torch

    from fastslow.config import config_from_dict
    from fastslow.loop import train

    torch.set_num_threads(1)
    out = Path(job["cfg"]["out"])
    cfg = config_from_dict(job["cfg"])
    if not _finished_with(out, cfg.model_dump(mode="json"), job["protocol"]):
        train(cfg, force=True, log=_quiet)
        (out / "protocol.sha256").write_text(job["protocol"] + "\n")
    return str(out)


def _finished_with(out: Path, settings: dict, protocol: str) -> bool:
    """A finished run in ``out`` made with exactly these settings under this protocol (else it is run again): its
    summary.json is complete (written last, atomically, with every step) and its config.yaml is these settings."""
    import yaml

    try:
        summary = json.loads((out / "summary.json").read_text())
        config = yaml.safe_load((out / "config.yaml").read_text())
        marker = (out / "protocol.sha256").read_text().strip()
    except (OSError, ValueError, yaml.YAMLError):
        return False
    total = sum(stage["steps"] for stage in settings.get("stages", []))
    complete = isinstance(summary, dict) and summary.get("steps", total) == total  # a summary of the whole run
    return marker == protocol and config == settings and complete


def _cached(path: Path, protocol: str) -> dict | None:
    """A probe's or attribution's result made under this protocol, else None (it is made again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("protocol") == protocol else None


def job_done(fn: Callable[[dict], Any], job: dict) -> bool:
    """Whether ``fn(job)`` would only reuse a finished result (a resumed bench skips it at once)."""
    return reused_result(fn, job) is not None


def reused_result(fn: Callable[[dict], Any], job: dict) -> Any:
    """What ``fn(job)`` returns for a finished job (None: not finished), read without loading torch in this
    (the pool's) process."""
    if fn is train_job:
        out = Path(job["cfg"]["out"])
        return str(out) if _finished_with(out, config_dump(job["cfg"]), job["protocol"]) else None
    if fn is probe_job:
        out = Path(job["out"])
        return _cached(out.parent / f"{out.name}.json", job["protocol"])
    if fn is attribution_job:
        cached = _cached(Path(job["run"]) / "attribution.json", job["protocol"])
        return None if cached is None else {k: v for k, v in cached.items() if k != "protocol"}
    return None


# Relative cost of one loop step by method, for the ETA and the longest-first order: the first 14 stream runs of a
# full make bench (2026-12-03, one thread each; rl 0.24 s per step). A KL term (the base's forward) adds 0.37 of an
# rl step, LoRA 20%.
STEP_COST = {"rl": 1.0, "fst": 2.3, "gepa": 0.2, "memory": 0.12}  # fst+memory runs are method fst


def job_cost(fn: Callable[[dict], Any], job: dict) -> float:
    """Relative cost of a job (for the ETA): a run's steps weighted by :data:`STEP_COST`, a probe's steps (rl), an
    attribution ~10."""
    if fn is train_job:
        cfg = job["cfg"]
        per_step = STEP_COST.get(cfg["method"], 1.0) + (0.37 if cfg["slow"].get("kl_coef") or
                                                         cfg["slow"].get("kl_target") else 0.0)
        per_step *= 1.2 if cfg["model"].get("lora") else 1.0
        return per_step * sum(stage["steps"] for stage in cfg["stages"])
    if fn is probe_job:
        return float(sum(stage["steps"] for stage in job["template"]["stages"]))
    return 10.0


def merged_weights(run_dir: Path, lora_cfg: dict, model: str = "micro") -> Path:
    """A LoRA run's adapter merged into its base and saved as a plain model dir (probes start from weights)."""
    from fastslow.checkpoint import run_weights
    from fastslow.config import ModelConfig
    from fastslow.policy import Policy

    dest = run_dir / "merged"
    if not (dest / "config.json").exists():
        policy = Policy.load(ModelConfig(path=model, device="cpu", lora=lora_cfg), weights=run_weights(run_dir))
        merged = policy.model.merge_and_unload()
        merged.save_pretrained(str(dest), safe_serialization=True)
        policy.tokenizer.save_pretrained(str(dest))
    return dest


def probe_job(job: dict) -> dict:
    import torch

    from fastslow.config import config_from_dict
    from fastslow.loop import train
    from fastslow.probes import plasticity_probe

    torch.set_num_threads(1)
    out = Path(job["out"])
    result_path = out.parent / f"{out.name}.json"
    if (cached := _cached(result_path, job["protocol"])) is not None:
        return cached
    start = job["start"]
    if job["weights"] == "lora":
        start = str(merged_weights(Path(start), _lora_of(job)))
    template = config_from_dict(job["template"])
    result = plasticity_probe(start, job["task"], template.stages[0].steps, template, out,
                              run=lambda cfg, **kw: train(cfg, log=_quiet, **kw))
    result = {**{k: result[k] for k in ("final", "auc", "curve")}, "protocol": job["protocol"]}
    result_path.write_text(json.dumps(result))
    return result


def _lora_of(job: dict) -> dict:
    import yaml

    cfg = yaml.safe_load((Path(job["start"]) / "config.yaml").read_text())
    return cfg["model"]["lora"]


def attribution_job(job: dict) -> dict:
    import torch

    from fastslow.config import ModelConfig
    from fastslow.probes import channel_attribution
    from fastslow.tasks import load_task

    torch.set_num_threads(1)
    path = Path(job["run"]) / "attribution.json"
    if (cached := _cached(path, job["protocol"])) is not None:
        return {k: v for k, v in cached.items() if k != "protocol"}
    tasks = {t.name: t for t in (load_task(f"micro/{n}") for n in job["tasks"])}
    result = channel_attribution(job["run"], ModelConfig(path="micro", device="cpu"), tasks, n=job["n"],
                                 max_new_tokens=job["max_new_tokens"], seed=job["seed"])
    path.write_text(json.dumps({**result, "protocol": job["protocol"]}))
    return result


def config_dump(cfg: dict) -> dict:
    from fastslow.config import config_from_dict

    return config_from_dict(cfg).model_dump(mode="json")


def preregister(root: Path, mode: str, sha: str) -> None:
    """<root>/claims.json names the protocol before any run starts (the final claims.json replaces it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "claims.json").write_text(json.dumps({"status": "running", "mode": mode, "protocol": {
        "file": f"benchmarks/{PROTOCOL_PATH.name}", "sha256": sha, "text": PROTOCOL_PATH.read_text()}}, indent=1))


def run_pool(fn: Callable[[dict], Any], jobs: list[dict], workers: int, label: str,
             progress: BenchProgress | None = None) -> list[Any]:
    """``fn`` on every job (finished ones reused at once), reporting progress and an ETA run by run."""
    own = progress is None
    if progress is None:
        progress = BenchProgress(label, sum(job_cost(fn, j) for j in jobs), len(jobs))
    results: list[Any] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        results[i] = reused_result(fn, job)
        if results[i] is not None:
            progress.advance(job_cost(fn, job), reused=True, what=f"{label} reused")
        else:
            todo.append(i)
    try:
        if workers <= 1:
            for i in todo:
                results[i] = fn(jobs[i])
                progress.advance(job_cost(fn, jobs[i]), what=label)
            return results
        # each worker its own share of the CPUs (and passive waiting, inherited from this process); the longest
        # jobs first, so that no worker starts a long one while the others run out of work
        todo.sort(key=lambda i: -job_cost(fn, jobs[i]))
        pool = ProcessPoolExecutor(workers, initializer=_worker_init,
                                   initargs=(threads.share(threads.usable_cpus(), workers),))
        futures: dict[Future, int] = {}
        try:
            futures = {pool.submit(_run_job, fn, jobs[i]): i for i in todo}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                progress.advance(job_cost(fn, jobs[i]), what=label)
        except BaseException as exc:
            # Stop now, not after every queued job (hours): queued jobs are cancelled, running ones interrupted as
            # Ctrl-C interrupts them (Ctrl-C itself reached them already); finished runs stay for the resume.
            stop_pool(pool, futures, interrupt=not isinstance(exc, KeyboardInterrupt))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results
    finally:
        if own:
            progress.close()


# ---- statistics ---------------------------------------------------------------------------------
def spread(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean, min, max and a bootstrap 95% CI of the mean over the non-null values; n = how many."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "min": None, "max": None, "ci": None, "n": 0, "values": list(values)}
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    ci = [boots[int(0.025 * (n_boot - 1))], boots[int(0.975 * (n_boot - 1))]]
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "ci": ci, "n": len(xs),
            "values": list(values)}


def _rank_rho(pts: list[dict], x: str, y: str, partial: bool) -> float | None:
    """Spearman's rho of x and y over points; partial: of the ranks' residuals after each method's mean rank is
    removed (the correlation within methods, controlling for method)."""
    import numpy as np
    from scipy.stats import rankdata

    if len(pts) < 4:
        return None
    rx, ry = rankdata([p[x] for p in pts]), rankdata([p[y] for p in pts])
    if partial:
        for m in {p["method"] for p in pts}:
            idx = [i for i, p in enumerate(pts) if p["method"] == m]
            rx[idx] -= rx[idx].mean()
            ry[idx] -= ry[idx].mean()
    else:
        rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    return float(np.dot(rx, ry)) / den if den > 0 else None


def cluster_rho(points: Sequence[dict], x: str, y: str, n_boot: int = 1000, seed: int = 0,
                partial: bool = False) -> dict:
    """Spearman's rho of one point per run, with a cluster bootstrap over seeds: a resample draws seeds with
    replacement and takes all of a drawn seed's runs (runs of one seed share its data and probe draws)."""
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    by_seed: dict = {}
    for p in pts:
        by_seed.setdefault(p["seed"], []).append(p)
    rho = _rank_rho(pts, x, y, partial)
    if rho is None or len(by_seed) < 2:
        return {"rho": rho, "ci": None, "n": len(pts), "seeds": len(by_seed)}
    rng = random.Random(seed)
    keys = sorted(by_seed)
    boots = []
    for _ in range(n_boot):
        sample = [p for k in rng.choices(keys, k=len(keys)) for p in by_seed[k]]
        b = _rank_rho(sample, x, y, partial)
        if b is not None and math.isfinite(b):
            boots.append(b)
    boots.sort()
    ci = [boots[int(0.025 * (len(boots) - 1))], boots[int(0.975 * (len(boots) - 1))]] if boots else None
    return {"rho": rho, "ci": ci, "n": len(pts), "seeds": len(by_seed)}


def frontier_stats(points: Sequence[dict], regimes_: Sequence[str], n_boot: int) -> dict:
    """Per regime, KL direction and outcome: rho pooled, within each method, and partial (controlling for
    method), each with its cluster-bootstrap interval over seeds."""
    out = {}
    for regime in regimes_:
        pts = [p for p in points if p["regime"] == regime]
        for kl in ("kl_rev", "kl_fwd"):
            for y in ("plasticity_auc", "forgetting"):
                entry = {"pooled": cluster_rho(pts, kl, y, n_boot),
                         "partial": cluster_rho(pts, kl, y, n_boot, partial=True),
                         "within": {m: cluster_rho([p for p in pts if p["method"] == m], kl, y, n_boot)
                                    for m in sorted({p["method"] for p in pts})}}
                out[f"{regime}/{kl}~{y}"] = entry
    return out


# ---- per-run measurements ----------------------------------------------------------------------
def kl_at_matched(rl, other, key: str) -> dict:
    """KL (``drift/<key>``) of both runs at the highest running-peak reward both reach; ratio other / rl."""
    from fastslow.analysis import _kl_at, eval_curve

    def traj(run) -> tuple[list[float], list[float]]:
        c = eval_curve(run, "step")
        by_step = {float(r.get("step") or 0): r.get(f"drift/{key}") for r in run.rows}
        pairs = [(p, by_step.get(s)) for p, s in zip(c.peak, c.step) if by_step.get(s) is not None]
        return [p for p, _ in pairs], [float(k) for _, k in pairs]

    r_rl, k_rl = traj(rl)
    r_o, k_o = traj(other)
    if not r_rl or not r_o:
        return {"reward": None, "rl": None, "other": None, "ratio": None}
    level = min(r_rl[-1], r_o[-1])
    a, b = _kl_at(r_rl, k_rl, level), _kl_at(r_o, k_o, level)
    return {"reward": level, "rl": a, "other": b, "ratio": b / a if a > 0 else None}


def single_numbers(rl, other) -> dict:
    """Sample efficiency and KL at matched reward of ``other`` against ``rl`` (DESIGN.md definitions).
    ``ratio_bound``: when ``other`` never reached RL's peak, RL's slow rollouts / its last eval's (the censored
    ratio's upper bound); when it reached it with 0 slow rollouts, RL's / its first positive eval's (a lower bound)."""
    from fastslow.analysis import eval_curve, sample_efficiency

    se = sample_efficiency(rl, other)
    xs = [x for x in eval_curve(other, "rollouts").x if x > 0]
    rl_x = se["slow"]["rl"]
    bound = None
    if rl_x is not None and xs:
        bound = rl_x / (xs[-1] if not se["reached"] else xs[0]) if rl_x > 0 else 1.0
    return {"target": se["target"], "reached": se["reached"], "ratio_slow": se["slow"]["ratio"],
            "ratio_total": se["total"]["ratio"], "ratio_bound": bound,
            "kl_rev_matched": kl_at_matched(rl, other, "kl_rev"), "kl_fwd_matched": kl_at_matched(rl, other, "kl_fwd")}


def plateau(steps: Sequence[float], rewards: Sequence[float], fraction: float) -> float | None:
    """Mean eval reward over the last ``fraction`` of the run's steps (at least the last eval)."""
    if not rewards:
        return None
    cut = steps[-1] - fraction * steps[-1]
    late = [r for s, r in zip(steps, rewards) if s >= cut] or [rewards[-1]]
    return statistics.fmean(late)


def run_numbers(run) -> dict:
    from fastslow.analysis import eval_curve, fit_sigmoid

    c = eval_curve(run, "rollouts")
    cs = eval_curve(run, "step")
    fit = fit_sigmoid([x + 1 for x in cs.step], cs.reward) if cs.reward else None  # +1: keep the base row
    reliable = bool(fit and fit.success and not fit.extrapolated and 1e-3 < fit.A < 1 - 1e-3)
    drift = run.summary.get("drift") or {}
    return {"peak": c.peak[-1] if c.peak else None, "final": c.reward[-1] if c.reward else None,
            "plateau": plateau(cs.step, cs.reward, PROTOCOL["rules"]["asymptote"]["plateau_fraction"]),
            "eval_points": len(cs.reward),
            "asymptote": fit.A if reliable else None,
            "asymptote_fit": None if fit is None else {"A": fit.A, "rmse": fit.rmse, "extrapolated": fit.extrapolated},
            "kl_rev": drift.get("kl_rev"), "kl_fwd": drift.get("kl_fwd"), "entropy": drift.get("entropy"),
            "weight_l2": drift.get("weight_l2")}


def stage_peaks(run) -> list[dict]:
    """Per stage: eval reward of its task at the stage's start, and its peak during the stage."""
    rows = run.rows
    out, start = [], 0
    for st in run.summary.get("stages") or []:
        end = start + st["steps"]
        key = f"eval/{st['task']}/reward"
        vals = [(r["step"], r[key]) for r in rows if r.get(key) is not None and start <= r["step"] <= end]
        at_start = next((v for s, v in vals if s == start), vals[0][1] if vals else None)
        peak = max((v for _, v in vals), default=None)
        out.append({"task": st["task"], "start": at_start, "peak": peak,
                    "gain": None if peak is None or at_start is None else peak - at_start})
        start = end
    return out


def budget_held(run, target: float) -> dict:
    """How closely the reverse KL stayed near the budget: final ratio, and the mean |log(KL/target)|
    over the measurements of the second half of the run."""
    meas = [(r["step"], r["drift/kl_rev"]) for r in run.rows if r.get("drift/kl_rev") is not None]
    total = run.summary.get("steps") or (meas[-1][0] if meas else 0)
    late = [k for s, k in meas if s >= total / 2]
    err = [abs(math.log(max(k, 1e-8) / target)) for k in late]
    coefs = [r["slow/kl_coef"] for r in run.rows if r.get("slow/kl_coef") is not None]
    return {"target": target, "final_kl": meas[-1][1] if meas else None,
            "final_ratio": meas[-1][1] / target if meas else None,
            "late_mean_abs_log_err": statistics.fmean(err) if err else None,
            "late_max_ratio": max(late) / target if late else None,
            "final_kl_coef": coefs[-1] if coefs else None}


# ---- verdicts -----------------------------------------------------------------------------------
VERDICTS = ("reproduced", "partly", "refuted", "inconclusive")


def paired(values: Sequence[float | None], confidence: float = 0.95) -> dict:
    """Mean of per-seed values and its Student-t interval (None below 2 values): the study's noise margin."""
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    out = {"mean": statistics.fmean(xs) if xs else None, "min": min(xs, default=None), "max": max(xs, default=None),
           "n": len(xs), "ci": None, "values": list(values)}
    if len(xs) >= 2:
        half = float(t.ppf((1 + confidence) / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def decide(core: dict, rules: dict, *, further: bool) -> str:
    """The four-way verdict from the core comparison's interval (> 0 is the claim's side); see protocol.yaml."""
    ci = core.get("ci")
    if core.get("n", 0) < rules["statistics"]["min_seeds"] or not ci:
        return "inconclusive"
    if ci[0] > 0:
        return "reproduced" if further else "partly"
    if ci[1] < 0:
        return "refuted"
    return "inconclusive"


def _above(d: dict) -> bool:
    return bool(d.get("ci")) and d["ci"][0] > 0


def _below(d: dict) -> bool:
    return bool(d.get("ci")) and d["ci"][1] < 0


def _log(v: float | None, clip: Sequence[float]) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else math.log(min(max(float(v), clip[0]), clip[1]))


def _fmt_ci(d: dict, digits: int = 3, exp: bool = False) -> str:
    """'mean [lo, hi] 95% t (n seeds)'; exp: d holds logs, shown as ratios (geometric mean)."""
    if d.get("mean") is None:
        return "n/a (no seed has a value)"
    f = math.exp if exp else (lambda v: v)
    ci = f"[{f(d['ci'][0]):.{digits}g}, {f(d['ci'][1]):.{digits}g}]" if d.get("ci") else "[no interval]"
    return f"{f(d['mean']):.{digits}g} {ci} (n={d['n']} seeds)"


def _task_seed(r: dict, seed: int) -> list[dict]:
    """The single-task entries of one seed, over the regime's tasks."""
    return [t["seeds"][str(seed)] for t in r["single"].values() if str(seed) in t["seeds"]]


def _mean(vals: Sequence[float | None]) -> float | None:
    xs = [v for v in vals if v is not None]
    return statistics.fmean(xs) if xs else None


def se_value(f: dict) -> tuple[float | None, bool]:
    """(RL/FST slow-rollout ratio, censored) of one task-seed. Never reached: censored at its upper bound RL's count
    / FST's last eval count (``ratio_bound``; results from before the protocol lack it: 1, its largest value for
    runs of equal length). Reached with 0 slow rollouts: ``ratio_bound`` (RL's count / FST's first eval count)."""
    if f.get("reached") and f.get("ratio_slow") is not None:
        return f["ratio_slow"], False
    return f.get("ratio_bound", 1.0), not f.get("reached")


def asymptote_values(nums: dict, rule: dict) -> tuple[dict[str, float | None], str]:
    """Per method the value the asymptote verdict uses for one task-seed, and its basis ('sigmoid' or 'plateau'):
    the fitted A only when every method's fit is reliable on >= min_fit_points evals, else the final plateau."""
    fits = [nums[m].get("asymptote_fit") or {} for m in nums]
    ok = all(nums[m].get("asymptote") is not None and (nums[m].get("eval_points") or 0) >= rule["min_fit_points"]
             for m in nums) and all(fits)
    if ok:
        return {m: nums[m]["asymptote"] for m in nums}, "sigmoid"
    return {m: nums[m].get("plateau", nums[m].get("final")) for m in nums}, "plateau"


def resolves(settings: dict, rule: dict) -> tuple[bool, int]:
    """Whether the mode's single-task eval grid can resolve the target ratio (protocol: min_eval_points)."""
    steps = settings.get("single_steps") or settings.get("stage_steps") or 0
    points = steps // max(settings.get("eval_every") or 1, 1)
    return points >= rule["min_eval_points"], points


def verdicts(claims: dict, protocol: dict | None = None) -> list[dict]:
    """One verdict per paper claim and regime from the per-seed numbers, under the protocol's rules."""
    P = protocol or PROTOCOL
    rules, conf = P["rules"], P["statistics"]["confidence"]
    clip = P["statistics"]["ratio_clip"]
    seeds = claims["seeds"]
    out = []
    for regime, r in claims["regimes"].items():

        def add(claim: str, verdict: str, evidence: str, core: dict, regime: str = regime) -> None:
            out.append({"claim": claim, "regime": regime, "verdict": verdict, "evidence": evidence,
                        "core": {k: core.get(k) for k in ("mean", "ci", "n", "values")}})

        # -- sample efficiency (core: log ratio > 0; censored seeds at their bound)
        rule = rules["sample_efficiency"]
        per_seed, censored, reached = [], 0, []
        for sd in seeds:
            vals = []
            for e in _task_seed(r, sd):
                v, cens = se_value(e["fst_vs_rl"])
                censored += cens
                reached.append(bool(e["fst_vs_rl"].get("reached")))
                vals.append(_log(v, clip))
            per_seed.append(_mean(vals))
        core = paired(per_seed, conf)
        share = sum(reached) / max(len(reached), 1)
        ok, points = resolves(claims.get("settings") or {}, rule)
        gm = math.exp(core["mean"]) if core["mean"] is not None else None
        v = decide(core, P, further=gm is not None and gm >= rule["ratio"] and share >= rule["min_reached_share"])
        note = ""
        if not ok:
            v = "inconclusive"
            note = (f"; RESOLUTION: {points} evals after step 0 cannot resolve a {rule['ratio']}x ratio (needs >= "
                    f"{rule['min_eval_points']})")
        add("sample efficiency 1.4-3x", v, f"slow-rollout ratio RL/FST, geometric mean over seeds "
            f"{_fmt_ci(core, exp=True)}; FST reached RL's peak in {share:.0%} of task-seeds, {censored} censored "
            f"(counted at their upper bound){note}", core)

        # -- KL at matched reward (core: log ratio < 0)
        rule = rules["kl_matched"]
        per_seed = [_mean([_log(e["fst_vs_rl"]["kl_rev_matched"]["ratio"], clip) for e in _task_seed(r, sd)])
                    for sd in seeds]
        fwd = paired([_mean([_log(e["fst_vs_rl"]["kl_fwd_matched"]["ratio"], clip) for e in _task_seed(r, sd)])
                      for sd in seeds], conf)
        final = paired([_mean([_log(_div(e["methods"]["fst"].get("kl_rev"), e["methods"]["rl"].get("kl_rev")), clip)
                               for e in _task_seed(r, sd)]) for sd in seeds], conf)
        core = paired(per_seed, conf)
        flipped = {**core, "ci": [-core["ci"][1], -core["ci"][0]] if core["ci"] else None}
        gm = math.exp(core["mean"]) if core["mean"] is not None else None
        v = decide(flipped, P, further=gm is not None and gm <= rule["ratio"])
        add("up to 70% less KL at matched reward", v, f"KL(pi||base) FST/RL at matched reward {_fmt_ci(core, exp=True)}"
            f"; KL(base||pi) {_fmt_ci(fwd, exp=True)}; final KL(pi||base) FST/RL {_fmt_ci(final, exp=True)}", core)

        # -- asymptote (core: FST - RL > 0; further: FST - GEPA > 0)
        rule = rules["asymptote"]
        d_rl, d_gepa, basis = [], [], []
        for sd in seeds:
            a_rl, a_g = [], []
            for e in _task_seed(r, sd):
                vals, how = asymptote_values({m: e["methods"][m] for m in ("rl", "gepa", "fst")}, rule)
                basis.append(how)
                a_rl.append(_sub(vals["fst"], vals["rl"]))
                a_g.append(_sub(vals["fst"], vals["gepa"]))
            d_rl.append(_mean(a_rl))
            d_gepa.append(_mean(a_g))
        core, sec = paired(d_rl, conf), paired(d_gepa, conf)
        v = decide(core, P, further=_above(sec))
        fitted = basis.count("sigmoid")
        add("higher asymptote", v, f"FST - RL {_fmt_ci(core)}; FST - GEPA {_fmt_ci(sec)}; basis: sigmoid A in {fitted} "
            f"of {len(basis)} task-seeds, the final plateau (mean eval over the last "
            f"{rule['plateau_fraction']:.0%} of steps) in the others", core)

        # -- plasticity (core: FST - RL AUC > 0; further: base - FST within +-equivalence)
        rule = rules["plasticity"]
        runs_ = r.get("stream_runs") or {}
        base = r.get("base_plasticity") or {}

        def probe(m: str, sd: int, runs_: dict = runs_) -> float | None:
            e = (runs_.get(m) or {}).get(str(sd)) or {}
            return (e.get("plasticity") or {}).get("auc")

        core = paired([_sub(probe("fst", sd), probe("rl", sd)) for sd in seeds], conf)
        eq = paired([_sub((base.get(str(sd)) or {}).get("auc"), probe("fst", sd)) for sd in seeds], conf)
        within = bool(eq.get("ci")) and -rule["equivalence"] <= eq["ci"][0] and eq["ci"][1] <= rule["equivalence"]
        v = decide(core, P, further=within)
        add("plasticity base ~= FST > RL", v, f"probe AUC FST - RL {_fmt_ci(core)}; base - FST {_fmt_ci(eq)} "
            f"(~= : interval inside +-{rule['equivalence']})", core)

        # -- stalling (core: FST later gain - RL later gain > 0; further: RL stalls)
        rule = rules["stalling"]

        def gain(m: str, sd: int, later: bool, runs_: dict = runs_) -> float | None:
            e = (runs_.get(m) or {}).get(str(sd)) or {}
            st = e.get("stage_peaks") or []
            return _mean([x["gain"] for x in (st[1:] if later else st[:1]) if x.get("gain") is not None])

        core = paired([_sub(gain("fst", sd, True), gain("rl", sd, True)) for sd in seeds], conf)
        stall = paired([_sub(gain("rl", sd, True), _mul(rule["stall"], gain("rl", sd, False))) for sd in seeds], conf)
        v = decide(core, P, further=_below(stall))
        add("RL stalls on later stages, FST keeps learning", v,
            f"later-stage gain FST - RL {_fmt_ci(core)}; RL's later gain - {rule['stall']} x its first-stage gain "
            f"{_fmt_ci(stall)} (stall: below 0)", core)

        # -- both channels (core: trained+evolved - the better other arm > 0; further: beats the other arm too)
        def cell(sd: int, c: str, runs_: dict = runs_) -> float | None:
            e = (runs_.get("fst") or {}).get(str(sd)) or {}
            return _mean_cell(e.get("attribution"), c)

        arms = {c: paired([cell(sd, c) for sd in seeds], conf) for c in ("trained_seed", "base_evolved")}
        better = max(arms, key=lambda c: -math.inf if arms[c]["mean"] is None else arms[c]["mean"])
        other = next(c for c in arms if c != better)
        core = paired([_sub(cell(sd, "trained_evolved"), cell(sd, better)) for sd in seeds], conf)
        sec = paired([_sub(cell(sd, "trained_evolved"), cell(sd, other)) for sd in seeds], conf)
        v = decide(core, P, further=_above(sec))
        add("both channels needed", v,
            f"trained+evolved - {better.replace('_', '+')} (the better arm) {_fmt_ci(core)}; "
            f"- {other.replace('_', '+')} {_fmt_ci(sec)}", core)
    return out


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mul(k: float, a: float | None) -> float | None:
    return None if a is None else k * a


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _fmt_rho(v: dict) -> str:
    if v.get("rho") is None:
        return "n/a"
    ci = f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v.get("ci") else ""
    return f"{v['rho']:.2f}{ci}"


def _fmt_spread(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:.{digits}g} [{d['min']:.{digits}g}, {d['max']:.{digits}g}] (n={d['n']})"


# ---- aggregation --------------------------------------------------------------------------------
def is_main_stream(job: dict) -> bool:
    """The regime's stream run of a method with full weights and no KL penalty (the demo's setting)."""
    return job["kind"] == "stream" and job["cfg"]["out"].endswith(f"{job['method']}-full-kl0-s{job['seed']}")


def load_probes(probes: list[dict]) -> dict:
    return {(p["regime"], p["seed"], p["arm"]): json.loads(Path(p["out"] + ".json").read_text())
            for p in probes if Path(p["out"] + ".json").exists()}


def stream_entries(regime: str, runs: list[dict], loaded: dict, probe_res: dict, attributions: dict) -> dict:
    """{method: {seed: numbers}} of the regime's main stream runs (stage peaks, CL metrics, matrix, drift,
    plasticity probe from the run's weights, channel attribution)."""
    out: dict = {}
    for j in runs:
        if j["regime"] != regime or not is_main_stream(j):
            continue
        run = loaded[j["cfg"]["out"]]
        cl = run.summary.get("cl") or {}
        out.setdefault(j["method"], {})[str(j["seed"])] = {
            "stage_peaks": stage_peaks(run), "cl": {k: cl.get(k) for k in ("acc", "bwt", "fwt", "forgetting")},
            # task-agnostic scenario (one context for every task), where the method's contexts are per task
            "cl_agnostic": ({k: (run.summary.get("cl_agnostic") or {}).get(k) for k in ("acc", "bwt", "fwt",
                                                                                      "forgetting")}
                            if run.summary.get("cl_agnostic") else None),
            "matrix": run.summary.get("matrix"), **run_numbers(run),
            "plasticity": probe_res.get((regime, j["seed"], j["method"])),
            "attribution": attributions.get(j["cfg"]["out"])}
    return out


def analyse(s: dict, root: Path, runs: list[dict], probes: list[dict], attributions: dict[str, dict]) -> tuple[dict,
                                                                                                           dict]:
    from fastslow.analysis import load_run

    nb = s["bootstrap"]
    loaded = {j["cfg"]["out"]: load_run(j["cfg"]["out"]) for j in runs}
    probe_res = load_probes(probes)
    claims: dict = {"seeds": s["seeds"], "settings": s, "regimes": {}}
    for regime, reg in regimes().items():
        per_task: dict = {}
        pooled: dict[str, list] = {k: [] for k in ("slow", "total", "kl_rev", "kl_fwd", "d_rl", "d_gepa",
                                                   "reached")}
        for task in reg["stream"][: s["single_tasks"]]:
            per_seed = {}
            for seed in s["seeds"]:
                got = {j["method"]: loaded[j["cfg"]["out"]] for j in runs
                       if j["kind"] == "single" and j["regime"] == regime and j["task"] == task and j["seed"] == seed}
                nums = {m: run_numbers(got[m]) for m in METHODS}
                vs = {m: single_numbers(got["rl"], got[m]) for m in ("fst", "gepa")}
                per_seed[str(seed)] = {"methods": nums, "fst_vs_rl": vs["fst"], "gepa_vs_rl": vs["gepa"]}
                f = vs["fst"]
                pooled["reached"].append(f["reached"])
                pooled["slow"].append(f["ratio_slow"])
                pooled["total"].append(f["ratio_total"])
                pooled["kl_rev"].append(f["kl_rev_matched"]["ratio"])
                pooled["kl_fwd"].append(f["kl_fwd_matched"]["ratio"])

                asym, _ = asymptote_values({m: nums[m] for m in ("rl", "gepa", "fst")}, PROTOCOL["rules"]["asymptote"])
                pooled["d_rl"].append(_sub(asym["fst"], asym["rl"]))
                pooled["d_gepa"].append(_sub(asym["fst"], asym["gepa"]))
            summary = {m: {k: spread([per_seed[str(sd)]["methods"][m][k] for sd in s["seeds"]], nb)
                           for k in ("peak", "final", "asymptote", "kl_rev", "kl_fwd", "entropy")} for m in METHODS}
            per_task[task] = {"seeds": per_seed, "summary": summary}
        aggregate = {
            "fst_vs_rl": {"ratio_slow": spread(pooled["slow"], nb), "ratio_total": spread(pooled["total"], nb),
                          "kl_rev_ratio": spread(pooled["kl_rev"], nb), "kl_fwd_ratio": spread(pooled["kl_fwd"], nb),
                          "reached_share": sum(map(bool, pooled["reached"])) / max(len(pooled["reached"]), 1)},
            "asymptote_gap": {"fst_minus_rl": spread(pooled["d_rl"], nb),
                              "fst_minus_gepa": spread(pooled["d_gepa"], nb)},
        }
        stream_seeds = stream_entries(regime, runs, loaded, probe_res, attributions)
        base_probe = {str(sd): probe_res.get((regime, sd, "base")) for sd in s["seeds"]}

        def col(method: str, fn: Callable[[dict], float | None], stream_seeds: dict = stream_seeds) -> dict:
            vals = []
            for sd in s["seeds"]:
                e = stream_seeds.get(method, {}).get(str(sd))
                vals.append(fn(e) if e else None)
            return spread(vals, nb)

        def gain(stages: list[dict], later: bool) -> float | None:
            gains = [st["gain"] for st in (stages[1:] if later else stages[:1]) if st["gain"] is not None]
            return statistics.fmean(gains) if gains else None

        stream_aggregate = {
            "cl": {m: {k: col(m, lambda e, k=k: e["cl"][k]) for k in ("acc", "bwt", "fwt", "forgetting")}
                   for m in METHODS},
            "cl_agnostic": {m: {k: col(m, lambda e, k=k: (e.get("cl_agnostic") or {}).get(k))
                                for k in ("acc", "bwt", "fwt", "forgetting")} for m in METHODS
                            if any(e.get("cl_agnostic") for e in stream_seeds.get(m, {}).values())},
            "kl_rev": {m: col(m, lambda e: e["kl_rev"]) for m in METHODS},
            "kl_fwd": {m: col(m, lambda e: e["kl_fwd"]) for m in METHODS},
            "plasticity_auc": {"base": spread([(base_probe[str(sd)] or {}).get("auc") for sd in s["seeds"]], nb),
                               **{m: col(m, lambda e: (e["plasticity"] or {}).get("auc")) for m in PROBED}},
            "plasticity_final": {"base": spread([(base_probe[str(sd)] or {}).get("final") for sd in s["seeds"]], nb),
                                 **{m: col(m, lambda e: (e["plasticity"] or {}).get("final")) for m in PROBED}},
            "first_stage_gain": {m: col(m, lambda e: gain(e["stage_peaks"], False)) for m in METHODS},
            "later_stage_gain": {m: col(m, lambda e: gain(e["stage_peaks"], True)) for m in METHODS},
            "attribution_fst": {cell: col("fst", lambda e, c=cell: _mean_cell(e["attribution"], c))
                                for cell in ("base_seed", "base_evolved", "trained_seed", "trained_evolved")},
        }
        claims["regimes"][regime] = {"stream": reg["stream"], "heldout": reg["heldout"], "single": per_task,
                                     "aggregate": aggregate, "stream_runs": stream_seeds,
                                     "base_plasticity": base_probe, "stream_aggregate": stream_aggregate}
    claims["verdicts"] = verdicts(claims)

    points = []
    for j in runs:
        if not j.get("frontier"):
            continue
        run = loaded[j["cfg"]["out"]]
        fr = j["frontier"]
        probe = probe_res.get((j["regime"], j["seed"], j["method"] if is_main_stream(j) else fr["id"])) or {}
        cl = run.summary.get("cl") or {}
        drift = run.summary.get("drift") or {}
        point = {"regime": j["regime"], "method": j["method"], "series": fr["id"].split("-", 1)[1],
                 "weights": fr["weights"], "kl_coef": fr["kl_coef"], "kl_target": fr["kl_target"],
                 "seed": j["seed"], "kl_rev": drift.get("kl_rev"), "kl_fwd": drift.get("kl_fwd"),
                 "plasticity_auc": probe.get("auc"), "plasticity_final": probe.get("final"),
                 "forgetting": cl.get("forgetting"), "acc": cl.get("acc")}
        if fr["kl_target"]:
            point["budget"] = budget_held(run, fr["kl_target"])
        points.append(point)
    for j in runs:  # methods that never move the weights: one point per run at KL 0, plasticity = the base's
        if j["method"] in ZERO_DRIFT_METHODS and is_main_stream(j):
            run = loaded[j["cfg"]["out"]]
            probe = probe_res.get((j["regime"], j["seed"], "base")) or {}
            cl = run.summary.get("cl") or {}
            points.append({"regime": j["regime"], "method": j["method"], "series": "zero-drift", "weights": "frozen",
                           "kl_coef": None, "kl_target": None, "seed": j["seed"], "kl_rev": 0.0, "kl_fwd": 0.0,
                           "plasticity_auc": probe.get("auc"), "plasticity_final": probe.get("final"),
                           "forgetting": cl.get("forgetting"), "acc": cl.get("acc")})
    rho = frontier_stats(points, list(regimes()), nb)
    budgets = [p for p in points if p.get("budget")]
    frontier = {"seeds": s["seeds"], "points": points, "spearman": rho,
                "budget": {"target": s["kl_target"],
                           "final_ratio": spread([p["budget"]["final_ratio"] for p in budgets], nb),
                           "late_mean_abs_log_err": spread([p["budget"]["late_mean_abs_log_err"] for p in budgets],
                                                           nb),
                           "unbudgeted_final_kl": spread([p["kl_rev"] for p in points if p["series"] == "full-kl0"],
                                                         nb)}}
    return claims, frontier


def _mean_cell(attr: dict | None, cell: str) -> float | None:
    if not attr:
        return None
    vals = [c[cell] for c in attr.values() if c.get(cell) is not None]
    return statistics.fmean(vals) if vals else None


# ---- README -------------------------------------------------------------------------------------
def settings_section() -> list[str]:
    lines = ["## Settings (fixed before any seed ran; the same for every method)", "",
             "| setting | quick | full |", "|---|---|---|"]
    lines += [f"| `{k}` | {SETTINGS['quick'][k]} | {SETTINGS['full'][k]} |" for k in SETTINGS["full"]]
    return lines


def kept_blocks(path: Path) -> list[str]:
    """Sections other benchmarks own in ``path`` (``<!-- name:start -->`` ... ``<!-- name:end -->``, e.g. the MFU
    table of benchmarks/mfu.py): a regenerated README keeps them."""
    import re

    text = path.read_text() if path.exists() else ""
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", text, re.S)
            if not m.group(0).startswith(DEMO_START)]


def write_plan_readme(path: Path) -> None:
    """benchmarks/README.md before any results exist: what will run, with which settings."""
    runs = {m: plan(SETTINGS[m], Path("runs"))[0:2] for m in SETTINGS}
    r = regimes()
    L = ["# Benchmarks: the drift-plasticity study", "",
         "Generated by `benchmarks/claims.py --plan`; `make bench-quick` / `make bench` replace this file with "
         "their results (verdict table, per-task and stream numbers, frontier rho values, drift budget).", "",
         "**No results yet.** " + "; ".join(f"{m} mode: {len(v[0])} training runs, {len(v[1])} plasticity probes"
                                            for m, v in runs.items()) + ".", "",
         f"Regimes: prompt-dominant stream {' -> '.join(r['prompt']['stream'])} (probe `{r['prompt']['heldout']}`);"
         f" weight-dominant stream {' -> '.join(r['weight']['stream'])} (probe `{r['weight']['heldout']}`).", "",
         *settings_section(), ""]
    path.write_text("\n".join(L + [*(b + "\n" for b in kept_blocks(path))]) + "\n")


def cpu_kernels() -> str:
    """The CPU kernels torch runs here (e.g. 'AVX512 kernels'): RL runs differ between kinds (README, Determinism)."""
    import torch

    return f"{torch.backends.cpu.get_cpu_capability()} kernels"


SITTINGS = "sittings.jsonl"


def record_sitting(root: Path, wall_s: float, progress: BenchProgress, finished: bool) -> None:
    """Append this invocation to ``root``/sittings.jsonl if it trained anything: a study resumed over several
    sittings reports the sum of their times, not the last one's (which reused the others' runs)."""
    ran = progress.done - progress.reused
    if ran:
        row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(wall_s, 1),
               "ran": ran, "reused": progress.reused, "finished": finished}
        with (root / SITTINGS).open("a") as f:
            f.write(json.dumps(row) + "\n")


def sittings(root: Path) -> list[dict]:
    """The ledger's rows; a line that is not one (edited by hand) stops the analysis with its file and line."""
    path = root / SITTINGS
    rows = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        if line.strip():
            try:
                row = json.loads(line)
                float(row["wall_s"])
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path}:{n}: not a sitting row ({type(exc).__name__}: {exc}); mend or delete "
                                 "the line (each sitting's minutes count towards the study's wall time)") from None
            rows.append(row)
    return rows


def wall_time(meta: dict) -> str:
    n = meta.get("sittings", 1)
    return f"wall time {meta['wall_s'] / 60:.1f} min" + (f" (sum of {n} sittings; it was resumed)" if n > 1 else "")


def write_readme(claims: dict, frontier: dict, meta: dict, path: Path) -> None:
    s = claims["settings"]
    L = ["# Benchmarks: the drift-plasticity study", "",
         "Generated by `benchmarks/claims.py` from `results/claims.json` and `results/frontier.json`; do not edit.",
         "", f"Mode **{meta['mode']}**"
         + ("" if meta.get("frontier", True) else " without the frontier sweep (`--no-frontier`: the runs the "
            "verdicts need)")
         + f", seeds {claims['seeds']}, {wall_time(meta)} with "
         f"{meta['workers']} worker process(es) ({meta.get('cpus', '?')} CPUs visible"
         + (f", load average {meta['load_avg_start']:.1f} at the start" if meta.get("load_avg_start") is not None
            else "") + (f", {meta['cpu_kernels']}" if meta.get("cpu_kernels") else "") + "). Every number is the mean "
         "over seeds with [min, max] and n; claims.json has each seed; verdicts use the protocol's paired "
         "intervals.", "",
         "Reproduce: `make bench-quick` (quick mode), `make bench` (full mode) or `make bench-real` (SmolLM2-135M); "
         "`python benchmarks/claims.py --reverdict` decides committed results again under the current protocol "
         "(no runs).", "",
         *settings_section()]
    L += ["", "Regimes: **prompt**-dominant stream " + " -> ".join(claims["regimes"]["prompt"]["stream"])
          + f" (held-out probe task `{claims['regimes']['prompt']['heldout']}`); **weight**-dominant stream "
          + " -> ".join(claims["regimes"]["weight"]["stream"])
          + f" (probe `{claims['regimes']['weight']['heldout']}`). `fastslow world check` reports each task's regime.",
          "", *rules_section(claims), "", "## Verdicts", ""]
    if claims.get("reverdict"):
        L += [claims["reverdict"]["note"], ""]
    L += ["| claim | regime | verdict | evidence |", "|---|---|---|---|"]
    before = {(v["claim"], v["regime"]): v["verdict"] for v in (claims.get("reverdict") or {}).get("before", [])}
    for v in claims["verdicts"]:
        was = before.get((v["claim"], v["regime"]))
        change = f" (was {was})" if was and was != v["verdict"] else ""
        L.append(f"| {v['claim']} | {v['regime']} | **{v['verdict']}**{change} | {v['evidence']} |")
    L += ["", *other_modes(meta["mode"])]
    for regime, r in claims["regimes"].items():
        L += ["", f"## {regime}-dominant regime: single-task runs", "",
              "| task | method | peak | final | asymptote | KL(pi‖base) | KL(base‖pi) | entropy |",
              "|---|---|---|---|---|---|---|---|"]
        for task, t in r["single"].items():
            for m in (m for m in METHODS if m in t["summary"]):  # results older than a method lack it
                sm = t["summary"][m]
                L.append(f"| {task} | {m} | " + " | ".join(_fmt_spread(sm[k]) for k in
                         ("peak", "final", "asymptote", "kl_rev", "kl_fwd", "entropy")) + " |")
        a = r["aggregate"]["fst_vs_rl"]
        L += ["", "FST vs RL over tasks and seeds: sample-efficiency ratio (slow rollouts) "
              f"{_fmt_spread(a['ratio_slow'])},"
              f" counting fast rollouts {_fmt_spread(a['ratio_total'])}; FST reached RL's peak in "
              f"{a['reached_share']:.0%}; KL at matched reward FST/RL: reverse {_fmt_spread(a['kl_rev_ratio'])}, "
              f"forward {_fmt_spread(a['kl_fwd_ratio'])}.", "",
              f"### {regime}-dominant stream", "", "| method | ACC | BWT | forgetting | FWT | final KL(pi‖base) | "
              "first-stage gain | later-stage gain |", "|---|---|---|---|---|---|---|---|"]
        sa = r["stream_aggregate"]
        for m in (m for m in METHODS if m in sa["cl"]):
            L.append(f"| {m} | " + " | ".join(_fmt_spread(sa["cl"][m][k]) for k in ("acc", "bwt", "forgetting", "fwt"))
                     + f" | {_fmt_spread(sa['kl_rev'][m])} | {_fmt_spread(sa['first_stage_gain'][m])} | "
                     f"{_fmt_spread(sa['later_stage_gain'][m])} |")
        if sa.get("cl_agnostic"):
            L += ["", "Task-agnostic scenario (every task evaluated with one context; the table above is task-aware, "
                  "each task with its own):", "", "| method | ACC | BWT | forgetting | FWT |", "|---|---|---|---|---|"]
            L += [f"| {m} | " + " | ".join(_fmt_spread(c[k]) for k in ("acc", "bwt", "forgetting", "fwt")) + " |"
                  for m, c in sa["cl_agnostic"].items()]
        L += ["", "| plasticity probe from | final | AUC |", "|---|---|---|"]
        for arm in ("base", *PROBED):
            L.append(f"| {arm} | {_fmt_spread(sa['plasticity_final'].get(arm))} | "
                     f"{_fmt_spread(sa['plasticity_auc'].get(arm))} |")
        at = sa["attribution_fst"]
        cells = ("base_seed", "base_evolved", "trained_seed", "trained_evolved")
        L += ["", "FST's channel attribution (mean over the stream's tasks): "
              + ", ".join(f"{c} {_fmt_spread(at[c])}" for c in cells) + "."]
        L += memory_section(r, claims["seeds"])
    L += ["", "## The drift-plasticity frontier", ""]
    if not meta.get("frontier", True):
        L += ["**The sweep was not run in this invocation (`--no-frontier`)**: the points below are only each "
              "method's main stream (full weights, no KL penalty) and the zero-drift methods, and the drift budget "
              "has no runs; `make bench` runs the KL-penalty x weights sweep.", ""]
    L += [
          f"One point per run: KL penalty {s['kl_coefs']} x {s['weights']} x rl/fst, plus the drift budget "
          f"(full weights, `slow.kl_target={s['kl_target']}`), seeds {claims['seeds']}, on each regime's stream.",
          "Plots: " + ", ".join(f"`results/frontier_{r}.png`" for r in claims["regimes"]) + ".", "",
          "Spearman's rho of final KL against the outcome, one point per run; intervals are a cluster bootstrap over "
          "seeds (a seed's runs are resampled together). *partial*: controlling for method (ranks centred within "
          "each method), i.e. does drift predict the outcome beyond which method ran; *within*: inside one "
          "method's runs. Methods that never move the weights are points at KL 0. With 3 seeds the bootstrap has "
          "only 10 distinct resamples: the intervals are coarse, not optimistic.", "",
          "| regime / pair | pooled rho [95% CI] | partial rho (method held) | within each method | points (seeds) |",
          "|---|---|---|---|---|"]
    for pair, v in frontier["spearman"].items():
        within = "; ".join(f"{m} {_fmt_rho(w)}" for m, w in v["within"].items())
        L.append(f"| {pair} | {_fmt_rho(v['pooled'])} | {_fmt_rho(v['partial'])} | {within} | "
                 f"{v['pooled']['n']} ({v['pooled'].get('seeds')}) |")
    b = frontier["budget"]
    from fastslow.slow import KLController

    L += ["", f"The budget's controller (`KLController`) starts at 1/sqrt(2 x target) = "
          f"{KLController.default_init(b['target']):.2f} and updates after each drift measurement (every "
          f"{s['drift_every']} steps; gain 0.5, error clipped to +-{KLController.MAX_ERR:g} in log space), never "
          "lowering the coefficient while the KL still climbs under the budget at start-up."]
    L += ["", f"Drift budget {b['target']} nats/token: final KL / target {_fmt_spread(b['final_ratio'])}; "
          f"mean |log(KL/target)| over the second half {_fmt_spread(b['late_mean_abs_log_err'])}; "
          f"without a budget (kl 0, full) the final KL was {_fmt_spread(b['unbudgeted_final_kl'])}.", ""]
    path.write_text("\n".join(L + [*(b + "\n" for b in kept_blocks(path))]) + "\n")


def memory_section(r: dict, seeds: Sequence[int]) -> list[str]:
    """Where the experience memory (frozen weights) stands against the weight-training methods, paired by seed:
    stream ACC in both scenarios, and its single-task ceiling against the best method that trains weights."""
    runs = r.get("stream_runs", {})
    if "memory" not in runs:
        return []

    def stream(m: str, get: Callable[[dict], float | None]) -> list[float | None]:
        return [get(runs[m][str(sd)]) if str(sd) in runs.get(m, {}) else None for sd in seeds]

    def diff(a: str, b: str, get: Callable[[dict], float | None]) -> dict:
        return paired([_sub(x, y) for x, y in zip(stream(a, get), stream(b, get))])

    aware, agnostic = (lambda e: (e.get("cl") or {}).get("acc")), (lambda e: (e.get("cl_agnostic") or {}).get("acc"))
    pairs = [(a, b) for a, b in (("memory", "fst"), ("memory", "rl"), ("memory", "gepa"), ("fst+memory", "fst"),
                                 ("fst+memory", "memory")) if a in runs and b in runs]
    L = ["", "Memory on the drift axis (stream ACC, paired by seed, mean [95% t interval]; memory's KL is 0):", "",
         "| comparison | ACC task-aware | ACC task-agnostic | final KL(pi‖base) |", "|---|---|---|---|"]
    for a, b in pairs:
        L.append(f"| {a} - {b} | {_fmt_ci(diff(a, b, aware))} | {_fmt_ci(diff(a, b, agnostic))} | "
                 f"{_fmt_ci(diff(a, b, lambda e: e.get('kl_rev')))} |")
    # The ceiling: memory's single-task final against the best weight-training method's, task by task.
    trainers = [m for m in METHODS if m not in ZERO_DRIFT_METHODS]
    gaps = []
    for sd in seeds:
        per_task = []
        for t in r["single"].values():
            ms = (t.get("seeds", {}).get(str(sd)) or {}).get("methods", {})
            best = max((ms[m]["final"] for m in trainers if ms.get(m, {}).get("final") is not None), default=None)
            per_task.append(_sub((ms.get("memory") or {}).get("final"), best))
        gaps.append(_mean(per_task))
    gap, word = paired(gaps), {True: "above", False: "below"}
    side = word[True] if _above(gap) else word[False] if _below(gap) else "not distinguishable from"
    L += ["", f"Ceiling: on single tasks memory's final reward minus the best weight-training method's "
          f"({', '.join(trainers)}) is {_fmt_ci(gap)}: memory is {side} it. (The paper's frozen-weight prompt-only "
          "arm: 21.8 against RL 34.8 and FST 37.5, averaged over its tasks.)"]
    return L


def other_modes(mode: str) -> list[str]:
    """The verdicts of the modes this README was not generated from: the real model's when results exist."""
    L = ["### Other modes", ""]
    for other in ("quick", "full"):
        if other == mode:
            continue
        try:
            v = json.loads((RESULTS / f"verdicts_{other}.json").read_text())
        except (OSError, ValueError):
            v = None
        if not v or v["protocol"]["sha256"] != protocol_sha256():
            target = "make bench-quick" if other == "quick" else "make bench"
            L.append(f"- {other} (`{target}`): not run under this protocol yet.")
            continue
        m = v["meta"]
        part = "" if m.get("frontier", True) else ", without the frontier sweep (`--no-frontier`)"
        L += [f"- {other}, protocol `{v['protocol']['sha256'][:12]}`, {wall_time(m)}{part}:", "",
              "| claim | regime | verdict | evidence |", "|---|---|---|---|"]
        L += [f"| {x['claim']} | {x['regime']} | **{x['verdict']}** | {x['evidence']} |" for x in v["verdicts"]]
        L.append("")
    real = RESULTS / "real_claims.json"
    if not real.exists():
        L.append("- real model (`make bench-real`, SmolLM2-135M on reasoning-gym): not run under this protocol yet.")
        return L
    r = json.loads(real.read_text())
    L += [f"- real model (`make bench-real`), protocol `{r['protocol']['sha256'][:12]}`, {r['finished_runs']} of "
          f"{r['planned_runs']} runs finished, stream {', '.join(r['regimes']['real']['stream'])}:", "",
          "| claim | verdict | evidence |", "|---|---|---|"]
    L += [f"| {v['claim']} | **{v['verdict']}** | {v['evidence']} |" for v in r["verdicts"]]
    return L


def rules_section(claims: dict) -> list[str]:
    """The verdict rules in words, with the protocol file and hash they were decided under."""
    P, pr = PROTOCOL, claims.get("protocol") or {}
    r, st = P["rules"], P["statistics"]
    se, asy = r["sample_efficiency"], r["asymptote"]
    return [f"Protocol: `{pr.get('file', 'benchmarks/protocol.yaml')}` sha256 `{pr.get('sha256', 'n/a')}` (settings, "
            "methods and these rules; a run made under another hash is not reused).", "",
            "Verdict rules (pre-registered): every comparison is paired by seed (a seed's value is its mean over the "
            f"mode's tasks) with a {st['confidence']:.0%} Student-t interval over seeds. The claim's core "
            "comparison decides: interval on the claim's side -> **reproduced** if its further condition holds, else "
            "**partly**; on the other side -> **refuted**; spanning no effect (or fewer than "
            f"{st['min_seeds']} seeds) -> **inconclusive**. So *partly* never contradicts the core.",
            f"- sample efficiency: core RL/FST slow-rollout ratio > 1 (log scale; a seed where FST never reaches RL's "
            f"peak is censored at its upper bound, not dropped); further: geometric mean >= {se['ratio']}"
            f" and reached in >= {se['min_reached_share']:.0%} of task-seeds; a mode with fewer than "
            f"{se['min_eval_points']} evals after step 0 cannot resolve 1.4x: inconclusive.",
            f"- KL at matched reward: core FST/RL < 1; further: geometric mean <= {r['kl_matched']['ratio']}; the "
            "final KL ratio is shown beside it.",
            "- higher asymptote: core FST - RL > 0; further: FST - GEPA > 0. Sigmoid A only where every method's fit "
            f"is reliable on >= {asy['min_fit_points']} evals, else the final plateau (mean over the last "
            f"{asy['plateau_fraction']:.0%} of steps); the evidence says which.",
            "- plasticity: core FST - RL probe AUC > 0; further: base - FST inside "
            f"+-{r['plasticity']['equivalence']}.",
            "- RL stalls: core FST - RL gain within later stages > 0; further: RL's later gain < "
            f"{r['stalling']['stall']} x its first-stage gain.",
            "- both channels: core trained+evolved - the better of trained+seed and base+evolved > 0; further: it "
            "beats the other arm too."]


DEMO_START, DEMO_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def demo_table(claims: dict) -> str:
    """The project README's demo table as mean [min, max] over seeds, from the prompt regime's stream runs
    (full mode uses the demo's settings exactly)."""
    r = claims["regimes"]["prompt"]
    runs, seeds = r["stream_runs"], claims["seeds"]

    def cell(method: str, fn: Callable[[dict], float | None], digits: int = 3) -> str:
        vals = [fn(runs[method][str(sd)]) for sd in seeds if str(sd) in runs.get(method, {})]
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{statistics.fmean(vals):.{digits}f} [{min(vals):.{digits}f}, {max(vals):.{digits}f}]"

    rows = []
    for j, task in enumerate(r["stream"]):
        rows.append([f"final reward {task} (best prompt)"] + [cell(m, lambda e, j=j: e["matrix"][-1][j])
                                                             for m in METHODS])
    for scenario, tag in (("cl", "task-aware"), ("cl_agnostic", "task-agnostic")):
        for key in ("acc", "bwt", "forgetting"):
            rows.append([f"{key.upper() if key != 'forgetting' else 'forgetting'} ({tag})"]
                        + [cell(m, lambda e, k=key, sc=scenario: (e.get(sc) or {}).get(k)) for m in METHODS])
    rows.append(["final KL(pi‖base) per token"] + [cell(m, lambda e: e["kl_rev"]) for m in METHODS])
    sa = r["stream_aggregate"]  # gepa and memory never move the weights: their plasticity is the base's
    for key in ("final", "auc"):
        b = sa[f"plasticity_{key}"]["base"]
        rows.append([f"plasticity on `{r['heldout']}`, {key}; base {_fmt_spread(b)}"]
                    + [cell(m, lambda e, k=key: (e["plasticity"] or {}).get(k)) if m in PROBED else "= base"
                       for m in METHODS])
    lines = [f"Mean [min, max] over seeds {seeds} (`make bench-demo`, or `make bench` with benchmarks/README.md).",
             "",
             "| | " + " | ".join(f"{m} (frozen weights)" if m in ZERO_DRIFT_METHODS else m for m in METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def demo_plan(s: dict, root: Path, seeds: Sequence[int]) -> tuple[dict, list[dict], list[dict]]:
    """Only what the project README's demo table needs: the prompt stream's main rl / gepa / fst runs and the
    plasticity probes from base, rl and fst, for ``seeds`` (the same run dirs as the full bench: it reuses them)."""
    s = {**s, "seeds": list(seeds)}
    runs, probes = plan(s, root)
    runs = [j for j in runs if j["regime"] == "prompt" and is_main_stream(j)]
    probes = [p for p in probes if p["regime"] == "prompt" and p["arm"] in ("base", *PROBED)]
    return s, runs, probes


def demo_claims(s: dict, runs: list[dict], probes: list[dict]) -> dict:
    """The part of claims.json that :func:`demo_table` reads, from the runs of :func:`demo_plan`."""
    from fastslow.analysis import load_run

    loaded = {j["cfg"]["out"]: load_run(j["cfg"]["out"]) for j in runs}
    probe_res = load_probes(probes)
    r = regimes()["prompt"]
    base = [probe_res.get(("prompt", sd, "base")) or {} for sd in s["seeds"]]
    aggregate = {f"plasticity_{k}": {"base": spread([b.get(k) for b in base], s["bootstrap"])}
                 for k in ("final", "auc")}
    return {"seeds": s["seeds"], "regimes": {"prompt": {
        "stream": r["stream"], "heldout": r["heldout"], "stream_aggregate": aggregate,
        "stream_runs": stream_entries("prompt", runs, loaded, probe_res, {})}}}


def update_project_readme(claims: dict, path: Path) -> bool:
    """Replace the demo table between the markers of the project README; False when the markers are absent."""
    text = path.read_text()
    if DEMO_START not in text or DEMO_END not in text:
        return False
    head, rest = text.split(DEMO_START, 1)
    _, tail = rest.split(DEMO_END, 1)
    path.write_text(f"{head}{DEMO_START}\n{demo_table(claims)}\n{DEMO_END}{tail}")
    return True


def reverdict(results: Path, readme: Path) -> list[tuple[str, str, str, str]]:
    """Decide the committed results (results/claims.json, frontier.json) again under the current protocol, from
    their per-seed numbers, without running anything; rewrite both and README.md. Returns (claim, regime, before,
    after) for every verdict."""
    claims = json.loads((results / "claims.json").read_text())
    frontier = json.loads((results / "frontier.json").read_text())
    sha = protocol_sha256()
    earlier = claims.get("reverdict") or {}
    before = earlier.get("before") or claims["verdicts"]
    claims["verdicts"] = verdicts(claims)
    # the protocol the runs were made under (None: before protocol.yaml), kept across repeated re-decisions
    was = earlier["runs_made_under"] if "runs_made_under" in earlier else (claims.get("protocol") or {}).get("sha256")
    claims["reverdict"] = {"before": before, "runs_made_under": was, "note": (
        f"Verdicts decided under protocol {sha[:12]} from the per-seed numbers of runs made "
        + (f"under protocol {was[:12]}" if was else "before the protocol existed (and before FST's population fix)")
        + "; no run was repeated. `make bench-quick` replaces them with fresh runs.")}
    claims["protocol"] = {"file": f"benchmarks/{PROTOCOL_PATH.name}", "sha256": sha}
    points = [p for p in frontier["points"] if p["method"] not in ZERO_DRIFT_METHODS]
    for regime, r in claims["regimes"].items():  # zero-drift points from the main stream runs and the base probe
        for m in ZERO_DRIFT_METHODS:
            for sd, e in (r.get("stream_runs") or {}).get(m, {}).items():
                probe = (r.get("base_plasticity") or {}).get(sd) or {}
                points.append({"regime": regime, "method": m, "series": "zero-drift", "weights": "frozen",
                               "kl_coef": None, "kl_target": None, "seed": int(sd), "kl_rev": 0.0, "kl_fwd": 0.0,
                               "plasticity_auc": probe.get("auc"), "plasticity_final": probe.get("final"),
                               "forgetting": (e.get("cl") or {}).get("forgetting"),
                               "acc": (e.get("cl") or {}).get("acc")})
    frontier["points"] = points
    frontier["spearman"] = frontier_stats(points, list(claims["regimes"]), claims["settings"]["bootstrap"])
    frontier["protocol"] = claims["protocol"]
    (results / "claims.json").write_text(json.dumps(claims, indent=1))
    (results / "frontier.json").write_text(json.dumps(frontier, indent=1))
    from fastslow.report import plot_frontier

    for regime in claims["regimes"]:
        plot_frontier(frontier, regime, results / f"frontier_{regime}.png")
    write_readme(claims, frontier, claims["meta"], readme)
    old = {(v["claim"], v["regime"]): v["verdict"] for v in before}
    return [(v["claim"], v["regime"], old.get((v["claim"], v["regime"]), "?"), v["verdict"])
            for v in claims["verdicts"]]


# ---- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the <= 15 minute version (make bench-quick)")
    parser.add_argument("--root", type=Path, default=None, help="run dirs (default runs/bench[-quick])")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workers", type=int, default=min(2, threads.usable_cpus()))
    parser.add_argument("--analyse-only", action="store_true", help="skip training; analyse existing run dirs")
    parser.add_argument("--plan", action="store_true", help="only write README.md with the settings; run nothing")
    parser.add_argument("--no-frontier", action="store_true",
                        help="only the runs the verdicts need: single tasks, each method's main stream, their probes "
                        "and attributions; the frontier's KL-penalty x weights sweep is left out (about 2/3 of full "
                        "mode's steps)")
    parser.add_argument("--reverdict", action="store_true",
                        help="decide the committed results again under the current protocol (no runs)")
    parser.add_argument("--demo", action="store_true",
                        help="only the project README's demo table (make bench-demo): the prompt stream's rl, gepa "
                        "and fst runs with the demo's settings (full mode) and their plasticity probes")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="with --demo: these seeds (comma-separated; default: full mode's seeds)")
    args = parser.parse_args(argv)
    if args.plan:
        write_plan_readme(HERE / "README.md")
        return
    if args.reverdict:
        for claim, regime, was, now in reverdict(args.results, HERE / "README.md"):
            print(f"{regime:7} {claim:48} {was:12} -> {now}{'' if was == now else '   CHANGED'}")
        return
    if args.seeds is not None and not args.demo:
        parser.error("--seeds only goes with --demo (the study always reports every seed of its settings)")
    if args.demo:
        run_demo(args.root or Path("runs") / "bench", args.seeds or SETTINGS["full"]["seeds"], args.workers,
                 HERE.parent / "README.md")
        return
    mode = "quick" if args.quick else "full"
    s = SETTINGS[mode]
    root = args.root or Path("runs") / ("bench-quick" if args.quick else "bench")
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    runs, probes = plan(s, root)
    if args.no_frontier:
        runs = [j for j in runs if not j.get("frontier") or is_main_stream(j)]
        probes = [p for p in probes if p["arm"] in ("base", *PROBED)]
    sha = protocol_sha256()
    atts = [{"run": j["cfg"]["out"], "tasks": regimes()[j["regime"]]["stream"], "n": s["attribution_n"],
             "max_new_tokens": s["max_new_tokens"], "seed": j["seed"], "protocol": sha}
            for j in runs if is_main_stream(j) and j["method"] == "fst"]
    print(f"{mode}: {len(runs)} runs, {len(probes)} probes, {len(atts)} attributions -> {root}", flush=True)
    sittings(root)  # a mangled ledger stops the study now, not after hours of runs
    if not args.analyse_only:
        preregister(root, mode, sha)
        # one bar and one ETA for the whole study; a killed bench reuses every finished run, probe, attribution
        kinds = [(train_job, runs, "run"), (probe_job, probes, "probe"), (attribution_job, atts, "attribution")]
        progress = BenchProgress(mode, sum(job_cost(fn, j) for fn, jobs, _ in kinds for j in jobs),
                                 sum(len(jobs) for _, jobs, _ in kinds))
        finished = False
        try:
            for fn, jobs, label in kinds:
                run_pool(fn, jobs, args.workers, label, progress)
            finished = True
        except KeyboardInterrupt:
            progress.close()
            print(f"interrupted: finished runs are kept in {root}; the same command resumes from them",
                  file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        finally:
            progress.close()
            record_sitting(root, time.perf_counter() - t0, progress, finished)
        t0 = time.perf_counter()  # the analysis, added to the sittings below
    stale = [j["cfg"]["out"] for j in runs if not _finished_with(Path(j["cfg"]["out"]), config_dump(j["cfg"]), sha)]
    if stale:
        raise SystemExit(f"{len(stale)} of {len(runs)} run dirs are missing or were made under another protocol than "
                         f"{PROTOCOL_PATH.name} {sha[:12]} (e.g. {stale[0]}): run without --analyse-only")
    attributions = {a["run"]: {k: v for k, v in json.loads((Path(a["run"]) / "attribution.json").read_text()).items()
                               if k != "protocol"} for a in atts if (Path(a["run"]) / "attribution.json").exists()}
    claims, frontier = analyse(s, root, runs, probes, attributions)
    ledger = sittings(root)
    wall = time.perf_counter() - t0 + sum(r["wall_s"] for r in ledger)
    meta = {"mode": mode, "wall_s": wall, "sittings": len(ledger), "workers": args.workers,
            "cpus": threads.usable_cpus(),
            "frontier": not args.no_frontier, "load_avg_start": None if args.analyse_only else load_start,
            "cpu_kernels": None if args.analyse_only else cpu_kernels()}
    if args.analyse_only:
        old = args.results / "claims.json"
        if old.exists():
            was = json.loads(old.read_text()).get("meta", {})  # the run's own wall time and load, not analysis's
            kept = ("load_avg_start", "cpu_kernels") + (() if ledger else ("wall_s", "sittings"))
            meta.update({k: was[k] for k in kept if k in was})
    claims["meta"] = frontier["meta"] = meta
    claims["protocol"] = frontier["protocol"] = {"file": f"benchmarks/{PROTOCOL_PATH.name}", "sha256": sha}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "claims.json").write_text(json.dumps(claims, indent=1))
    (args.results / "frontier.json").write_text(json.dumps(frontier, indent=1))
    (args.results / f"verdicts_{mode}.json").write_text(json.dumps(
        {"mode": mode, "protocol": claims["protocol"], "meta": meta, "verdicts": claims["verdicts"]}, indent=1))
    from fastslow.report import plot_frontier

    for regime in regimes():
        plot_frontier(frontier, regime, args.results / f"frontier_{regime}.png")
    write_readme(claims, frontier, meta, HERE / "README.md")
    if mode == "full":  # the project README's demo table uses the demo's settings: only full mode matches them
        update_project_readme(claims, HERE.parent / "README.md")
    for name in ("claims.json", "frontier.json"):  # the run root doubles as a report dir
        (root / name).write_text((args.results / name).read_text())
    print(f"wrote {args.results} and {HERE / 'README.md'} ({meta['wall_s'] / 60:.1f} min)", flush=True)


def run_demo(root: Path, seeds: Sequence[int], workers: int, readme: Path) -> None:
    """Run (or reuse) the demo's runs and probes for ``seeds`` and rewrite the project README's demo table."""
    t0 = time.perf_counter()
    s, runs, probes = demo_plan(SETTINGS["full"], root, seeds)
    print(f"demo: {len(runs)} runs, {len(probes)} probes, seeds {list(seeds)} -> {root}", flush=True)
    run_pool(train_job, runs, workers, "run")
    run_pool(probe_job, probes, workers, "probe")
    if not update_project_readme(demo_claims(s, runs, probes), readme):
        raise SystemExit(f"{readme}: no {DEMO_START} ... {DEMO_END} markers")
    print(f"wrote the demo table of {readme} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
