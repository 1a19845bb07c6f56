"""The procedural arithmetic task: format, determinism, split disjointness, correctness."""
from __future__ import annotations

import re

import pytest

from mmdistill.tasks.arith import (
    extract_answer,
    is_correct,
    make_samples,
    problem_bucket,
    solve,
    split_of,
)

PROMPT_RE = re.compile(r"^Compute (\d+)([+\-*])(\d+)\.$")
KEYS = {"id", "split", "domain", "prompt", "reasoning", "answer", "hint", "response"}


def parse(prompt: str) -> tuple[int, str, int]:
    m = PROMPT_RE.match(prompt)
    assert m, prompt
    return int(m.group(1)), m.group(2), int(m.group(3))


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
@pytest.mark.parametrize("ops", [("+",), ("-",), ("*",), ("+", "-", "*")])
def test_answers_are_correct_and_format(digits, ops):
    n = 20 if digits == 1 else 200
    for split in ("train", "test"):
        k = n if split == "train" else (3 if digits == 1 else n // 4)
        samples = make_samples(k, seed=3, split=split, digits=digits, ops=ops)
        for i, s in enumerate(samples):
            assert set(s) == KEYS
            assert s["id"] == f"arith-{split}-3-{i}"
            assert s["split"] == split and s["domain"] == "arith"
            a, op, b = parse(s["prompt"])
            assert op in ops
            assert a < 10**digits and b < 10**digits
            if op == "-":
                assert a >= b
            if op == "*":
                assert 2 <= b <= 9
            assert s["answer"] == str(eval(f"{a}{op}{b}"))  # noqa: S307 - operands parsed as ints
            assert s["response"] == s["reasoning"] + "\nAnswer: " + s["answer"]
            assert is_correct(s["response"], s["answer"])
            assert extract_answer(s["response"]) == s["answer"]
            # the hint gives steps but no results and no answer line
            assert "=" not in s["hint"] and "Answer" not in s["hint"]
            assert s["hint"] and s["reasoning"]
            assert "\n" not in s["reasoning"] and "\n" not in s["hint"]


def test_reasoning_steps_are_true():
    """Every 'x op y [op c]=r' step in the worked solution is arithmetically right."""
    step = re.compile(r"(\d+)([+\-*])(\d+)(?:([+\-])(\d+))?=(\d+)")
    samples = make_samples(300, seed=0, split="train", digits=3, ops=("+", "-", "*"))
    n_steps = 0
    for s in samples:
        steps = step.findall(s["reasoning"])
        a, _, _ = parse(s["prompt"])
        assert len(steps) == max(len(str(a)), len(str(parse(s["prompt"])[2])))
        for x, op, y, op2, c, r in steps:
            expr = f"{x}{op}{y}" + (f"{op2}{c}" if op2 else "")
            assert eval(expr) == int(r), (s["reasoning"], expr)  # noqa: S307
            n_steps += 1
    assert n_steps > 600


def test_examples_match_documented_format():
    assert solve("+", 47, 38) == (
        "7+8=15 carry 1. 4+3+1=8.",
        "85",
        "Add the ones: 7+8. Then the tens: 4+3, plus the carry.",
    )
    assert solve("-", 52, 38)[:2] == ("12-8=4 borrow 1. 5-3-1=1.", "14")
    assert solve("-", 100, 99)[:2] == ("10-9=1 borrow 1. 10-9-1=0 borrow 1. 1-0-1=0.", "1")
    assert solve("*", 47, 8)[:2] == ("7*8=56 carry 5. 4*8+5=37.", "376")
    assert solve("+", 95, 7) == ("5+7=12 carry 1. 9+0+1=10.", "102",
                                 "Add the ones: 5+7. Then the tens: 9+0, plus the carry. Write the final carry.")
    with pytest.raises(ValueError):
        solve("-", 3, 5)
    with pytest.raises(ValueError):
        solve("*", 3, 12)
    with pytest.raises(ValueError):
        solve("/", 3, 1)


def test_deterministic():
    a = make_samples(100, seed=7, split="train", digits=2, ops=("+", "-"))
    b = make_samples(100, seed=7, split="train", digits=2, ops=("+", "-"))
    assert a == b
    assert make_samples(50, seed=7, split="train", digits=2, ops=("+", "-")) == a[:50]
    c = make_samples(100, seed=8, split="train", digits=2, ops=("+", "-"))
    assert [s["prompt"] for s in a] != [s["prompt"] for s in c]


def test_problems_distinct_within_call():
    s = make_samples(500, seed=1, split="train", digits=2, ops=("+", "-", "*"))
    prompts = [x["prompt"] for x in s]
    assert len(set(prompts)) == len(prompts)


def test_splits_disjoint():
    ops = ("+", "-", "*")
    for digits in (1, 2, 3):
        n_train = 40 if digits == 1 else 1500
        n_eval = 5 if digits == 1 else 300
        train = {x["prompt"] for seed in (0, 1) for x in make_samples(n_train, seed, "train", digits, ops)}
        test = {x["prompt"] for seed in (0, 1) for x in make_samples(n_eval, seed, "test", digits, ops)}
        val = {x["prompt"] for x in make_samples(n_eval, 0, "val", digits, ops)}
        assert train.isdisjoint(test) and train.isdisjoint(val) and test.isdisjoint(val)
        for p in test:
            a, op, b = parse(p)
            assert split_of(op, a, b) == "test" and problem_bucket(op, a, b) == 0
        # commutative twins never straddle splits
        for p in test:
            a, op, b = parse(p)
            if op == "+":
                assert f"Compute {b}+{a}." not in train


def test_pool_exhaustion_and_bad_args():
    with pytest.raises(ValueError):
        make_samples(1000, seed=0, split="test", digits=1, ops=("+",))
    with pytest.raises(ValueError):
        make_samples(3, seed=0, split="dev")
    with pytest.raises(ValueError):
        make_samples(3, seed=0, ops=("/",))
    with pytest.raises(ValueError):
        make_samples(3, seed=0, digits=0)
    assert make_samples(0, seed=0) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7+8=15 carry 1. 4+3+1=8.\nAnswer: 85", "85"),
        ("Answer: 12\nAnswer: 85", "85"),  # last one wins
        ("Answer: 85   \n\nmore text after", "85"),  # trailing whitespace and text
        ("Answer:\n  85  \nAnswer? no", "85"),  # value on the next line
        ("Answer: 85 because 7+8=15", "85 because 7+8=15"),  # first line verbatim
        ("  Answer:85", "85"),
        ("no answer here", None),
        ("Answer:   \n  ", None),
        ("", None),
        ("answer: 85", None),  # case-sensitive marker
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("...\nAnswer: 85", "85")
    assert is_correct("...\nAnswer: 85.", "85")
    assert is_correct("Answer: 85 \n junk", " 85")
    assert not is_correct("Answer: 85\nAnswer: 86", "85")
    assert not is_correct("Answer: 085", "85")
    assert not is_correct("Answer: 8", "85")
    assert not is_correct("85", "85")
    assert not is_correct("Answer:", "")
