"""Generated tasks with verifiable answers: solutions, rewards, splits, JSONL, preference pairs."""

import json

import pytest
import torch

from mlatlas.core.config import ConfigError
from mlatlas.llm.common import preference_pairs
from mlatlas.llm.model import LMConfig, TinyLM
from mlatlas.llm.tasks import (
    TASKS,
    Problem,
    completion_rows,
    evaluate_expression,
    get_task,
    parse_difficulties,
    problems,
    read_jsonl,
    write_jsonl,
)
from mlatlas.nn.tokenizers import Tokenizer


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_solutions_are_correct_and_well_formed(name):
    task = get_task(name)
    items = problems(task, "train", 300, list(task.difficulties), seed=0)
    correct, formatted = task.rewards(items, [p.solution for p in items])
    assert correct == [1.0] * 300 and formatted == [1.0] * 300
    assert {p.difficulty for p in items} == set(task.difficulties)


def test_addition_answers_and_difficulty_is_the_first_operands_digits():
    task = get_task("addition")
    for p in problems(task, "train", 200, [3], seed=1):
        a, b = map(int, p.prompt[:-1].split("+"))
        assert len(str(a)) == 3 and p.answer == str(a + b)
    p = Problem("57+68=", "125", "125", 2)
    assert task.rewards([p] * 3, ["125", "124", "12 5x"]) == ([1.0, 0.0, 0.0], [1.0, 1.0, 0.0])


def test_the_scratchpad_adds_digits_right_to_left_with_carries():
    cot = get_task("addition_cot")
    assert cot.solve(57, 68) == "7+8=15 5+6+1=12 0+0+1=1 >125"
    assert cot.solve(0, 0) == ">0"
    p = Problem("57+68=", cot.solve(57, 68), "125", 2)
    # Skipping the scratchpad is still the task's form, and correct.
    assert cot.rewards([p] * 3, [">125", "7+8=15 >124", "125"]) == \
        ([1.0, 0.0, 0.0], [1.0, 1.0, 0.0])


def test_countdown_checks_the_numbers_used_and_the_value():
    task = get_task("countdown")
    p = Problem("3 5 7>22:", "3*5+7", "22", 2)
    texts = ["7+5*3", "3*5+7", "5*3+7+0", "3*5+8", "22", "3*5+7)"]
    assert task.rewards([p] * 6, texts)[0] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert evaluate_expression("2+3*4-5*2") == 4
    assert evaluate_expression("7-2-2") == 3


def test_train_and_test_splits_are_disjoint_and_deterministic():
    task = get_task("addition")
    train = problems(task, "train", 2000, [1, 2, 3], seed=0)
    test = problems(task, "test", 500, [1, 2, 3], seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert problems(task, "test", 500, [1, 2, 3], seed=0) == test
    assert problems(task, "train", 50, [1, 2, 3], seed=1) != train[:50]


def test_difficulty_strings_and_unknown_names_are_clear():
    task = get_task("addition")
    assert parse_difficulties("1-3", task) == [1, 2, 3]
    assert parse_difficulties("1,4", task) == [1, 4]
    with pytest.raises(ConfigError, match="lie in 1-5"):
        parse_difficulties("0-2", task)
    with pytest.raises(ConfigError, match="a range"):
        parse_difficulties("one", task)
    with pytest.raises(ConfigError, match="did you mean addition"):
        get_task("additon")


def test_jsonl_in_trl_formats(tmp_path):
    items = problems(get_task("addition"), "train", 3, [1], seed=0)
    write_jsonl(tmp_path / "sft.jsonl", completion_rows(items))
    rows = read_jsonl(tmp_path / "sft.jsonl", ("prompt", "completion"))
    assert rows == [{"prompt": p.prompt, "completion": p.solution} for p in items]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n{oops\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1: needs string field 'chosen'"):
        read_jsonl(tmp_path / "bad.jsonl", ("prompt", "chosen"))
    with pytest.raises(ConfigError, match="bad.jsonl:2: not JSON"):
        read_jsonl(tmp_path / "bad.jsonl", ("prompt",))
    with pytest.raises(ConfigError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl", ("prompt",))


def test_preference_pairs_choose_correct_over_wrong():
    task = get_task("addition")
    items = problems(task, "train", 6, [1], seed=0)
    tokenizer = Tokenizer.characters([task.alphabet])
    model = TinyLM(LMConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2,
                            n_kv_heads=2, hidden_dim=32, max_seq_len=32))
    rows = preference_pairs(model, tokenizer, task, items, samples=3, max_new_tokens=4,
                            generator=torch.Generator().manual_seed(0))
    assert rows and set(rows[0]) == {"prompt", "chosen", "rejected"}
    by_prompt = {p.prompt: p for p in items}
    for row in rows:
        problem = by_prompt[row["prompt"]]
        assert task.is_correct(problem, row["chosen"])
        assert not task.is_correct(problem, row["rejected"])
