"""Load benchmark of `fastslow serve --learn`: simulated users on loopback, feedback from the task's verifier.

Starts the server (the real CLI, uvicorn) on a free 127.0.0.1 port with a fresh run dir, runs N concurrent users
with the official `openai` client (chat requests drawn from the served task's train split, temperature 1), and
each user posts the verifier's reward as feedback (with ``serve.score: verifier`` the server scores the answers
itself). Stops by itself: after --duration seconds once --min-promotions promotions happened (none for frozen-weight
methods), or at --max-duration, or after --max-requests requests.

Reports served reward over time (client-side verifier reward per window, and the gate's held-out reward per
version), versions promoted and rejected (with reasons), KL of the served version, p50/p99 latency of requests
that overlapped a weight swap and of those that did not, and failed requests. Writes --out (JSON).

    python benchmarks/serve_load.py --config configs/serve-demo.yaml --out benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --config configs/serve-memory.yaml --out benchmarks/results/serve_memory_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "serve-demo.yaml"))
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--duration", type=float, default=120.0, help="Least seconds of load.")
    ap.add_argument("--max-duration", type=float, default=240.0, help="Hard stop, promotions or not.")
    ap.add_argument("--min-promotions", type=int, default=3, help="(0 for a method without weight training)")
    ap.add_argument("--max-requests", type=int, default=20_000)
    ap.add_argument("--window", type=float, default=20.0, help="Seconds per served-reward window.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Config override for the server.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()

    from fastslow.config import load_config
    from fastslow.tasks import load_task

    cfg = load_config(args.config, args.sets)
    if cfg.method in ("gepa", "memory"):  # frozen weights: nothing is ever promoted
        args.min_promotions = 0
    task = load_task(cfg.stages[-1].task)
    problems = list(task.problems("train"))
    run_dir = Path(tempfile.mkdtemp(prefix="fastslow-serve-load-"))
    shutil.rmtree(run_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop(cfg.serve.api_key_env, None)
    cmd = [sys.executable, "-m", "fastslow.cli", "serve", args.config, "--out", str(run_dir), "--port", str(port),
           "--learn", *[x for s in args.sets for x in ("--set", s)]]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start (see {log.name})")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        result = drive(args, base, task, problems, run_dir, post=cfg.serve.score == "feedback")
        result["metrics"] = scrape(httpx.get(f"{base}/metrics", timeout=10).text)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    rows = read_rows(run_dir)
    summary = analyse(args, cfg, result, rows)
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    summary["server_command"] = " ".join(["fastslow", *cmd[3:]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(table(summary))
    shutil.rmtree(run_dir, ignore_errors=True)
    Path(log.name).unlink(missing_ok=True)
    return 0 if summary["failed_requests"] == 0 else 1


def scrape(text: str) -> dict[str, float]:
    """The server's own Prometheus counters the report quotes (samples without labels, and per-label feedback)."""
    keep = ("fastslow_serve_batch_size_sum", "fastslow_serve_batch_size_count", "fastslow_serve_kl_rev",
            "fastslow_serve_weights_version", "fastslow_serve_context_version", "fastslow_serve_feedback_total")
    found = {}
    for line in text.splitlines():
        if line.startswith(keep):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def drive(args, base: str, task, problems, run_dir: Path, post: bool = True) -> dict:
    """Run the users until the stop rule; returns per-request records. ``post``: users send the verifier's
    reward as feedback (``serve.score: verifier``: the server scores the answers itself)."""
    records: list[dict] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.time()

    def user(uid: int) -> None:
        rng = random.Random(f"{args.seed}-{uid}")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        http = httpx.Client(timeout=60)
        while not stop.is_set():
            problem = rng.choice(problems)
            start = time.time()
            try:
                r = client.chat.completions.create(model="fastslow", temperature=1.0,
                                                   messages=[{"role": "user", "content": problem.prompt}])
                end = time.time()
                reward = task.verify(problem, r.choices[0].message.content).reward
                ack = http.post(f"{base}/v1/feedback", json={"id": r.id, "reward": reward}) if post else None
                if ack is not None and ack.status_code != 200:
                    raise RuntimeError(f"feedback {ack.status_code}: {ack.text[:200]}")
            except Exception as exc:  # noqa: BLE001 - counted: the benchmark requires none
                with lock:
                    failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            with lock:
                records.append({"start": start, "end": end, "latency": end - start, "reward": reward,
                                "fingerprint": r.system_fingerprint})
                if len(records) >= args.max_requests:
                    stop.set()

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(args.users)]
    for t in threads:
        t.start()
    while not stop.is_set():
        time.sleep(1.0)
        elapsed = time.time() - t0
        promotions = sum(row.get("event") == "serve_promoted" for row in read_rows(run_dir))
        if (elapsed >= args.duration and promotions >= args.min_promotions) or elapsed >= args.max_duration:
            stop.set()
    for t in threads:
        t.join(180)
    return {"t0": t0, "t1": time.time(), "records": records, "failures": failures}


