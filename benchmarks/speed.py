"""Before/after speed of this checkout against another (e.g. main before the speed work), as interleaved ratios.

    python benchmarks/speed.py --base /tmp/speed-base/src [--reps 2] [--only sampling,smollm2,micro,demo]
    (make bench-speed BASE=/path/to/old/src)

Each measurement runs in a fresh process with PYTHONPATH pointing at one source tree, in the order
old, new, old, new, ... so that a shared machine's load falls on both alike; the figure reported for each
pair is new/old, and the median over pairs. Short settings that fit a shared 2-core machine:

- sampling: SmolLM2-135M + LoRA, one slow step's rows of configs/smollm2-cpu.yaml (4 problems x 4 rollouts,
  2 prompts, 32 new tokens, T=1): completion tokens per second of ``Policy.generate`` (each tree with its own
  thread defaults unless ``--same-threads``, as for the other parts);
- smollm2: ``fastslow run configs/smollm2-cpu.yaml`` (fst, then rl) for ``--steps`` steps with eval.n 8:
  wall of the command, FST/RL, peak RSS (timing.json); ``--smollm2-full``: the config as shipped (40 steps,
  eval.n 32, its checkpoints), about 35 minutes per old/new pair;
- micro: ``fastslow run configs/demo.yaml`` on one stage of ``--micro-steps`` steps: mean seconds per step;
- demo: ``fastslow demo --quick`` (``--demo-full``: ``make demo``'s settings): wall of the command, and whether
  every method's final rewards are the same in both trees; the new tree runs the old tree's methods (``--methods``)
  unless ``--demo-all-methods`` (the old code had fewer).

Writes benchmarks/results/speed.json (merged per part, so parts can run in separate commands) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NEW_SRC = ROOT / "src"
sys.path.insert(0, str(HERE))
from benchutil import put_section  # noqa: E402

SMOLLM = ROOT / "configs" / "smollm2-cpu.yaml"
DEMO = ROOT / "configs" / "demo.yaml"

SAMPLING_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from fastslow.config import load_config
from fastslow.policy import Policy
from fastslow.tasks import load_task
cfg = load_config(sys.argv[1], [])
policy = Policy.load(cfg.model)
task = load_task(cfg.stages[0].task)
b, g, k = cfg.slow.batch_problems, cfg.slow.group_size, cfg.fast.population
contexts = [task.seed_prompt] + [task.seed_prompt + " Think step by step, then give the number."] * (k - 1)
problems = list(task.problems("train"))[:b]
prompts = [policy.format(contexts[i * k // g], p.prompt) for p in problems for i in range(g)]
policy.generate(prompts[:2], temperature=1.0, max_new_tokens=2, seed=0)  # warm-up
t0 = time.perf_counter()
batch = policy.generate(prompts, temperature=1.0, max_new_tokens=cfg.slow.max_new_tokens, seed=1)
s = time.perf_counter() - t0
tokens = int(batch.completion_mask.sum())
print(json.dumps({"seconds": s, "tokens": tokens, "tokens_per_s": tokens / s, "texts": batch.texts}))
"""


SAME_THREADS = False  # --same-threads: both trees get passive waiting and one thread per usable CPU


def env_for(src: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)
    if SAME_THREADS:
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(len(os.sched_getaffinity(0))))
    return env


