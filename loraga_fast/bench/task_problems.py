"""The ``task`` suite's problems: arithmetic word problems in the style of GSM8K generated from a seed, their
exact answers, disjoint train/test splits, the prompt / target texts, the answer parser and the token batches
(prompt masked). See :mod:`loraga_fast.bench.task` for the suite."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

__all__ = ["ANSWER_MARKER", "NUMBERS", "ByteCodec", "HFCodec", "Numbers", "Problem", "encode_example",
           "evaluate_expression", "generate_problem", "make_splits", "parse_answer", "prompt_and_target",
           "train_batch"]

ANSWER_MARKER = "Answer:"

# ------------------------------------------------------------------------------------------------ the generator

# (name, subject pronoun, object pronoun)
NAMES = [("Tom", "he", "him"), ("Anna", "she", "her"), ("Ben", "he", "him"), ("Maria", "she", "her"),
         ("Sam", "he", "him"), ("Lucy", "she", "her"), ("Omar", "he", "him"), ("Priya", "she", "her"),
         ("Jack", "he", "him"), ("Emma", "she", "her"), ("Leo", "he", "him"), ("Sofia", "she", "her"),
         ("Ravi", "he", "him"), ("Mia", "she", "her"), ("Noah", "he", "him"), ("Chloe", "she", "her"),
         ("Diego", "he", "him"), ("Hana", "she", "her"), ("Ivan", "he", "him"), ("Zoe", "she", "her")]
ITEMS = ["apples", "marbles", "stickers", "cookies", "stamps", "cards", "pencils", "shells", "coins", "books",
         "eggs", "crayons", "beads", "candies", "buttons"]
CONTAINERS = ["bags", "boxes", "packs", "jars", "crates", "baskets"]
OPS = ("add", "sub", "addmul", "submul", "scale", "split")
OP_WEIGHTS = (3, 3, 2, 2, 1, 1)


@dataclass(frozen=True)
class Numbers:
    """The ranges a problem's numbers are drawn from (inclusive): the starting count, what is added or taken away,
    the k and n of "k bags of n", the doubling/tripling factors, the equal-group divisors, and the bound every
    intermediate value and the answer stay within (from 1)."""

    start: tuple[int, int]
    add: tuple[int, int]
    k: tuple[int, int]
    n: tuple[int, int]
    factors: tuple[int, ...]
    divisors: tuple[int, ...]
    max_value: int


NUMBERS = {
    # two-digit counts, one-digit steps, multiplication tables up to 5 x 9: what SmolLM2-135M can learn in a short run
    "small": Numbers(start=(10, 49), add=(2, 9), k=(2, 5), n=(2, 9), factors=(2,), divisors=(2, 3), max_value=99),
    # GSM8K-sized: two-digit steps, values up to 999
    "large": Numbers(start=(10, 99), add=(5, 60), k=(2, 9), n=(2, 12), factors=(2, 3), divisors=(2, 3, 4, 5),
                     max_value=999),
}


@dataclass(frozen=True)
class Problem:
    """One word problem: its text, its answer, the arithmetic it describes (``expression``: Python syntax with
    ``/`` for an exact division, read left to right as the story goes) and the worked steps of the solution."""

    question: str
    answer: int
    expression: str
    steps: tuple[str, ...]

    @property
    def key(self) -> str:
        """What two problems must differ in to count as different problems: the arithmetic, not the names."""
        return self.expression


def _op(kind: str, rng: random.Random, nums: Numbers, x: int, items: str, lead: str, subj: str, obj: str,
        other: str) -> tuple[int, str, Callable[[str, bool], tuple[str, bool]], list[str]] | None:
    """One operation of ``kind`` on the current count ``x``: (new count, its sentence (``lead`` is "", "Then " or
    "After that, "), how it extends the expression (old expression, whether it is a product) -> (new, is a product),
    the worked steps); None when ``kind`` cannot keep every value in [1, nums.max_value] from ``x``."""
    who = f"{lead}{subj}" if lead else subj.capitalize()
    top = nums.max_value
    if kind == "add":
        b = rng.randint(*nums.add)
        if x + b > top:
            return None
        text = rng.choice([f"{who} buys {b} more {items}.", f"{who} finds {b} more {items}.",
                           f"{lead}{other} gives {obj} {b} {items}."])
        return x + b, text, lambda e, _: (f"{e} + {b}", False), [f"{x} + {b} = {x + b}"]
    if kind == "sub":
        if x - 1 < nums.add[0]:
            return None
        b = rng.randint(nums.add[0], min(x - 1, nums.add[1]))
        text = rng.choice([f"{who} gives away {b} {items}.", f"{who} loses {b} {items}.", f"{who} sells {b} {items}."])
        return x - b, text, lambda e, _: (f"{e} - {b}", False), [f"{x} - {b} = {x - b}"]
    if kind in ("addmul", "submul"):
        k, n = rng.randint(*nums.k), rng.randint(*nums.n)
        kn = k * n
        if kind == "addmul":
            if x + kn > top:
                return None
            container = rng.choice(CONTAINERS)
            text = rng.choice([f"{who} buys {k} {container} of {n} {items} each.",
                               f"{who} gets {k} {container} with {n} {items} in each."])
            return (x + kn, text, lambda e, _: (f"{e} + {k} * {n}", False),
                    [f"{k} * {n} = {kn}", f"{x} + {kn} = {x + kn}"])
        if kn >= x:
            return None
        text = rng.choice([f"{who} gives {k} friends {n} {items} each.",
                           f"{who} puts {n} {items} into each of {k} gift boxes."])
        return (x - kn, text, lambda e, _: (f"{e} - {k} * {n}", False),
                [f"{k} * {n} = {kn}", f"{x} - {kn} = {x - kn}"])
    if kind == "scale":
        f = rng.choice(nums.factors)
        if x * f > top:
            return None
        text = f"{who} {'doubles' if f == 2 else 'triples'} the number of {items}."
        return (x * f, text, lambda e, product: (f"{e if product else f'({e})'} * {f}", True),
                [f"{x} * {f} = {x * f}"])
    if kind == "split":
        ks = [k for k in nums.divisors if x % k == 0]
        if not ks:
            return None
        k = rng.choice(ks)
        text = f"{who} splits the {items} into {k} equal groups and keeps one group."
        return (x // k, text, lambda e, product: (f"{e if product else f'({e})'} / {k}", True),
                [f"{x} / {k} = {x // k}"])
    raise ValueError(f"unknown operation {kind!r}")


def generate_problem(rng: random.Random, ops: Sequence[int] = (2, 3), numbers: str = "small") -> Problem:
    """One problem of ``rng.choice(ops)`` operations with ``NUMBERS[numbers]``, drawn from ``rng``."""
    nums = NUMBERS[numbers]
    name, subj, obj = rng.choice(NAMES)
    other = rng.choice([n for n, _, _ in NAMES if n != name])
    items = rng.choice(ITEMS)
    x = rng.randint(*nums.start)
    sentences, expr, product, steps = [f"{name} has {x} {items}."], str(x), True, []
    for i in range(rng.choice(list(ops))):
        lead = "" if i == 0 else rng.choice(["", "Then ", "After that, "])
        done = None
        while done is None:
            done = _op(rng.choices(OPS, OP_WEIGHTS)[0], rng, nums, x, items, lead, subj, obj, other)
        x, text, extend, more = done
        sentences.append(text)
        expr, product = extend(expr, product)
        steps += more
    sentences.append(f"How many {items} does {name} have now?")
    return Problem(" ".join(sentences), x, expr, tuple(steps))


def make_splits(n_train: int, n_test: int, seed: int = 0, ops: Sequence[int] = (2, 3),
                numbers: str = "small") -> tuple[list[Problem], list[Problem]]:
    """``(train, test)``: ``n_test`` held-out problems, then ``n_train`` training problems, every problem distinct
    and none with a test problem's arithmetic (``Problem.key``) in the training split. Each split has its own
    generator, so the test split does not depend on ``n_train`` (and a smaller ``n_test`` is a prefix)."""
    seen: set[str] = set()

    def draw(rng: random.Random, n: int) -> list[Problem]:
        out: list[Problem] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise RuntimeError(f"could not draw {n} distinct problems")
            p = generate_problem(rng, ops, numbers)
            if p.key not in seen:
                seen.add(p.key)
                out.append(p)
        return out

    test = draw(random.Random(2 * seed + 1), n_test)
    train = draw(random.Random(2 * seed), n_train)
    return train, test


def evaluate_expression(expression: str) -> Fraction:
    """The exact value of a problem's ``expression`` (integers, + - * / and parentheses), without ``eval``."""
    import ast

    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    return value(ast.parse(expression, mode="eval").body)


