"""Seeded procedural arithmetic with privileged information.

Small enough that a ~1M-parameter transformer learns it on CPU in minutes. Every sample is the
project's sample record::

    {"id": "arith-<split>-<seed>-<i>", "split": split, "domain": "arith",
     "prompt": "Compute 47+38.",
     "reasoning": "7+8=15 carry 1. 4+3+1=8.",
     "answer": "85",
     "hint": "Add the ones: 7+8. Then the tens: 4+3, plus the carry.",
     "response": "7+8=15 carry 1. 4+3+1=8.\nAnswer: 85"}

Reasoning formats (columns from the ones upward, the shorter operand padded with 0; the last
column writes its full value and never says "carry"/"borrow"):

* ``+``: ``"7+8=15 carry 1. 4+3+1=8."``
* ``-`` (a >= b, so results are non-negative): ``"12-8=4 borrow 1. 5-3-1=1."``; a column that
  borrows shows its top digit plus 10.
* ``*`` (second operand one digit, 2..9): ``"7*8=56 carry 5. 4*8+5=37."``

Hints give the column operations (and whether a carry/borrow comes in) but never a result: they
contain no ``=`` and no answer line.

Operands are uniform on ``[0, 10**digits)`` (so "at most ``digits`` digits"); for ``*`` the second
operand is uniform on 2..9. Splits are disjoint by construction: each problem (op and operands,
sorted for the commutative ``+``/``*``, so ``7+8`` and ``8+7`` land together) is hashed with
SHA-256 into one of 10 buckets; ``test`` owns bucket 0, ``val`` bucket 1, ``train`` buckets 2..9.
The RNG is seeded from (seed, split, digits, ops), so a call is deterministic. Within one call
problems are distinct; asking for more than a split's pool holds raises ``ValueError``.
"""
from __future__ import annotations

import random

from mmdistill.tasks import SPLIT_BUCKETS, bucket_of, keyed_rng, split_of_key

DOMAIN = "arith"
OPS = ("+", "-", "*")
_COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
_MAX_CONSECUTIVE_DUPLICATES = 20000


def _problem_key(op: str, a: int, b: int) -> str:
    x, y = (min(a, b), max(a, b)) if op in ("+", "*") else (a, b)
    return f"arith|{op}|{x}|{y}"


def problem_bucket(op: str, a: int, b: int) -> int:
    """Split bucket of a problem; independent of seed, so splits never share a problem."""
    return bucket_of(_problem_key(op, a, b))


def split_of(op: str, a: int, b: int) -> str:
    return split_of_key(_problem_key(op, a, b))


def _digits_low_first(x: int, width: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(width)]


def _column_name(i: int) -> str:
    return _COLUMN_NAMES[i] if i < len(_COLUMN_NAMES) else f"column {i + 1}"


