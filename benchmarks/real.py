"""The study on a real model: SmolLM2-135M-Instruct, offline, on a stream of three reasoning-gym datasets.

    python benchmarks/real.py select [--n N] [--limit K]   # pre-registered dataset selection (protocol.yaml: real)
    python benchmarks/real.py plan                         # the runs, probes and an estimate of their cost
    python benchmarks/real.py run [--workers W]            # make bench-real: run (resumable, run by run) + analyse
    python benchmarks/real.py analyse                      # verdicts from the finished run dirs

Everything (model, candidates, selection rule, settings, methods, seeds, verdict rules) is in
benchmarks/protocol.yaml under ``real``; nothing here is tuned after seeing results. The selection scores each
candidate with the base model and its task's seed prompt on *train* problems (never the eval split the study
reports), greedy, and keeps the first ``stream_len`` candidates whose reward lies in [min_base, max_base], in the
protocol's order; the next qualifying one is the held-out plasticity task. The stream runs are the study: the
first stage of each stream is that task's single-task run (sample efficiency, KL at matched reward, asymptote),
the whole stream gives forgetting and the stall claim, probes from its weights give plasticity, FST's weights and
prompts give the 2x2. Run dirs live under runs/bench-real/; a finished run made under the same protocol hash is
reused, so an interrupted study resumes where it stopped. Writes results/real_selection.json and
results/real_claims.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import claims as study  # noqa: E402 - the same protocol, statistics and verdicts as the micro study

RESULTS = HERE / "results"
ROOT = Path("runs") / "bench-real"
REAL: dict[str, Any] = study.PROTOCOL["real"]
# Method names -> (loop method, fast.kind), as in claims.run_config and the demo: fst+memory is the weights plus
# the experience memory (no prompt population). Memory methods are planned only when the config schema knows them.
METHOD_CONFIG = {"rl": ("rl", None), "gepa": ("gepa", None), "fst": ("fst", None), "memory": ("memory", None),
                 "fst+memory": ("fst", "memory")}


def spec(candidate: str, **options: int) -> str:
    """A candidate's task spec with split sizes added."""
    extra = "&".join(f"{k}={v}" for k, v in options.items())
    return candidate + ("&" if "?" in candidate else "?") + extra