# -------------------------------------------------------------------------------------------- prompts and answers

_INT = re.compile(r"-?\d+")


def prompt_and_target(problem: Problem, fmt: str = "direct") -> tuple[str, str]:
    """The prompt and the target text of ``problem``. ``direct``: the prompt ends with the answer marker, the target
    is `` 66``; ``steps``: the prompt ends with ``Solution:``, the target is the worked steps then ``Answer: 66``."""
    if fmt == "direct":
        return f"Question: {problem.question}\n{ANSWER_MARKER}", f" {problem.answer}"
    if fmt == "steps":
        return (f"Question: {problem.question}\nSolution:",
                " " + " ".join(f"{s}." for s in problem.steps) + f"\n{ANSWER_MARKER} {problem.answer}")
    raise ValueError(f"unknown format {fmt!r} (direct or steps)")


def parse_answer(text: str) -> int | None:
    """The first integer after the first answer marker in ``text`` (the prompt followed by the generated text);
    None when there is no marker or no integer after it."""
    at = text.find(ANSWER_MARKER)
    if at < 0:
        return None
    found = _INT.search(text, at + len(ANSWER_MARKER))
    return int(found.group()) if found else None


class ByteCodec:
    """A byte-level tokenizer for ``--model tiny`` and the tests: ASCII byte ``c`` is id ``c``, id 0 (NUL) ends a
    sequence and pads; vocabulary 128."""

    vocab_size = 128
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("ascii"))
        assert 0 not in ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 < i < 128).decode("ascii")


class HFCodec:
    """A transformers tokenizer behind :class:`ByteCodec`'s interface (no special tokens added; its EOS ends a
    target and pads)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def encode_example(codec: Any, problem: Problem, fmt: str = "direct") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one training example: prompt + target + EOS, the prompt's labels -100 (the loss is
    on the target and its EOS only). Prompt and target are encoded apart, as the prompt is at evaluation."""
    prompt, target = prompt_and_target(problem, fmt)
    p, t = codec.encode(prompt), codec.encode(target) + [codec.eos_id]
    return p + t, [-100] * len(p) + t


def train_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Examples padded on the left to the longest (so every target ends at the last position, as every prompt does
    at generation): ``input_ids``, ``attention_mask`` (0 on padding), ``position_ids`` (counted from each row's
    first real token), ``labels`` (-100 on the prompt and the padding) and ``keep``, the number of last positions
    whose logits the loss needs (the longest target + 1)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, width - len(x) :] = torch.tensor(x)
        labels[i, width - len(y) :] = torch.tensor(y)
        mask[i, width - len(x) :] = 1
    target = max(sum(label != -100 for label in y) for _, y in examples)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels, "keep": min(target + 1, width)}
