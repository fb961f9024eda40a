"""RL lift per micro task: a minimal CISPO-style loop from the seed prompt (stand-in until the engine exists).

Each step: 8 train problems x 8 rollouts sampled at temperature 1 under the task-agnostic seed
prompt, group-normalised advantages, a REINFORCE/CISPO token loss (on-policy, so the clipped IS
weight is 1), one AdamW step. Every ``--eval-every`` steps: greedy mean reward on eval problems
with the seed prompt. Prints one JSON line per task: reward curve, lift, seconds per step.

    .venv/bin/python benchmarks/world_rl_lift.py --tasks flip caesar --steps 150
    .venv/bin/python benchmarks/world_rl_lift.py --stream --steps 100   # RL-only forgetting on the stream
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch

from fastslow.world.check import MAX_NEW_TOKENS, chat_prompts, load_model, mean_reward
from fastslow.world.tasks import MICRO_TASKS, STREAM, micro_task


def rl_step(model: Any, tok: Any, optimizer: Any, task: Any, problems: list, group: int) -> dict[str, float]:
    """One slow step; returns reward mean and timings."""
    t0 = time.perf_counter()
    inputs = [p.prompt for p in problems for _ in range(group)]
    enc = tok(chat_prompts(tok, [task.seed_prompt] * len(inputs), inputs), return_tensors="pt", padding=True,
              add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t1 = time.perf_counter()
    prompt_len = enc["input_ids"].shape[1]
    completion = seqs[:, prompt_len:]
    # Completion mask: every token up to and including the first end token.
    is_eos = completion == tok.eos_token_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    comp_mask = (~after_eos).long()
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    rewards = torch.tensor([task.verify(p, c).reward for p, c in zip(
        [p for p in problems for _ in range(group)], texts, strict=False)])
    grouped = rewards.view(len(problems), group)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    mask = torch.cat([enc["attention_mask"], comp_mask], dim=1)
    positions = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    model.train()
    logits = model(input_ids=seqs, attention_mask=mask, position_ids=positions).logits[:, prompt_len - 1 : -1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    # CISPO: stop-gradient clipped IS weight x advantage x log-prob; on-policy the weight is exactly 1.
    weight = torch.exp(logp - logp.detach()).clamp(max=1.2).detach()
    loss = -(weight * adv.unsqueeze(1) * logp * comp_mask).sum() / comp_mask.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    t2 = time.perf_counter()
    return {"reward": rewards.mean().item(), "sample_s": t1 - t0, "update_s": t2 - t1}


def run_task(name: str, steps: int, lr: float, eval_every: int, n_eval: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    task = micro_task(name)
    model, tok = load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    train, evals = list(task.problems("train")), list(task.problems("eval"))[:n_eval]
    model.eval()
    curve = [(0, mean_reward(model, tok, task, task.seed_prompt, evals))]
    step_times, train_rewards = [], []
    for step in range(1, steps + 1):
        stats = rl_step(model, tok, optimizer, task, rng.sample(train, 8), group=8)
        step_times.append(stats["sample_s"] + stats["update_s"])
        train_rewards.append(stats["reward"])
        if step % eval_every == 0 or step == steps:
            model.eval()
            curve.append((step, mean_reward(model, tok, task, task.seed_prompt, evals)))
            recent = slice(-eval_every, None)
            print(f"{name} step {step} eval {curve[-1][1]:.3f} train {sum(train_rewards[recent]) / eval_every:.3f}"
                  f" {sum(step_times[recent]) / eval_every:.2f}s/step", flush=True)
    base = curve[0][1]
    best = max(r for _, r in curve)
    reach = next((s for s, r in curve if r - base >= 0.3), None)
    return {
        "task": name, "lr": lr, "steps": steps, "base": round(base, 4), "final": round(curve[-1][1], 4),
        "lift": round(curve[-1][1] - base, 4), "best_lift": round(best - base, 4), "steps_to_lift_0.3": reach,
        "s_per_step": round(sum(step_times) / len(step_times), 3), "curve": [(s, round(r, 4)) for s, r in curve],
    }


def run_stream(names: list[str], steps: int, lr: float, n_eval: int, seed: int) -> dict[str, Any]:
    """RL only, one model trained on the tasks in turn; R[i][j] = seed-prompt reward on task j after stage i.

    Shows the conflict between stream tasks: weights that absorb one task's convention lose the last one.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tasks = [micro_task(n) for n in names]
    model, tok = load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def evaluate() -> list[float]:
        model.eval()
        return [round(mean_reward(model, tok, t, t.seed_prompt, list(t.problems("eval"))[:n_eval]), 4) for t in tasks]

    matrix = [evaluate()]
    for task in tasks:
        train = list(task.problems("train"))
        for _ in range(steps):
            rl_step(model, tok, optimizer, task, rng.sample(train, 8), group=8)
        matrix.append(evaluate())
        print(f"after {task.name}: {matrix[-1]}", flush=True)
    return {"stream": names, "steps_per_task": steps, "lr": lr, "matrix_base_then_stages": matrix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=MICRO_TASKS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="train the STREAM tasks in turn, print R matrix")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.stream:
        print(json.dumps(run_stream(STREAM, args.steps, args.lr, args.n_eval, args.seed)), flush=True)
        return
    for name in args.tasks:
        print(json.dumps(run_task(name, args.steps, args.lr, args.eval_every, args.n_eval, args.seed)), flush=True)


if __name__ == "__main__":
    main()
