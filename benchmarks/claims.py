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

Every hyper-parameter is in SETTINGS, fixed before any seed ran; all methods share them; all seeds are
reported. Runs already finished (summary.json present) are reused, so an interrupted bench resumes.
Writes benchmarks/results/{claims,frontier}.json, plots and benchmarks/README.md (generated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Fixed before any seed ran (written to README.md). Same for every method; LoRA's lr is 10x (usual practice
# for adapters, fixed up front, same for rl and fst).
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": [0, 1, 2], "single_tasks": 1, "single_steps": 8, "stage_steps": 8, "batch_problems": 8,
        "group_size": 8,
        "lr": 3e-4, "lora_lr": 3e-3, "lora_r": 8, "warmup_steps": 5, "max_new_tokens": 20,
        "fast_every": 4, "population": 4, "fast_budget": 24, "val_size": 8,
        "eval_every": 4, "eval_n": 32, "drift_every": 4, "probe_size": 12,
        "probe_steps": 8, "probe_eval_every": 4, "attribution_n": 32,
        "kl_coefs": [0.0, 1.0], "weights": ["full", "lora"], "kl_target": 0.05, "bootstrap": 1000,
    },
    "full": {
        "seeds": [0, 1, 2], "single_tasks": 3, "single_steps": 90, "stage_steps": 90, "batch_problems": 8,
        "group_size": 8,
        "lr": 3e-4, "lora_lr": 3e-3, "lora_r": 8, "warmup_steps": 5, "max_new_tokens": 20,
        "fast_every": 10, "population": 4, "fast_budget": 64, "val_size": 12,
        "eval_every": 10, "eval_n": 96, "drift_every": 10, "probe_size": 16,
        "probe_steps": 30, "probe_eval_every": 5, "attribution_n": 96,
        "kl_coefs": [0.0, 0.01, 0.1, 1.0], "weights": ["full", "lora"], "kl_target": 0.3, "bootstrap": 2000,
    },
}
METHODS = ("rl", "gepa", "memory", "fst", "fst+memory")  # fst+memory: method fst with fast.kind memory
PROBED = ("rl", "fst", "fst+memory")  # methods whose weights move: plasticity probes start from their weights
FRONTIER_METHODS = ("rl", "fst")


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
                               "weights": weights, "template": template,
                               "out": str(root / regime / "probes" / f"{arm}-s{seed}")})
    return list(runs.values()), probes


# ---- workers (run in child processes: one torch thread each) --------------------------------------
def _quiet(_: str) -> None:
    pass


def train_job(job: dict) -> str:
    import torch

    from fastslow.config import config_from_dict
    from fastslow.loop import train

    torch.set_num_threads(1)
    out = Path(job["cfg"]["out"])
    cfg = config_from_dict(job["cfg"])
    if not _finished_with(out, cfg.model_dump(mode="json")):
        train(cfg, force=True, log=_quiet)
    return str(out)


def _finished_with(out: Path, settings: dict) -> bool:
    """A finished run in ``out`` made with exactly these settings (else it is run again)."""
    import yaml

    if not (out / "summary.json").exists() or not (out / "config.yaml").exists():
        return False
    return yaml.safe_load((out / "config.yaml").read_text()) == settings


def merged_weights(run_dir: Path, lora_cfg: dict) -> Path:
    """A LoRA run's adapter merged into its base and saved as a plain model dir (probes start from weights)."""
    from fastslow.checkpoint import run_weights
    from fastslow.config import ModelConfig
    from fastslow.policy import Policy

    dest = run_dir / "merged"
    if not (dest / "config.json").exists():
        policy = Policy.load(ModelConfig(path="micro", device="cpu", lora=lora_cfg), weights=run_weights(run_dir))
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
    if result_path.exists():
        return json.loads(result_path.read_text())
    start = job["start"]
    if job["weights"] == "lora":
        start = str(merged_weights(Path(start), _lora_of(job)))
    template = config_from_dict(job["template"])
    result = plasticity_probe(start, job["task"], template.stages[0].steps, template, out,
                              run=lambda cfg, **kw: train(cfg, log=_quiet, **kw))
    result = {k: result[k] for k in ("final", "auc", "curve")}
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
    if path.exists():
        return json.loads(path.read_text())
    tasks = {t.name: t for t in (load_task(f"micro/{n}") for n in job["tasks"])}
    result = channel_attribution(job["run"], ModelConfig(path="micro", device="cpu"), tasks, n=job["n"],
                                 max_new_tokens=job["max_new_tokens"], seed=job["seed"])
    path.write_text(json.dumps(result))
    return result


