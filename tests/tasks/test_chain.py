"""Arithmetic chains: worked solutions against a brute-force evaluation, hints without results,
disjoint splits, the data source and its config checks."""
from __future__ import annotations

import re

import pytest

from mmdistill.config import ConfigError, load_config
from mmdistill.data.sources import load_split
from mmdistill.evaluation.checkers import check
from mmdistill.tasks import chain
from mmdistill.tasks.arith import solve


def brute(sample: dict) -> list[int]:
    """The running values of the chain its prompt describes, read back from the prompt alone."""
    words = re.findall(r"(Start with|Add|Subtract|Multiply by) (\d+)\.", sample["prompt"])
    values = [int(words[0][1])]
    for word, b in words[1:]:
        v, b = values[-1], int(b)
        values.append(v + b if word == "Add" else v - b if word == "Subtract" else v * b)
    return values


@pytest.mark.parametrize("steps, ops", [(1, "+"), (2, "+-*"), (3, "+-*"), (2, "-"), (2, "*")])
def test_the_worked_solution_follows_the_chain_to_its_answer(steps, ops):
    for s in chain.make_samples(60, seed=3, split="test", steps=steps, ops=tuple(ops)):
        values = brute(s)
        assert len(values) == steps + 1 and all(v >= 0 for v in values)
        assert s["answer"] == str(values[-1]) and s["steps"] == steps and set(s["ops"]) <= set(ops)
        assert re.findall(r"So (\d+)\.", s["reasoning"]) == [str(v) for v in values[1:]]
        worked = re.findall(r"(\d+)([-+*])(\d+): ", s["reasoning"])
        assert [int(a) for a, _, _ in worked] == values[:-1]
        for (a, op, b), before in zip(worked, values):
            assert f"{before}{op}{b}: {solve(op, before, int(b))[0]} So" in s["reasoning"]
        assert s["response"] == s["reasoning"] + "\nAnswer: " + s["answer"]
        assert check(None, s["response"], s) and not check(None, "Answer: " + str(values[-1] + 1), s)


def test_step_hints_show_the_operations_but_no_result():
    for s in chain.make_samples(200, seed=0, split="train", steps=2):
        values = brute(s)
        assert "=" not in s["hint"] and "So" not in s["hint"] and "Answer" not in s["hint"]
        shown = [int(x) for x in re.findall(r"(?:First|Next) (\d+)[-+*]", s["hint"])]
        assert shown == values[:-1]  # each step names its operands: the results before it, never the last


def test_splits_are_disjoint_and_draws_deterministic():
    keys = {}
    for split in ("train", "val", "test"):
        got = chain.make_samples(300, seed=1, split=split, steps=2)
        assert got == chain.make_samples(300, seed=1, split=split, steps=2)
        keys[split] = {s["prompt"] for s in got}
        assert len(keys[split]) == 300
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert chain.make_samples(5, seed=2, split="test") != chain.make_samples(5, seed=3, split="test")


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="dev"), "unknown split"), (dict(ops=("/",)), "ops must be"), (dict(ops=()), "ops must be"),
    (dict(steps=0), "steps >= 1"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        chain.make_samples(3, seed=0, **kwargs)


def test_the_chain_source_and_its_config_keys():
    cfg = load_config("tiny", ["data.source=chain", "data.chain.num_train=30", "data.chain.num_test=5",
                               "data.chain.steps=3", "data.chain.ops=+*"])
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    assert len(train) == 30 and len(test) == 5
    assert all(s["steps"] == 3 and set(s["ops"]) <= {"+", "*"} and s["split"] == "train" for s in train)
    with pytest.raises(ConfigError, match="data.chain.ops"):
        load_config("tiny", ["data.source=chain", "data.chain.ops=+/"])
    with pytest.raises(ConfigError, match="data.chain.steps"):
        load_config("tiny", ["data.chain.steps=0"])
