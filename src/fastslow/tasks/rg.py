"""``rg:<dataset>[?key=value&...]``: any procedural dataset of reasoning-gym as a task.

Options (the rest are passed to the dataset's own config, e.g. ``rg:basic_arithmetic?max_terms=2&max_digits=1``;
lists are comma-separated, ``operators=+,-``):

- ``train`` (default 512) / ``eval`` (default 64): split sizes. One seeded dataset of ``train + eval`` items is
  drawn and split; eval questions are removed from train so a split never leaks into the other;
- ``seed`` (default 0): the dataset seed (an integer; split sizes are at most :data:`MAX_SPLIT`);
- ``max_new_tokens`` (default 32): the completion budget ``fastslow eval`` uses for this task;
- ``extract`` (default ``answer``): how the answer is read from the completion (see :mod:`fastslow.tasks.extract`).

The reward is the dataset's own ``score_answer``; the feedback states the expected answer and the answer format.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastslow.tasks import Problem, Split, TaskError, Verdict
from fastslow.tasks.extract import check_kind, extract

FORMAT_RULE = "Put the final answer alone inside <answer></answer> tags: <answer>42</answer>."


def _value(raw: str):
    if "," in raw and not raw.lstrip().startswith("["):
        return [_value(part) for part in raw.split(",")]
    for parse in (int, float):
        try:
            return parse(raw)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(raw.lower(), raw)  # anything else: a string (+, -)


def parse_spec(rest: str) -> tuple[str, dict]:
    """``basic_arithmetic?max_terms=2`` -> (``basic_arithmetic``, {``max_terms``: 2})."""
    name, _, query = rest.partition("?")
    if not name:
        raise TaskError("rg:<dataset>: a dataset name is needed, e.g. rg:basic_arithmetic")
    options = {}
    for pair in filter(None, query.split("&")):
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise TaskError(f"rg:{rest}: expected key=value, got {pair!r}")
        options[unquote(key)] = _value(unquote(raw))  # not unquote_plus: '+' is an operator here
    return name, options


class ReasoningGymTask:
    """A reasoning-gym dataset with seeded train/eval splits; ``Problem.meta['entry']`` is the dataset's item."""

    def __init__(self, dataset: str, *, train: int = 512, eval: int = 64, seed: int = 0, extract: str = "answer",
                 max_new_tokens: int = 32, **config) -> None:
        import reasoning_gym

        # `fastslow eval`'s default completion budget for this task (the shipped smollm2 config's 32)
        self.max_new_tokens = max_new_tokens

        try:
            self.extract = check_kind(extract)
        except ValueError as exc:
            raise TaskError(f"rg:{dataset}: {exc}") from None
        if train < 1 or eval < 1:
            raise TaskError(f"rg:{dataset}: train and eval sizes must be positive")
        try:
            self._data = reasoning_gym.create_dataset(dataset, size=train + eval, seed=seed, **config)
        except Exception as exc:  # noqa: BLE001 - unknown dataset or option: reasoning-gym's own words, one line
            from fastslow.util import one_line

            raise TaskError(f"rg:{dataset}: {type(exc).__name__}: {one_line(exc)}") from None
        self.name = dataset
        self.seed_prompt = f"Solve the problem. {FORMAT_RULE}"
        items = [self._data[i] for i in range(train + eval)]
        problems = [Problem(f"{dataset}-{i}", str(e["question"]), str(e["answer"]), {"entry": e})
                    for i, e in enumerate(items)]
        held_out = problems[train:]
        seen = {p.prompt for p in held_out}
        self._split = {"train": [p for p in problems[:train] if p.prompt not in seen], "eval": held_out}
        if not self._split["train"]:
            raise TaskError(f"rg:{dataset}: every train item is also in eval: ask for more items or a wider config")

    def problems(self, split: Split) -> list[Problem]:
        return self._split[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        got = extract(completion, self.extract)
        reward = float(self._data.score_answer(got, problem.meta["entry"]))
        if reward >= 1.0:
            return Verdict(1.0, f"Correct: {got!r}.")
        if got is None or (self.extract == "answer" and "<answer>" not in completion):
            return Verdict(reward, f"No <answer> tag; read {got!r}. Expected answer: {problem.answer}\n{FORMAT_RULE}")
        return Verdict(reward, f"Answer {got!r} is wrong. Expected answer: {problem.answer}")


MAX_SPLIT = 100_000  # items per split: beyond this a dataset is drawn for minutes and fills memory


def rg_task(rest: str) -> ReasoningGymTask:
    name, options = parse_spec(rest)
    sizes = {k: options.pop(k) for k in ("train", "eval", "seed", "extract", "max_new_tokens") if k in options}
    for key in ("train", "eval", "seed", "max_new_tokens"):
        value = sizes.get(key)
        if key in sizes and (not isinstance(value, int) or isinstance(value, bool)):
            raise TaskError(f"rg:{name}: {key} must be an integer, got {str(value)[:40]!r}")
    for key in ("train", "eval"):
        if sizes.get(key, 0) > MAX_SPLIT:
            raise TaskError(f"rg:{name}: {key}={sizes[key]} is more than {MAX_SPLIT} items per split")
    if not isinstance(sizes.get("extract", ""), str):
        raise TaskError(f"rg:{name}: extract must be a name, got {sizes['extract']!r}")
    return ReasoningGymTask(name, **sizes, **options)