# ---- selection ------------------------------------------------------------------------------------------
def select(n: int | None = None, limit: int | None = None, out: Path = RESULTS / "real_selection.json") -> dict:
    """Score the candidates in order (base model, seed prompt, greedy, train problems) and apply the rule."""
    import torch

    from fastslow.config import ModelConfig
    from fastslow.errors import load_policy
    from fastslow.rollout import PolicySampler
    from fastslow.tasks import load_task

    rule = REAL["select"]
    n = n or rule["select_n"]
    torch.set_num_threads(REAL["threads"])
    policy = load_policy(ModelConfig(path=REAL["model"]))
    sample = PolicySampler(policy)
    rows, t0 = [], time.perf_counter()
    for cand in REAL["select"]["candidates"][:limit]:
        t1 = time.perf_counter()
        try:
            task = load_task(spec(cand, train=REAL["train"], eval=REAL["eval_n"]))
        except Exception as exc:  # noqa: BLE001 - a candidate this reasoning-gym lacks is recorded, not fatal
            rows.append({"candidate": cand, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        problems = list(task.problems("train"))[:n]
        t2 = time.perf_counter()
        scored = sample(task, [(task.seed_prompt, p) for p in problems], temperature=0.0,
                        max_new_tokens=REAL["max_new_tokens"], seed=0)
        sampling = time.perf_counter() - t2
        reward = sum(scored.rewards) / len(problems)
        ok = rule["min_base"] <= reward <= rule["max_base"]
        rows.append({"candidate": cand, "task": task.name, "reward": reward, "n": len(problems), "qualifies": ok,
                     "seconds": time.perf_counter() - t1, "sampling_s": sampling, "rollouts": len(problems)})
        print(f"  {cand}: base reward {reward:.3f} on {len(problems)} train problems "
              f"({'qualifies' if ok else 'out of range'}; {time.perf_counter() - t1:.0f} s)", flush=True)
        if sum(bool(r.get("qualifies")) for r in rows) >= rule["stream_len"] + rule["heldout"]:
            break  # the rule takes qualifying candidates in order: later ones cannot change the selection
    qualified = [r["candidate"] for r in rows if r.get("qualifies")]
    need = rule["stream_len"] + rule["heldout"]
    result = {"protocol": study.protocol_sha256(), "rule": {k: rule[k] for k in ("min_base", "max_base",
                                                                                  "stream_len", "heldout")},
              "n": n, "candidates_scored": len(rows), "candidates_total": len(rule["candidates"]), "scores": rows,
              "stream": qualified[: rule["stream_len"]], "heldout": qualified[rule["stream_len"]: need][:1] or None,
              "complete": len(qualified) >= need and n >= rule["select_n"],  # in order: a --limit past them is moot
              "seconds": time.perf_counter() - t0,  # sampling only below: model and dataset loading excluded
              "seconds_per_rollout": sum(r.get("sampling_s", 0) for r in rows) / max(sum(r.get("rollouts", 0)
                                                                                         for r in rows), 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


# ---- plan -----------------------------------------------------------------------------------------------
def method_entry(name: str) -> dict | None:
    """The config fields of a method name, or None when this build's config does not know it."""
    from fastslow.config import ConfigError, config_from_dict

    method, kind = METHOD_CONFIG.get(name, (name, None))
    probe = {"method": method, "model": {"path": "micro"}, "stages": [{"task": "micro/flip", "steps": 1}]}
    if kind:
        probe["fast"] = {"kind": kind}
    try:
        config_from_dict(probe)
    except (ConfigError, ValueError):
        return None
    return {"method": method, **({"fast_kind": kind} if kind else {})}


def run_config(name: str, stream: list[str], seed: int, out: Path) -> dict:
    r, entry = REAL, method_entry(name)
    fast = {"every": r["fast_every"], "population": r["population"], "budget": r["fast_budget"],
            "val_size": r["val_size"], "minibatch": r["minibatch"], "reflector": r["reflector"]}
    if entry.get("fast_kind"):
        fast["kind"] = entry["fast_kind"]
    return {
        "method": entry["method"],
        "model": {"path": r["model"], "lora": r["lora"]},
        "stages": [{"task": spec(t, train=r["train"], eval=r["eval_n"]), "steps": r["stage_steps"]} for t in stream],
        "slow": {"batch_problems": r["batch_problems"], "group_size": r["group_size"], "lr": r["lr"],
                 "warmup_steps": r["warmup_steps"], "max_new_tokens": r["max_new_tokens"],
                 "temperature": r["temperature"]},
        "fast": fast,
        "drift": {"every": r["drift_every"], "probe_size": r["probe_size"], "max_new_tokens": r["max_new_tokens"]},
        "eval": {"every": r["eval_every"], "n": r["eval_n"]},
        "checkpoint_every": r["eval_every"],  # resumable inside a run too
        "keep_checkpoints": 1,
        "threads": r["threads"],
        "seed": seed,
        "out": str(out),
    }


def plan(selection: dict, root: Path = ROOT) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """(runs, probes, attributions, skipped method names) in the micro study's job format (claims.py)."""
    sha = study.protocol_sha256()
    stream, heldout = selection["stream"], (selection.get("heldout") or [None])[0]
    names = [m for m in REAL["methods"] if method_entry(m)]
    skipped = [m for m in REAL.get("optional_methods", []) if not method_entry(m)]
    names += [m for m in REAL.get("optional_methods", []) if method_entry(m)]
    runs, probes, atts = [], [], []
    for seed in REAL["seeds"]:
        dirs = {}
        for name in names:
            out = root / "real" / "stream" / f"{name}-full-kl0-s{seed}"
            dirs[name] = out
            runs.append({"kind": "stream", "regime": "real", "method": name, "seed": seed, "protocol": sha,
                         "cfg": run_config(name, stream, seed, out)})
        if heldout:
            template = run_config("rl", [heldout], seed, root / "unused")
            template["stages"][0]["steps"] = REAL["probe_steps"]
            template["slow"]["lr"] = REAL["probe_lr"]
            template["eval"]["every"] = REAL["probe_eval_every"]
            for arm, start in [("base", "base")] + [(m, str(dirs[m])) for m in ("rl", "fst") if m in dirs]:
                probes.append({"regime": "real", "seed": seed, "arm": arm, "start": start, "weights": "lora"
                               if arm != "base" else None, "task": template["stages"][0]["task"],
                               "template": template, "protocol": sha, "model": REAL["model"],
                               "out": str(root / "real" / "probes" / f"{arm}-s{seed}")})
        if "fst" in dirs:
            atts.append({"run": str(dirs["fst"]), "specs": [spec(t, train=REAL["train"], eval=REAL["eval_n"])
                                                            for t in stream],
                         "n": REAL["attribution_n"], "max_new_tokens": REAL["max_new_tokens"], "seed": seed,
                         "protocol": sha, "model": REAL["model"], "lora": REAL["lora"]})
    return runs, probes, atts, skipped


def cost(runs: list[dict], probes: list[dict], atts: list[dict], s_per_rollout: float | None) -> dict:
    """Rollouts the plan samples (training, fast rounds, evals, drift probes) and a time estimate."""
    r = REAL
    total = 0
    for j in runs:
        stages, steps = len(j["cfg"]["stages"]), r["stage_steps"] * len(j["cfg"]["stages"])
        slow = steps * r["batch_problems"] * r["group_size"] if j["cfg"]["method"] != "gepa" else 0
        rounds = stages * -(-r["stage_steps"] // r["fast_every"]) if j["cfg"]["method"] != "rl" else 0
        prompts = 1 if j["cfg"]["method"] == "rl" else 2  # seed and best prompt (rl: the same one, scored once)
        evals = (steps // r["eval_every"] + 1) * stages * r["eval_n"] * prompts
        drift = (steps // r["drift_every"] + 1) * stages * r["probe_size"] * 2
        total += slow + rounds * r["fast_budget"] + evals + drift
    for _ in probes:
        total += r["probe_steps"] * r["batch_problems"] * r["group_size"] + (
            r["probe_steps"] // r["probe_eval_every"] + 1) * r["eval_n"] * 2
    total += len(atts) * 4 * r["attribution_n"] * 3
    hours = None if not s_per_rollout else total * s_per_rollout / 3600
    return {"rollouts": total, "seconds_per_rollout": s_per_rollout, "hours_one_worker": hours}


# ---- workers ----------------------------------------------------------------------------------------------
def probe_job(job: dict) -> dict:
    from fastslow.config import config_from_dict
    from fastslow.loop import train
    from fastslow.probes import plasticity_probe

    out = Path(job["out"])
    result_path = out.parent / f"{out.name}.json"
    if (cached := study._cached(result_path, job["protocol"])) is not None:
        return cached
    start = job["start"]
    if job["weights"] == "lora":
        start = str(study.merged_weights(Path(start), REAL["lora"], model=job["model"]))
    template = config_from_dict({**job["template"], "model": {"path": job["model"]}})
    result = plasticity_probe(start, job["task"], template.stages[0].steps, template, out,
                              run=lambda cfg, **kw: train(cfg, log=study._quiet, **kw))
    result = {**{k: result[k] for k in ("final", "auc", "curve")}, "protocol": job["protocol"]}
    result_path.write_text(json.dumps(result))
    return result


def attribution_job(job: dict) -> dict:
    from fastslow.config import ModelConfig
    from fastslow.probes import channel_attribution
    from fastslow.tasks import load_task

    path = Path(job["run"]) / "attribution.json"
    if (cached := study._cached(path, job["protocol"])) is not None:
        return {k: v for k, v in cached.items() if k != "protocol"}
    tasks = {t.name: t for t in (load_task(s) for s in job["specs"])}
    result = channel_attribution(job["run"], ModelConfig(path=job["model"], lora=job["lora"]), tasks, n=job["n"],
                                 max_new_tokens=job["max_new_tokens"], seed=job["seed"])
    path.write_text(json.dumps({**result, "protocol": job["protocol"]}))
    return result


# ---- analysis ---------------------------------------------------------------------------------------------
def first_stage(run):
    """The stream run cut to its first stage and first task: that task's single-task run."""
    from fastslow.analysis import Run

    st = (run.summary.get("stages") or [])[:1]
    if not st:
        return run
    task, end = st[0]["task"], st[0]["steps"]
    keep = f"eval/{task}/"
    rows = [{k: v for k, v in r.items() if not k.startswith("eval/") or k.startswith(keep)}
            for r in run.rows if (r.get("step") or 0) <= end]
    return Run(path=run.path, summary={**run.summary, "stages": st, "tasks": [task], "final": {}}, rows=rows)


def analyse(selection: dict, runs: list[dict], probes: list[dict], atts: list[dict]) -> dict:
    from fastslow.analysis import load_run

    sha = study.protocol_sha256()
    done = [j for j in runs if study._finished_with(Path(j["cfg"]["out"]), study.config_dump(j["cfg"]), sha)]
    loaded = {j["cfg"]["out"]: load_run(j["cfg"]["out"]) for j in done}
    probe_res = study.load_probes(probes)
    attributions = {a["run"]: {k: v for k, v in json.loads((Path(a["run"]) / "attribution.json").read_text()).items()
                               if k != "protocol"} for a in atts if (Path(a["run"]) / "attribution.json").exists()}
    task = selection["stream"][0].split(":", 1)[1].split("?", 1)[0]
    per_seed = {}
    for seed in REAL["seeds"]:
        got = {j["method"]: first_stage(loaded[j["cfg"]["out"]]) for j in done if j["seed"] == seed}
        if not {"rl", "gepa", "fst"} <= set(got):
            continue
        per_seed[str(seed)] = {"methods": {m: study.run_numbers(got[m]) for m in ("rl", "gepa", "fst")},
                               "fst_vs_rl": study.single_numbers(got["rl"], got["fst"])}
    settings = {"single_steps": REAL["stage_steps"], "eval_every": REAL["eval_every"], "bootstrap": 2000}
    regime = {"stream": selection["stream"], "heldout": selection.get("heldout"),
              "single": {task: {"seeds": per_seed}},
              "stream_runs": study.stream_entries("real", done, loaded, probe_res, attributions),
              "base_plasticity": {str(sd): probe_res.get(("real", sd, "base")) for sd in REAL["seeds"]}}
    claims = {"seeds": REAL["seeds"], "settings": settings, "regimes": {"real": regime},
              "protocol": {"file": "benchmarks/protocol.yaml", "sha256": sha},
              "finished_runs": len(done), "planned_runs": len(runs)}
    claims["verdicts"] = study.verdicts(claims)
    return claims


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("select", "plan", "run", "analyse"))
    parser.add_argument("--n", type=int, default=None, help="select: problems per candidate (protocol: select_n)")
    parser.add_argument("--limit", type=int, default=None, help="select: only the first K candidates (a check)")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--workers", type=int, default=1, help="run: parallel runs (each uses `threads` cores)")
    args = parser.parse_args(argv)
    sel_path = RESULTS / "real_selection.json"
    if args.command == "select":
        sel = select(args.n, args.limit)
        print(json.dumps({k: sel[k] for k in ("stream", "heldout", "complete", "seconds_per_rollout")}))
        return
    if not sel_path.exists():
        raise SystemExit(f"{sel_path}: no selection yet; run `python benchmarks/real.py select` first")
    sel = json.loads(sel_path.read_text())
    if sel["protocol"] != study.protocol_sha256() or not sel["complete"]:
        raise SystemExit(f"{sel_path} was made under another protocol or is a partial check (--n/--limit): "
                         "run `python benchmarks/real.py select` again")
    runs, probes, atts, skipped = plan(sel, args.root)
    if args.command == "plan":
        print(json.dumps({"runs": [j["cfg"]["out"] for j in runs], "probes": [p["out"] for p in probes],
                          "attributions": len(atts), "methods_not_in_this_build": skipped,
                          "cost": cost(runs, probes, atts, sel.get("seconds_per_rollout"))}, indent=1))
        return
    if args.command == "run":
        study.preregister(args.root, "real", study.protocol_sha256())
        study.run_pool(study.train_job, runs, args.workers, "run")
        study.run_pool(probe_job, probes, args.workers, "probe")
        study.run_pool(attribution_job, atts, args.workers, "attribution")
    claims = analyse(sel, runs, probes, atts)
    (RESULTS / "real_claims.json").write_text(json.dumps(claims, indent=1))
    for v in claims["verdicts"]:
        print(f"{v['claim']:48} {v['verdict']:12} {v['evidence']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