def solve(op: str, a: int, b: int) -> tuple[str, str, str]:
    """(reasoning, answer, hint) for ``a op b``."""
    if op == "+":
        width = max(len(str(a)), len(str(b)))
        da, db = _digits_low_first(a, width), _digits_low_first(b, width)
        steps, hints, carry = [], [], 0
        for i in range(width):
            s = da[i] + db[i] + carry
            lhs = f"{da[i]}+{db[i]}" + (f"+{carry}" if carry else "")
            last = i == width - 1
            steps.append(f"{lhs}={s}" + (" carry 1." if s >= 10 and not last else "."))
            h = f"{da[i]}+{db[i]}" + (", plus the carry" if carry else "")
            hints.append(f"Add the ones: {h}." if i == 0 else f"Then the {_column_name(i)}: {h}.")
            carry = 1 if s >= 10 else 0
        if carry:
            hints.append("Write the final carry.")
        result = a + b
    elif op == "-":
        if a < b:
            raise ValueError("subtraction needs a >= b")
        width = len(str(a))
        da, db = _digits_low_first(a, width), _digits_low_first(b, width)
        steps, hints, borrow = [], [], 0
        for i in range(width):
            top, new_borrow = da[i], 0
            if top - db[i] - borrow < 0:
                top, new_borrow = top + 10, 1
            d = top - db[i] - borrow
            lhs = f"{top}-{db[i]}" + ("-1" if borrow else "")
            steps.append(f"{lhs}={d}" + (" borrow 1." if new_borrow else "."))
            h = f"{da[i]}-{db[i]}" + (", minus the borrow" if borrow else "")
            hints.append(f"Subtract the ones: {h}." if i == 0 else f"Then the {_column_name(i)}: {h}.")
            borrow = new_borrow
        result = a - b
    elif op == "*":
        if not 0 <= b <= 9:
            raise ValueError("the second operand of * must be one digit")
        width = len(str(a))
        da = _digits_low_first(a, width)
        steps, hints, carry = [], [], 0
        for i in range(width):
            p = da[i] * b + carry
            lhs = f"{da[i]}*{b}" + (f"+{carry}" if carry else "")
            last = i == width - 1
            steps.append(f"{lhs}={p}" + (f" carry {p // 10}." if p >= 10 and not last else "."))
            h = f"{da[i]}*{b}" + (", plus the carry" if carry else "")
            hints.append(f"Multiply the ones: {h}." if i == 0 else f"Then the {_column_name(i)}: {h}.")
            carry = p // 10
        result = a * b
    else:
        raise ValueError(f"unsupported op {op!r}; expected one of {OPS}")
    return " ".join(steps), str(result), " ".join(hints)


def make_sample(op: str, a: int, b: int, *, split: str, seed: int, index: int) -> dict:
    reasoning, answer, hint = solve(op, a, b)
    return {
        "id": f"arith-{split}-{seed}-{index}",
        "split": split,
        "domain": DOMAIN,
        "prompt": f"Compute {a}{op}{b}.",
        "reasoning": reasoning,
        "answer": answer,
        "hint": hint,
        "response": reasoning + "\nAnswer: " + answer,
    }


def _rng(seed: int, split: str, digits: int, ops: tuple[str, ...]) -> random.Random:
    return keyed_rng(f"arith|seed={seed}|split={split}|digits={digits}|ops={''.join(ops)}")


def make_samples(
    n: int,
    seed: int,
    split: str = "train",
    digits: int = 2,
    ops: tuple[str, ...] = ("+",),
) -> list[dict]:
    """``n`` distinct problems of ``split``; deterministic for (n, seed, split, digits, ops)."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BUCKETS)}")
    if digits < 1:
        raise ValueError("digits must be >= 1")
    ops = tuple(ops)
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = _rng(seed, split, digits, ops)
    hi = 10**digits - 1
    seen: set[tuple[str, int, int]] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        op = ops[rng.randrange(len(ops))]
        a = rng.randint(0, hi)
        b = rng.randint(2, 9) if op == "*" else rng.randint(0, hi)
        if op == "-" and a < b:
            a, b = b, a
        key = (op, a, b)
        if key in seen or split_of(op, a, b) != split:
            misses += 1
            if misses > _MAX_CONSECUTIVE_DUPLICATES:
                raise ValueError(
                    f"cannot draw {n} distinct {split} problems with digits={digits}, ops={ops}: "
                    f"the pool holds about {len(out)}"
                )
            continue
        misses = 0
        seen.add(key)
        out.append(make_sample(op, a, b, split=split, seed=seed, index=len(out)))
    return out


def extract_answer(text: str) -> str | None:
    """Text after the last "Answer:", stripped, first line; None if absent or empty."""
    if text is None:
        return None
    pos = text.rfind("Answer:")
    if pos < 0:
        return None
    rest = text[pos + len("Answer:"):].strip()
    if not rest:
        return None
    first = rest.splitlines()[0].strip()
    return first or None


def _normalize(ans: str) -> str:
    ans = ans.strip()
    if ans.endswith("."):
        ans = ans[:-1].rstrip()
    return ans


def is_correct(text: str, answer: str) -> bool:
    """Whether the extracted answer equals ``answer`` exactly (modulo spaces and a final period)."""
    got = extract_answer(text)
    return got is not None and _normalize(got) == _normalize(str(answer))