def analyse(args, cfg, result: dict, rows: list[dict]) -> dict:
    t0, records = result["t0"], result["records"]
    promoted = [r for r in rows if r.get("event") == "serve_promoted"]
    rejected = [r for r in rows if r.get("event") == "serve_rejected"]
    rounds = [r for r in rows if r.get("event") == "serve_fast_round"]
    contexts = [r for r in rounds if r.get("serve/context_changed")]
    swaps = [r["time"] for r in promoted]
    overlapped = [x for x in records if any(x["start"] <= s <= x["end"] for s in swaps)]
    clear = [x for x in records if not any(x["start"] <= s <= x["end"] for s in swaps)]
    windows = []
    n_windows = int((result["t1"] - t0) // args.window) + 1
    for i in range(n_windows):
        part = [x for x in records if t0 + i * args.window <= x["end"] < t0 + (i + 1) * args.window]
        if part:
            fps = sorted({x["fingerprint"] for x in part})
            windows.append({"from_s": i * args.window, "to_s": (i + 1) * args.window, "requests": len(part),
                            "reward": sum(x["reward"] for x in part) / len(part), "versions": fps})

    def ms(xs: list[dict], q: float) -> float | None:
        v = percentile([x["latency"] for x in xs], q)
        return None if v is None else round(1000 * v, 1)

    wall = result["t1"] - t0
    return {
        "users": args.users, "wall_s": round(wall, 1), "requests": len(records),
        "failed_requests": len(result["failures"]), "failures": result["failures"][:20],
        "throughput_rps": round(len(records) / wall, 2) if wall else None,
        "latency_ms": {"p50": ms(records, 50), "p99": ms(records, 99),
                       "p50_overlapping_swap": ms(overlapped, 50), "p99_overlapping_swap": ms(overlapped, 99),
                       "p50_no_swap": ms(clear, 50), "p99_no_swap": ms(clear, 99),
                       "requests_overlapping_swap": len(overlapped)},
        "served_reward_windows": windows,
        "promotions": [{"at_s": round(r["time"] - t0, 1), "version": r["serve/weights_version"],
                        "kl_rev": r["serve/candidate_kl"], "heldout_reward": r["serve/candidate_reward"],
                        "served_heldout_before": r["serve/served_reward"]} for r in promoted],
        "rejections": [{"at_s": round(r["time"] - t0, 1), "kl_rev": r["serve/candidate_kl"],
                        "heldout_reward": r["serve/candidate_reward"], "reason": r["reason"]} for r in rejected],
        "context_changes": [{"at_s": round(r["time"] - t0, 1), "version": r["serve/context_version"]}
                            for r in contexts],
        "fast_rounds": len(rounds),
        "memory": {k.removeprefix("fast/memory/"): rounds[-1][k] for k in
                   ("fast/memory/lessons", "fast/memory/cases", "fast/memory/round_errors")
                   if k in rounds[-1]} if rounds else None,
        "fast_round_s": {"mean": round(sum(r["serve/round_s"] for r in rounds) / len(rounds), 2),
                         "max": round(max(r["serve/round_s"] for r in rounds), 2)} if rounds else None,
        "final_kl_rev": promoted[-1]["serve/candidate_kl"] if promoted else 0.0,
        "server_metrics": result.get("metrics", {}),
        "mean_batch_size": round(result["metrics"]["fastslow_serve_batch_size_sum"]
                                 / max(result["metrics"]["fastslow_serve_batch_size_count"], 1), 2)
        if result.get("metrics", {}).get("fastslow_serve_batch_size_count") else None,
        "gate": {"max_kl": cfg.serve.max_kl, "max_regression": cfg.serve.max_regression},
        "train_steps": max((r.get("step", 0) for r in rows), default=0),
        "trained_rollouts": max((r.get("rollouts", 0) for r in rows), default=0),
        "fast_rollouts": max((r.get("fast_rollouts", 0) for r in rows), default=0),
        "machine": f"{os.cpu_count()} CPUs (shared with other jobs: timings are indicative)",
    }


def table(s: dict) -> str:
    lat = s["latency_ms"]
    lines = [
        f"{s['users']} users, {s['wall_s']} s, {s['requests']} requests ({s['throughput_rps']} req/s), "
        f"failed {s['failed_requests']}",
        "",
        "| | value |", "|---|---|",
        f"| promoted versions | {len(s['promotions'])} |",
        f"| rejected candidates | {len(s['rejections'])} |",
        f"| fast rounds (GEPA on the served weights and/or memory curation), seconds each: mean / max | "
        f"{s['fast_rounds']}: {(s['fast_round_s'] or {}).get('mean')} / {(s['fast_round_s'] or {}).get('max')} |",
        *([f"| memory after the last round | {s['memory']} |"] if s["memory"] else []),
        f"| fast-context changes (at s) | {len(s['context_changes'])} "
        f"({', '.join(str(c['at_s']) for c in s['context_changes'])}) |",
        f"| mean generation batch (server's histogram) | {s['mean_batch_size']} |",
        f"| KL(pi‖base) of the final served version | {s['final_kl_rev']:.4f} (gate max_kl {s['gate']['max_kl']}) |",
        f"| latency p50 / p99, all (ms) | {lat['p50']} / {lat['p99']} |",
        f"| latency p50 / p99, requests overlapping a swap (ms, n={lat['requests_overlapping_swap']}) | "
        f"{lat['p50_overlapping_swap']} / {lat['p99_overlapping_swap']} |",
        f"| latency p50 / p99, no swap (ms) | {lat['p50_no_swap']} / {lat['p99_no_swap']} |",
        f"| failed requests | {s['failed_requests']} |",
        "",
        "| window (s) | requests | served reward (verifier) | versions answering |", "|---|---|---|---|",
    ]
    lines += [f"| {w['from_s']:.0f}-{w['to_s']:.0f} | {w['requests']} | {w['reward']:.3f} | "
              f"{', '.join(w['versions'])} |" for w in s["served_reward_windows"]]
    lines += ["", "| event | at (s) | version | KL | held-out reward (before) | reason |", "|---|---|---|---|---|---|"]
    events = [(p["at_s"], f"| promoted | {p['at_s']} | w{p['version']} | {p['kl_rev']:.4f} | "
                          f"{p['heldout_reward']:.3f} ({p['served_heldout_before']:.3f}) | |") for p in s["promotions"]]
    events += [(r["at_s"], f"| rejected | {r['at_s']} | | {r['kl_rev']:.4f} | {r['heldout_reward']:.3f} | "
                           f"{r['reason']} |") for r in s["rejections"]]
    lines += [line for _, line in sorted(events)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