def run_pool(fn: Callable[[dict], Any], jobs: list[dict], workers: int, label: str) -> list[Any]:
    t0 = time.perf_counter()
    if workers <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(fn(job))
            print(f"  {label} {i + 1}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return results
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        results = []
        for i, f in enumerate(futures):
            results.append(f.result())
            print(f"  {label} {i + 1}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return results


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


def spearman(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman's rho of paired points and a bootstrap 95% CI (resampling points)."""
    from scipy.stats import spearmanr

    pts = [(float(a), float(b)) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pts) < 4:
        return {"rho": None, "ci": None, "n": len(pts)}

    def rho(sample: list[tuple[float, float]]) -> float | None:
        xs, ys = zip(*sample)
        if len(set(xs)) < 2 or len(set(ys)) < 2:
            return None
        r = spearmanr(xs, ys).statistic
        return float(r) if math.isfinite(r) else None

    rng = random.Random(seed)
    boots = sorted(b for b in (rho(rng.choices(pts, k=len(pts))) for _ in range(n_boot)) if b is not None)
    ci = [boots[int(0.025 * (len(boots) - 1))], boots[int(0.975 * (len(boots) - 1))]] if boots else None
    return {"rho": rho(pts), "ci": ci, "n": len(pts)}


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
    """Sample efficiency and KL at matched reward of ``other`` against ``rl`` (DESIGN.md definitions)."""
    from fastslow.analysis import sample_efficiency

    se = sample_efficiency(rl, other)
    return {"target": se["target"], "reached": se["reached"], "ratio_slow": se["slow"]["ratio"],
            "ratio_total": se["total"]["ratio"], "kl_rev_matched": kl_at_matched(rl, other, "kl_rev"),
            "kl_fwd_matched": kl_at_matched(rl, other, "kl_fwd")}


def run_numbers(run) -> dict:
    from fastslow.analysis import eval_curve, fit_sigmoid

    c = eval_curve(run, "rollouts")
    cs = eval_curve(run, "step")
    fit = fit_sigmoid([x + 1 for x in cs.step], cs.reward) if cs.reward else None  # +1: keep the base row
    drift = run.summary.get("drift") or {}
    return {"peak": c.peak[-1] if c.peak else None, "final": c.reward[-1] if c.reward else None,
            "asymptote": fit.A if fit and fit.success and not fit.extrapolated else None,
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
def _m(d: dict | None) -> float | None:
    return None if d is None else d.get("mean")


def verdicts(claims: dict) -> list[dict]:
    """One verdict per paper claim and regime from the aggregated numbers (rules in README.md)."""
    out = []
    for regime, r in claims["regimes"].items():
        agg, stream = r["aggregate"], r["stream_aggregate"]

        def add(claim: str, verdict: str, evidence: str, regime: str = regime) -> None:
            out.append({"claim": claim, "regime": regime, "verdict": verdict, "evidence": evidence})

        se = agg["fst_vs_rl"]["ratio_slow"]
        reached = agg["fst_vs_rl"]["reached_share"]
        ratio = _m(se)
        if ratio is not None and ratio >= 1.4 and reached >= 2 / 3:
            v = "reproduced"
        elif ratio is not None and ratio > 1.0 and reached > 0:
            v = "partly"
        else:
            v = "refuted"
        add("sample efficiency 1.4-3x", v, f"slow-rollout ratio RL/FST {_fmt_spread(se)} (mean over reached pairs), "
            f"FST reached RL's peak in {reached:.0%} of task-seeds; counting fast rollouts "
            f"{_fmt_spread(agg['fst_vs_rl']['ratio_total'])}")

        kl = agg["fst_vs_rl"]["kl_rev_ratio"]
        ratio = _m(kl)
        v = ("reproduced" if ratio is not None and ratio <= 0.5 else
             "partly" if ratio is not None and ratio < 1.0 else "refuted")
        add("up to 70% less KL at matched reward", v, f"KL(pi||base) FST/RL {_fmt_spread(kl)}; "
            f"KL(base||pi) FST/RL {_fmt_spread(agg['fst_vs_rl']['kl_fwd_ratio'])}")

        d_rl, d_gepa = agg["asymptote_gap"]["fst_minus_rl"], agg["asymptote_gap"]["fst_minus_gepa"]
        lo_rl = (d_rl.get("ci") or [None])[0]
        if _m(d_rl) is not None and lo_rl is not None and lo_rl > 0 and (_m(d_gepa) or 0) > 0:
            v = "reproduced"
        elif _m(d_rl) is not None and (_m(d_rl) > 0 or (_m(d_gepa) or 0) > 0):
            v = "partly"
        else:
            v = "refuted"
        add("higher asymptote", v, f"FST - RL asymptote {_fmt_spread(d_rl)}; FST - GEPA {_fmt_spread(d_gepa)} "
            f"(sigmoid A, peak where the fit is unreliable)")

        p = stream["plasticity_auc"]
        base, fst, rl = _m(p.get("base")), _m(p.get("fst")), _m(p.get("rl"))
        if None in (base, fst, rl):
            v = "refuted"
        elif fst > rl and abs(base - fst) <= 0.05:
            v = "reproduced"
        elif fst > rl:
            v = "partly"
        else:
            v = "refuted"
        add("plasticity base ~= FST > RL", v, f"probe AUC base {_fmt_spread(p.get('base'))}, "
            f"FST {_fmt_spread(p.get('fst'))}, RL {_fmt_spread(p.get('rl'))} (~= means within 0.05)")

        later = stream["later_stage_gain"]
        first = stream["first_stage_gain"]
        f_l, r_l, r_f = _m(later.get("fst")), _m(later.get("rl")), _m(first.get("rl"))
        if None in (f_l, r_l, r_f):
            v = "refuted"
        elif f_l > r_l and r_l < 0.5 * r_f:
            v = "reproduced"
        elif f_l > r_l:
            v = "partly"
        else:
            v = "refuted"
        add("RL stalls on later stages, FST keeps learning", v,
            f"gain within later stages: FST {_fmt_spread(later.get('fst'))}, RL {_fmt_spread(later.get('rl'))}; "
            f"RL's first-stage gain {_fmt_spread(first.get('rl'))} (stall = later < half of first)")

        a = stream["attribution_fst"]
        both, wt, pr = _m(a.get("trained_evolved")), _m(a.get("trained_seed")), _m(a.get("base_evolved"))
        if None in (both, wt, pr):
            v = "refuted"
        elif both > wt and both > pr:
            v = "reproduced"
        elif both > wt or both > pr:
            v = "partly"
        else:
            v = "refuted"
        add("both channels needed", v, f"FST's 2x2: trained+evolved {_fmt_spread(a.get('trained_evolved'))}, "
            f"trained+seed {_fmt_spread(a.get('trained_seed'))}, base+evolved {_fmt_spread(a.get('base_evolved'))}")
    return out


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
        cl, agnostic = run.summary.get("cl") or {}, run.summary.get("cl_agnostic") or {}
        out.setdefault(j["method"], {})[str(j["seed"])] = {
            "stage_peaks": stage_peaks(run), "cl": {k: cl.get(k) for k in ("acc", "bwt", "fwt", "forgetting")},
            "cl_agnostic": {k: agnostic.get(k) for k in ("acc", "bwt", "fwt", "forgetting")},
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

                def asym(m: str, nums: dict = nums) -> float | None:
                    return nums[m]["asymptote"] if nums[m]["asymptote"] is not None else nums[m]["peak"]

                pooled["d_rl"].append(asym("fst") - asym("rl"))
                pooled["d_gepa"].append(asym("fst") - asym("gepa"))
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
                                for k in ("acc", "bwt", "fwt", "forgetting")} for m in METHODS},
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
    rho = {}
    for regime in regimes():
        pts = [p for p in points if p["regime"] == regime]
        for kl in ("kl_rev", "kl_fwd"):
            for y in ("plasticity_auc", "forgetting"):
                rho[f"{regime}/{kl}~{y}"] = spearman([p[kl] for p in pts], [p[y] for p in pts], nb)
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
    path.write_text("\n".join(L) + "\n")


def write_readme(claims: dict, frontier: dict, meta: dict, path: Path) -> None:
    s = claims["settings"]
    L = ["# Benchmarks: the drift-plasticity study", "",
         "Generated by `benchmarks/claims.py` from `results/claims.json` and `results/frontier.json`; do not edit.",
         "", f"Mode **{meta['mode']}**, seeds {claims['seeds']}, wall time {meta['wall_s'] / 60:.1f} min with "
         f"{meta['workers']} worker process(es) ({meta.get('cpus', '?')} CPUs visible). Every number is the mean "
         "over seeds with [min, max] and n; claims.json has each seed and a bootstrap 95% CI.", "",
         "Reproduce: `make bench-quick` (quick mode) or `make bench` (full mode).", "",
         *settings_section()]
    L += ["", "Regimes: **prompt**-dominant stream " + " -> ".join(claims["regimes"]["prompt"]["stream"])
          + f" (held-out probe task `{claims['regimes']['prompt']['heldout']}`); **weight**-dominant stream "
          + " -> ".join(claims["regimes"]["weight"]["stream"])
          + f" (probe `{claims['regimes']['weight']['heldout']}`). `fastslow world check` reports each task's regime.",
          "", "Verdict rules: sample efficiency reproduced when RL/FST slow-rollout ratio >= 1.4 and FST reaches RL's "
          "peak in >= 2/3 of task-seeds (partly: ratio > 1); KL reproduced at FST/RL <= 0.5 (partly < 1); "
          "asymptote reproduced when FST - RL has a bootstrap CI above 0 and FST > GEPA (partly: either mean > 0); "
          "plasticity reproduced when FST > RL and |base - FST| <= 0.05 (partly: FST > RL); stalling reproduced "
          "when FST gains more than RL within later stages and RL's later gain is under half its first-stage gain "
          "(partly: FST > RL); both channels reproduced when FST's trained+evolved beats both trained+seed and "
          "base+evolved (partly: one of them).", "", "## Verdicts", "", "| claim | regime | verdict | evidence |",
          "|---|---|---|---|"]
    for v in claims["verdicts"]:
        L.append(f"| {v['claim']} | {v['regime']} | **{v['verdict']}** | {v['evidence']} |")
    for regime, r in claims["regimes"].items():
        L += ["", f"## {regime}-dominant regime: single-task runs", "",
              "| task | method | peak | final | asymptote | KL(pi‖base) | KL(base‖pi) | entropy |",
              "|---|---|---|---|---|---|---|---|"]
        for task, t in r["single"].items():
            for m in METHODS:
                sm = t["summary"][m]
                L.append(f"| {task} | {m} | " + " | ".join(_fmt_spread(sm[k]) for k in
                         ("peak", "final", "asymptote", "kl_rev", "kl_fwd", "entropy")) + " |")
        a = r["aggregate"]["fst_vs_rl"]
        L += ["", "FST vs RL over tasks and seeds: sample-efficiency ratio (slow rollouts) "
              f"{_fmt_spread(a['ratio_slow'])},"
              f" counting fast rollouts {_fmt_spread(a['ratio_total'])}; FST reached RL's peak in "
              f"{a['reached_share']:.0%}; KL at matched reward FST/RL: reverse {_fmt_spread(a['kl_rev_ratio'])}, "
              f"forward {_fmt_spread(a['kl_fwd_ratio'])}.", "",
              f"### {regime}-dominant stream", "", "| method | ACC | BWT | forgetting | FWT | ACC (task-agnostic) | "
              "forgetting (task-agnostic) | final KL(pi‖base) | first-stage gain | later-stage gain |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        sa = r["stream_aggregate"]
        for m in METHODS:
            L.append(f"| {m} | " + " | ".join(_fmt_spread(sa["cl"][m][k]) for k in ("acc", "bwt", "forgetting", "fwt"))
                     + " | " + " | ".join(_fmt_spread(sa["cl_agnostic"][m][k]) for k in ("acc", "forgetting"))
                     + f" | {_fmt_spread(sa['kl_rev'][m])} | {_fmt_spread(sa['first_stage_gain'][m])} | "
                     f"{_fmt_spread(sa['later_stage_gain'][m])} |")
        L += ["", "| plasticity probe from | final | AUC |", "|---|---|---|"]
        for arm in ("base", *PROBED):
            L.append(f"| {arm} | {_fmt_spread(sa['plasticity_final'].get(arm))} | "
                     f"{_fmt_spread(sa['plasticity_auc'].get(arm))} |")
        at = sa["attribution_fst"]
        cells = ("base_seed", "base_evolved", "trained_seed", "trained_evolved")
        L += ["", "FST's channel attribution (mean over the stream's tasks): "
              + ", ".join(f"{c} {_fmt_spread(at[c])}" for c in cells) + "."]
    L += ["", "## The drift-plasticity frontier", "",
          f"One point per run: KL penalty {s['kl_coefs']} x {s['weights']} x rl/fst, plus the drift budget "
          f"(full weights, `slow.kl_target={s['kl_target']}`), seeds {claims['seeds']}, on each regime's stream.",
          "Plots: " + ", ".join(f"`results/frontier_{r}.png`" for r in claims["regimes"]) + ".", "",
          "| regime / pair | Spearman rho | bootstrap 95% CI | points |", "|---|---|---|---|"]
    for pair, v in frontier["spearman"].items():
        ci = "n/a" if not v["ci"] else f"[{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]"
        rho = "n/a" if v["rho"] is None else f"{v['rho']:.2f}"
        L.append(f"| {pair} | {rho} | {ci} | {v['n']} |")
    b = frontier["budget"]
    from fastslow.slow import KLController

    L += ["", f"The budget's controller (`KLController`) starts at 1/sqrt(2 x target) = "
          f"{KLController.default_init(b['target']):.2f} and updates after each drift measurement (every "
          f"{s['drift_every']} steps; gain 0.5, error clipped to +-{KLController.MAX_ERR:g} in log space), never "
          "lowering the coefficient while the KL still climbs under the budget at start-up."]
    L += ["", f"Drift budget {b['target']} nats/token: final KL / target {_fmt_spread(b['final_ratio'])}; "
          f"mean |log(KL/target)| over the second half {_fmt_spread(b['late_mean_abs_log_err'])}; "
          f"without a budget (kl 0, full) the final KL was {_fmt_spread(b['unbudgeted_final_kl'])}.", ""]
    path.write_text("\n".join(L) + "\n")


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
             "| | rl | gepa (frozen weights) | memory (frozen weights) | fst | fst+memory |",
             "|---|---|---|---|---|---|"]
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


# ---- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the <= 15 minute version (make bench-quick)")
    parser.add_argument("--root", type=Path, default=None, help="run dirs (default runs/bench[-quick])")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--analyse-only", action="store_true", help="skip training; analyse existing run dirs")
    parser.add_argument("--plan", action="store_true", help="only write README.md with the settings; run nothing")
    parser.add_argument("--demo", action="store_true",
                        help="only the project README's demo table (make bench-demo): the prompt stream's rl, gepa "
                        "and fst runs with the demo's settings (full mode) and their plasticity probes")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="with --demo: these seeds (comma-separated; default: full mode's seeds)")
    args = parser.parse_args(argv)
    if args.plan:
        write_plan_readme(HERE / "README.md")
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
    t0 = time.perf_counter()
    runs, probes = plan(s, root)
    atts = [{"run": j["cfg"]["out"], "tasks": regimes()[j["regime"]]["stream"], "n": s["attribution_n"],
             "max_new_tokens": s["max_new_tokens"], "seed": j["seed"]}
            for j in runs if is_main_stream(j) and j["method"] == "fst"]
    print(f"{mode}: {len(runs)} runs, {len(probes)} probes, {len(atts)} attributions -> {root}", flush=True)
    if not args.analyse_only:
        run_pool(train_job, runs, args.workers, "run")
        run_pool(probe_job, probes, args.workers, "probe")
        run_pool(attribution_job, atts, args.workers, "attribution")
    attributions = {a["run"]: json.loads((Path(a["run"]) / "attribution.json").read_text()) for a in atts
                    if (Path(a["run"]) / "attribution.json").exists()}
    claims, frontier = analyse(s, root, runs, probes, attributions)
    wall = time.perf_counter() - t0
    meta = {"mode": mode, "wall_s": wall, "workers": args.workers, "cpus": os.cpu_count()}
    if args.analyse_only:
        old = args.results / "claims.json"
        if old.exists():
            meta["wall_s"] = json.loads(old.read_text()).get("meta", {}).get("wall_s", wall)
    claims["meta"] = frontier["meta"] = meta
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "claims.json").write_text(json.dumps(claims, indent=1))
    (args.results / "frontier.json").write_text(json.dumps(frontier, indent=1))
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
