"""Procedural tasks with privileged information (samples in the project's sample-record format).

Shared by every generator: splits are decided by a hash of what a sample *is* (the problem, the
picture, the question), never by the seed, so no seed or size ever puts one item in two splits.
"""
from __future__ import annotations

import hashlib
import random

SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "test": frozenset({0}),
    "val": frozenset({1}),
    "train": frozenset(range(2, 10)),
}
N_BUCKETS = 10

# Answer checkers a sample may name in its `checker` field (scored by mmdistill.evaluation.checkers).
CHECKERS = ("exact", "numeric", "choice", "scenes", "arith")
REASONING_GYM_PREFIX = "reasoning_gym:"  # + a reasoning-gym task name: the package's own scoring


def is_checker(name) -> bool:
    return isinstance(name, str) and (name in CHECKERS or (name.startswith(REASONING_GYM_PREFIX)
                                                         and len(name) > len(REASONING_GYM_PREFIX)))


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def bucket_of(key: str) -> int:
    return _hash64(key) % N_BUCKETS


def split_of_key(key: str) -> str:
    bucket = bucket_of(key)
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def keyed_rng(key: str) -> random.Random:
    """A generator's RNG from a string naming all its arguments: stable across Python versions."""
    return random.Random(_hash64(key))
