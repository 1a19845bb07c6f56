"""Arithmetic chains: a procedural multi-step reasoning task with a worked solution per sample.

A chain starts from a number and applies a few operations to it, each done column by column as in
arith.py, so a response carries tens of tokens of real intermediate work before its answer::

    {"id": "chain-<split>-<seed>-<i>", "split": split, "domain": "chain", "checker": "arith",
     "prompt": "Start with 47. Add 38. Multiply by 3.",
     "reasoning": "47+38: 7+8=15 carry 1. 4+3+1=8. So 85. 85*3: 5*3=15 carry 1. 8*3+1=25. So 255.",
     "hint": "First 47+38. Add the ones: 7+8. Then the tens: 4+3, plus the carry. Next 85*3. ...",
     "answer": "255", "response": "<reasoning>\\nAnswer: 255", "steps": 2, "ops": "+*"}

The privileged information comes in the forms the papers compare (privileged.text): `{hint}`,
step hints (each step's column operations, never a column's result: the operands of a later step
are the results before it, the final answer never appears); `{reasoning}` with `{answer}`, the
full worked solution; `{answer}` alone.

Numbers: the start is 10..99; + and - take 10..99 (- never goes below 0), * a digit 2..9. Splits
are disjoint by construction (a hash of the whole chain, as every task here); a chain of more
steps than training saw is the out-of-distribution split, and chains of one operation each
(+, -, *) the continual-learning stages.
"""
from __future__ import annotations

from mmdistill.tasks import SPLIT_BUCKETS, keyed_rng, split_of_key
from mmdistill.tasks.arith import OPS, extract_answer, is_correct, solve

DOMAIN = "chain"
_WORDS = {"+": "Add {b}.", "-": "Subtract {b}.", "*": "Multiply by {b}."}
_MAX_MISSES = 20000

__all__ = ["DOMAIN", "chain_key", "extract_answer", "is_correct", "make_sample", "make_samples", "solve_chain"]


def chain_key(start: int, steps: list[tuple[str, int]]) -> str:
    return "chain|" + str(start) + "|" + "|".join(f"{op}{b}" for op, b in steps)


def solve_chain(start: int, steps: list[tuple[str, int]]) -> tuple[str, str, str]:
    """(reasoning, answer, hint) of the chain."""
    value, work, hints = start, [], []
    for i, (op, b) in enumerate(steps):
        reasoning, answer, hint = solve(op, value, b)
        work.append(f"{value}{op}{b}: {reasoning} So {answer}.")
        hints.append(f"{'First' if i == 0 else 'Next'} {value}{op}{b}. {hint}")
        value = int(answer)
    return " ".join(work), str(value), " ".join(hints)


def make_sample(start: int, steps: list[tuple[str, int]], *, split: str, seed: int, index: int) -> dict:
    reasoning, answer, hint = solve_chain(start, steps)
    return {
        "id": f"chain-{split}-{seed}-{index}",
        "split": split,
        "domain": DOMAIN,
        "checker": "arith",
        "prompt": f"Start with {start}. " + " ".join(_WORDS[op].format(b=b) for op, b in steps),
        "reasoning": reasoning,
        "answer": answer,
        "hint": hint,
        "response": reasoning + "\nAnswer: " + answer,
        "steps": len(steps),
        "ops": "".join(op for op, _ in steps),
    }


def _draw(rng, ops: tuple[str, ...], n_steps: int) -> tuple[int, list[tuple[str, int]]]:
    start = value = rng.randint(10, 99)
    steps = []
    for _ in range(n_steps):
        op = ops[rng.randrange(len(ops))]
        if op == "*":
            b = rng.randint(2, 9)
        elif op == "-":
            b = rng.randint(min(10, value), min(99, value))
        else:
            b = rng.randint(10, 99)
        steps.append((op, b))
        value = value + b if op == "+" else value - b if op == "-" else value * b
    return start, steps


def make_samples(n: int, seed: int, split: str = "train", steps: int = 2, ops: tuple[str, ...] = OPS) -> list[dict]:
    """`n` distinct chains of `steps` operations drawn from `ops`, all of `split`; deterministic
    for (n, seed, split, steps, ops)."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BUCKETS)}")
    ops = tuple(ops)
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    if steps < 1 or n < 0:
        raise ValueError(f"need steps >= 1 and n >= 0, got steps={steps}, n={n}")
    rng = keyed_rng(f"chain|seed={seed}|split={split}|steps={steps}|ops={''.join(ops)}")
    seen: set[str] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        start, chain = _draw(rng, ops, steps)
        key = chain_key(start, chain)
        if key in seen or split_of_key(key) != split:
            misses += 1
            if misses > _MAX_MISSES:
                raise ValueError(f"cannot draw {n} distinct {split} chains of {steps} steps over {ops}: "
                                 f"the pool holds about {len(out)}")
            continue
        misses = 0
        seen.add(key)
        out.append(make_sample(start, chain, split=split, seed=seed, index=len(out)))
    return out
