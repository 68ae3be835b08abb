"""Tasks with verifiable answers, generated deterministically, and their rewards.

- ``addition``: ``"357+86="`` -> ``"443"``; difficulty d: the first operand has d digits, the
  second 1..d.
- ``addition_cot``: the same prompts, answered with a worked scratchpad (chain of thought) that
  adds the digits right to left with their carries, then the sum after ``>``:
  ``"357+86="`` -> ``"7+6=13 5+8+1=14 3+0+1=4 >443"``.
- ``countdown``: reach the target with each given number once and + - *:
  ``"3 5 7>22:"`` -> ``"3*5+7"`` (any correct expression counts); difficulty d: d + 1 numbers.

Rewards (Kimi k1.5 and DeepSeek-R1 use rule-based ones like these, not a learnt model):
exact-match r = 1[answer correct], and a format reward 1[completion has the task's form].

Problems split into train and test by a hash of the prompt, so the same prompt never appears
in both, whatever the seed; ``problems(task, split, n, difficulties, seed)`` draws from a split.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlatlas.core.config import ConfigError, closest
from mlatlas.core.io import write_text

TEST_BUCKETS = 5
"""One prompt in TEST_BUCKETS (by CRC-32 of its text) is held out for testing."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str
    """A correct completion (without the end-of-sequence token)."""
    answer: str
    difficulty: int


class Task:
    name = ""
    alphabet = "0123456789+-*=> :"
    difficulties = range(1, 6)

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def extract(self, completion: str) -> str | None:
        """The final answer in a completion, or None if it has not the task's form."""
        raise NotImplementedError

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return self.extract(completion) == problem.answer

    def rewards(self, problems: Sequence[Problem], completions: Sequence[str]
                ) -> tuple[list[float], list[float]]:
        """(exact-match rewards, format rewards), one of each per completion."""
        correct = [float(self.is_correct(p, c)) for p, c in zip(problems, completions, strict=True)]
        formats = [float(self.extract(c) is not None) for c in completions]
        return correct, formats


class Addition(Task):
    name = "addition"
    pattern = re.compile(r"^(\d+)$")

    def make(self, rng, difficulty):
        a = rng.randint(10 ** (difficulty - 1) if difficulty > 1 else 0, 10 ** difficulty - 1)
        b = rng.randint(0, 10 ** rng.randint(1, difficulty) - 1)
        return Problem(f"{a}+{b}=", self.solve(a, b), str(a + b), difficulty)

    def solve(self, a: int, b: int) -> str:
        return str(a + b)

    def extract(self, completion):
        match = self.pattern.match(completion.strip())
        return match.group(1) if match else None


class AdditionCoT(Addition):
    name = "addition_cot"
    pattern = re.compile(r"^(?:\d\+\d(?:\+1)?=\d{1,2} )*>(\d+)$")

    def solve(self, a, b):
        steps, carry = [], 0
        while a or b or carry:
            x, y = a % 10, b % 10
            total = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            carry, a, b = total // 10, a // 10, b // 10
        digits = "".join(s.rsplit("=", 1)[1][-1] for s in steps)[::-1].lstrip("0") or "0"
        return " ".join(steps) + f" >{digits}" if steps else ">0"


class Countdown(Task):
    name = "countdown"
    difficulties = range(1, 4)
    expression = re.compile(r"^\d+(?:[+\-*]\d+)*$")

    def make(self, rng, difficulty):
        numbers = [rng.randint(1, 9) for _ in range(difficulty + 1)]
        ops = [rng.choice("+-*") for _ in range(difficulty)]
        solution = "".join(f"{n}{op}" for n, op in zip(numbers, ops, strict=False)) + str(
            numbers[-1])
        target = evaluate_expression(solution)
        shown = sorted(numbers)
        return Problem(f"{' '.join(map(str, shown))}>{target}:", solution, str(target),
                       difficulty)

    def extract(self, completion):
        text = completion.strip()
        return text if self.expression.match(text) else None

    def is_correct(self, problem, completion):
        expr = self.extract(completion)
        if expr is None:
            return False
        given = sorted(int(n) for n in problem.prompt.split(">")[0].split())
        used = sorted(int(n) for n in re.findall(r"\d+", expr))
        return used == given and str(evaluate_expression(expr)) == problem.answer


def evaluate_expression(expr: str) -> int:
    """Value of ``n (op n)*`` with op in + - * and the usual precedence (no eval())."""
    tokens = re.findall(r"\d+|[+\-*]", expr)
    terms, sign, product = [], 1, int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "*":
            product *= int(number)
        else:
            terms.append(sign * product)
            sign, product = (1 if op == "+" else -1), int(number)
    return sum(terms) + sign * product


TASKS: dict[str, Task] = {t.name: t for t in (Addition(), AdditionCoT(), Countdown())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}{closest(name, TASKS)} "
                          f"(tasks: {', '.join(TASKS)})")
    return TASKS[name]


def parse_difficulties(text: str, task: Task) -> list[int]:
    """'1-3' -> [1, 2, 3]; '2' -> [2]; '1,3' -> [1, 3], checked against the task's range."""
    try:
        levels = sorted({d for part in text.split(",") for d in _span(part)})
    except ValueError:
        raise ConfigError(f"difficulty {text!r}: write a level, a range '1-3' or a list "
                          "'1,3'") from None
    bad = [d for d in levels if d not in task.difficulties]
    if bad or not levels:
        raise ConfigError(f"{task.name} difficulties lie in {task.difficulties.start}-"
                          f"{task.difficulties.stop - 1}, got {text!r}")
    return levels


def _span(part: str) -> range:
    low, _, high = part.strip().partition("-")
    return range(int(low), int(high or low) + 1)


def in_test_split(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % TEST_BUCKETS == 0


def problems(task: Task, split: str, n: int, difficulties: Sequence[int], seed: int
             ) -> list[Problem]:
    """``n`` problems of ``split`` ('train' or 'test'), difficulties drawn uniformly."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    # The split is part of the stream's seed so train and test draws are independent.
    rng = random.Random(f"{task.name}/{split}/{seed}")
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        problem = task.make(rng, rng.choice(list(difficulties)))
        if in_test_split(problem.prompt) == (split == "test"):
            out.append(problem)
        tries += 1
        if tries > 100 * n + 1000:
            raise ConfigError(f"cannot draw {n} {split} problems of {task.name} at "
                              f"difficulties {list(difficulties)}")
    return out


# TRL's data formats ----------------------------------------------------------------------------

def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    import json

    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path, keys: Sequence[str]) -> list[dict]:
    """Rows of a JSONL file, each checked to hold string ``keys`` (e.g. prompt, completion)."""
    import json

    rows = []
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); expected JSON lines "
                          f"with {', '.join(keys)}") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{line_no}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{line_no}: a {type(row).__name__}, not an object "
                              f"with {', '.join(keys)}")
        missing = [k for k in keys if not isinstance(row.get(k), str)]
        if missing:
            raise ConfigError(f"{path}:{line_no}: needs string field {missing[0]!r}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return rows


def completion_rows(items: Sequence[Problem]) -> list[dict]:
    """Prompt/completion rows (TRL's SFT format)."""
    return [{"prompt": p.prompt, "completion": p.solution} for p in items]