def run_cli(src: Path, config: Path, sets: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fastslow.cli", "run", str(config), "--out", str(out), "--force"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env_for(src), cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    timing = json.loads((out / "timing.json").read_text())
    return {"wall_s": wall, "mean_step_s": timing["mean_step_s"], "peak_rss_mb": timing["peak_rss_mb"],
            "total_s": timing["total_s"]}


def measure(part: str, src: Path, args: argparse.Namespace, tmp: Path) -> dict:
    if part == "sampling":
        # --same-threads: passive waiting for both (the old code's decoding then wakes sleeping threads per kernel);
        # by default each tree with its own (the old one spins, which a quiet machine favours)
        env = env_for(src)
        done = subprocess.run([sys.executable, "-c", SAMPLING_CHILD, str(SMOLLM), str(len(os.sched_getaffinity(0)))],
                              env=env, cwd=ROOT,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"sampling failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    if part == "smollm2":
        sets = [] if args.smollm2_full else [f"stages.0.steps={args.steps}", "eval.n=8", "checkpoint_every=1000"]
        fst = run_cli(src, SMOLLM, sets, tmp / "fst")
        rl = run_cli(src, SMOLLM, [*sets, "method=rl"], tmp / "rl")
        return {"fst": fst, "rl": rl, "fst_over_rl": fst["wall_s"] / rl["wall_s"]}
    if part == "micro":
        sets = [f"stages=[{{task: micro/flip, steps: {args.micro_steps}}}]", "eval.n=32",
                f"fast.every={args.micro_steps}", f"eval.every={args.micro_steps}", f"drift.every={args.micro_steps}"]
        own = src.parent / "configs" / DEMO.name  # the tree's own demo config: older trees reject newer fields
        return run_cli(src, own if own.exists() else DEMO, sets, tmp / "micro")
    if part == "demo":
        cmd = [sys.executable, "-m", "fastslow.cli", "demo", "--out", str(tmp / "demo")]
        cmd += [] if args.demo_full else ["--quick"]
        cmd += ["--methods", args.demo_methods] if src == NEW_SRC and args.demo_methods else []
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env_for(src), cwd=ROOT, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
        finals = {run.parent.name: json.loads(run.read_text())["final"]
                  for run in sorted((tmp / "demo").glob("*/summary.json"))}
        return {"wall_s": wall, "finals": finals}
    raise SystemExit(f"unknown part {part!r}")


def demo_methods(src: Path) -> str:
    """The methods ``fastslow demo`` of the tree at ``src`` runs, comma-separated."""
    done = subprocess.run([sys.executable, "-c", "from fastslow.demo import METHODS; print(','.join(METHODS))"],
                          env=env_for(src), cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--base {src}: cannot read its demo's methods: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def shim_entry_points(src: Path) -> None:
    """An empty module for each plug-in entry point of the installed fastslow that the old tree lacks (older
    trees registered those parts themselves): without it the old code stops at loading plug-ins."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="fastslow.plugins"):
        parts = ep.value.split(".")
        if (src.joinpath(*parts).with_suffix(".py").exists() or (src.joinpath(*parts) / "__init__.py").exists()
                or not src.joinpath(*parts[:-1]).is_dir()):
            continue
        path = src.joinpath(*parts).with_suffix(".py")
        path.write_text('"""Empty: the installed entry points name this module (written by benchmarks/speed.py)."""\n')
        print(f"old tree: wrote empty {path} (named by an installed entry point)", file=sys.stderr)


def ratios(pairs: list[tuple[dict, dict]], key) -> dict:
    r = [key(new) / key(old) for old, new in pairs]
    return {"old": [key(old) for old, _ in pairs], "new": [key(new) for _, new in pairs], "new_over_old": r,
            "median": statistics.median(r)}


def rewards(final: dict) -> dict:
    """A run's final eval reward per task (newer trees add other figures beside it)."""
    return {task: v["reward"] for task, v in final.items()}


def summarise(part: str, pairs: list[tuple[dict, dict]]) -> dict:
    if part == "sampling":
        same = [old["texts"] == new["texts"] for old, new in pairs]
        return {"tokens_per_s": ratios(pairs, lambda m: m["tokens_per_s"]), "same_texts": same}
    if part == "smollm2":
        return {"fst_wall_s": ratios(pairs, lambda m: m["fst"]["wall_s"]),
                "rl_wall_s": ratios(pairs, lambda m: m["rl"]["wall_s"]),
                "fst_over_rl": ratios(pairs, lambda m: m["fst_over_rl"]),
                "fst_peak_rss_mb": ratios(pairs, lambda m: m["fst"]["peak_rss_mb"]),
                "rl_peak_rss_mb": ratios(pairs, lambda m: m["rl"]["peak_rss_mb"])}
    if part == "demo":
        # per method both trees run (older trees ran fewer): are its final rewards the same?
        return {"wall_s": ratios(pairs, lambda m: m["wall_s"]),
                "same_results": [{m: rewards(o["finals"][m]) == rewards(n["finals"][m])
                                  for m in sorted(o["finals"].keys() & n["finals"].keys())} for o, n in pairs],
                "methods": {"old": sorted(pairs[0][0]["finals"]), "new": sorted(pairs[0][1]["finals"])}}
    return {"mean_step_s": ratios(pairs, lambda m: m["mean_step_s"]), "wall_s": ratios(pairs, lambda m: m["wall_s"])}


def readme_block(result: dict) -> str:
    """The before/after table for benchmarks/README.md."""
    rows = [("sampling tokens/s (SmolLM2, 16 rows x 32)", "sampling", "tokens_per_s"),
            ("SmolLM2 fst wall (s)", "smollm2", "fst_wall_s"), ("SmolLM2 rl wall (s)", "smollm2", "rl_wall_s"),
            ("SmolLM2 fst / rl", "smollm2", "fst_over_rl"), ("SmolLM2 fst peak RSS (MB)", "smollm2", "fst_peak_rss_mb"),
            ("SmolLM2 rl peak RSS (MB)", "smollm2", "rl_peak_rss_mb"),
            ("micro demo config, s per step", "micro", "mean_step_s"), ("micro demo wall (s)", "demo", "wall_s")]
    lines = ["<!-- speed:start -->", "## Speed before/after", "",
             "`make bench-speed BASE=<old src>`: each figure measured in fresh processes, old and new interleaved "
             "(old, new, old, new); new/old per pair and its median. The machine is shared, so single figures move "
             "with its load; the ratios of neighbouring runs are the comparison.", "",
             "| measure | old | new | new/old (median) | settings |", "|---|---|---|---|---|"]
    for label, part, key in rows:
        for variant in (part, f"{part}-same-threads", f"{part}-full", f"{part}-all-methods",
                        f"{part}-full-all-methods"):
            if variant not in result:
                continue
            r, st = result[variant]["summary"][key], result[variant]["settings"]
            where = {"sampling": "one generate call",
                     "smollm2": "the config as shipped (40 steps, eval.n 32)" if st.get("smollm2_full")
                     else f"{st['steps']} steps, eval.n 8",
                     "micro": f"{st['micro_steps']} steps"}
            if part == "demo":
                summary = result[variant]["summary"]
                where["demo"] = ("`make demo`" if st.get("demo_full") else "`fastslow demo --quick`") + (
                    f"; methods old {'/'.join(summary['methods']['old'])}, new {'/'.join(summary['methods']['new'])}"
                    f"; same final rewards: {summary['same_results'][0]}")
            threads = "; both with passive waiting, 1 thread/CPU"
            if not st.get("same_threads"):
                threads = "; each with its own thread defaults"
            old, new = (", ".join(f"{v:.4g}" for v in r[arm]) for arm in ("old", "new"))
            lines.append(f"| {label} | {old} | {new} | **{r['median']:.2f}** | {where[part]}{threads} "
                         f"({result[variant]['date']}) |")
    return "\n".join([*lines, "<!-- speed:end -->"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the old code's src/ (e.g. a worktree of main)")
    ap.add_argument("--reps", type=int, default=2, help="old/new pairs per part")
    ap.add_argument("--only", default="sampling,smollm2,micro,demo")
    ap.add_argument("--steps", type=int, default=3, help="SmolLM2 run length")
    ap.add_argument("--micro-steps", type=int, default=10)
    ap.add_argument("--demo-full", action="store_true", help="demo part: make demo's settings, not --quick")
    ap.add_argument("--demo-all-methods", action="store_true",
                    help="demo part: the new tree runs all its methods, not only those the old tree has")
    ap.add_argument("--smollm2-full", action="store_true",
                    help="smollm2 part: configs/smollm2-cpu.yaml as shipped, not --steps steps with eval.n 8")
    ap.add_argument("--same-threads", action="store_true",
                    help="give the old code this checkout's thread defaults (passive waiting, one thread per CPU): "
                    "measures the other changes alone")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speed.json")
    ap.add_argument("--readme", default=str(HERE / "README.md"), help="where the table goes ('' for nowhere)")
    args = ap.parse_args(argv)
    if not (args.base / "fastslow" / "__init__.py").is_file():  # else the installed fastslow stands in: new vs new
        ap.error(f"--base {args.base}: no fastslow package there (give the old checkout's src/)")
    global SAME_THREADS
    SAME_THREADS = args.same_threads
    shim_entry_points(args.base)
    args.demo_methods = None if args.demo_all_methods else demo_methods(args.base)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    for part in args.only.split(","):
        pairs = []
        for rep in range(args.reps):
            row = {}
            for arm, src in (("old", args.base), ("new", NEW_SRC)):
                with tempfile.TemporaryDirectory(prefix=f"speed-{part}-{arm}-") as tmp:
                    row[arm] = measure(part, src, args, Path(tmp))
                print(f"{part} rep {rep} {arm}: {json.dumps({k: v for k, v in row[arm].items() if k != 'texts'})}",
                      file=sys.stderr, flush=True)
            pairs.append((row["old"], row["new"]))
        part_key = f"{part}-same-threads" if args.same_threads else part
        part_key += "-full" if (part == "demo" and args.demo_full) or (part == "smollm2" and args.smollm2_full) else ""
        part_key += "-all-methods" if part == "demo" and args.demo_all_methods else ""
        result[part_key] = {"summary": summarise(part, pairs), "load_after": os.getloadavg()[0],
                        "settings": {"reps": args.reps, "steps": args.steps, "micro_steps": args.micro_steps,
                                     "same_threads": args.same_threads, "demo_full": args.demo_full,
                                     "smollm2_full": args.smollm2_full},
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps({part_key: result[part_key]["summary"]}, indent=1), flush=True)
    if args.readme:
        put_section(Path(args.readme), readme_block(result), "speed")


if __name__ == "__main__":
    main()
