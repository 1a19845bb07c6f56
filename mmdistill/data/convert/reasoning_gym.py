"""reasoning-gym tasks as samples, with worked solutions where the task has a solver (needs `reasoning-gym`)."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterator

from mmdistill.data.convert.common import (
    BadRecords,
    ConvertError,
    Located,
    check_stamp,
    guarded,
    samples_only,
    stamp,
    unique,
)
from mmdistill.tasks import SPLIT_BUCKETS, split_of_key
from mmdistill.tasks.reasoning_gym import SOLVERS, ReasoningGymError, package


def _need_reasoning_gym():
    try:
        return package()
    except ReasoningGymError as e:
        raise ConvertError(str(e)) from None


def _jsonable(value):
    """Metadata as JSON keeps it (the shard record is JSON): fractions and other values become
    strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    return str(value) if isinstance(value, Fraction) else repr(value)


def _self_scores(ds, entry: dict) -> bool:
    """Whether the package rewards its own answer: a few entries it makes cannot be (base_conversion
    of 0 has an empty answer; gsm_symbolic's scorer misreads negative answers), so none is drawn."""
    answer = entry.get("answer")
    return isinstance(answer, str) and bool(answer.strip()) and ds.score_answer(answer, entry) == 1.0


def _rg_sample(task: str, entry: dict, sample_id: str) -> dict:
    answer = entry.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ConvertError(f"has no answer ({answer!r}); this task cannot be checked against one answer")
    sample = {"id": sample_id, "task": task, "prompt": entry["question"], "answer": answer,
              "checker": f"reasoning_gym:{task}"}
    solver = SOLVERS.get(task)
    if solver is not None:
        try:
            sample["hint"], sample["reasoning"] = solver(entry)
        except ReasoningGymError as e:
            raise ConvertError(str(e)) from None
        sample["response"] = sample["reasoning"] + "\nAnswer: " + answer
    else:
        sample["response"] = "Answer: " + answer
    sample["rg_entry"] = {"question": entry["question"], "answer": answer,
                          "metadata": _jsonable(entry.get("metadata", {}))}
    return sample


def reasoning_gym_records(task: str, n: int, seed: int = 0, split: str = "train", *, domain: str = "reasoning_gym",
                          stage: int = 0, bad: BadRecords | None = None, **config) -> Located:
    """(where, sample) pairs of :func:`from_reasoning_gym`; ``where`` names task, seed and index."""
    check_stamp(split, domain, stage)
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"reasoning-gym split must be one of {sorted(SPLIT_BUCKETS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bad = bad or BadRecords()
    rg = _need_reasoning_gym()
    budget = 20 * n + 1000  # entries drawn at most; the test split keeps ~1 in 10
    try:
        ds = rg.create_dataset(task, size=budget, seed=seed * 1_000_003, **config)
    except Exception as e:  # noqa: BLE001 - unknown task or config: one line, not the package's traceback
        raise ConvertError(f"reasoning-gym task {task!r}: cannot create it ({type(e).__name__}: {e})") from None

    def entries() -> Located:
        seen: set[str] = set()
        made = 0
        for idx in range(budget):
            if made == n:
                return
            entry = ds[idx]
            question = entry["question"]
            if split_of_key(f"rg|{question}") != split or question in seen or not _self_scores(ds, entry):
                continue
            seen.add(question)
            where = f"reasoning_gym {task} seed {seed} entry {idx}"
            sample = guarded(lambda: _rg_sample(task, entry, f"rg-{task}-{split}-{seed}-{made}"), where, bad)
            made += 1
            if sample is not None:
                yield where, stamp(sample, split, domain, stage)
        if made < n:
            raise ConvertError(f"reasoning-gym task {task!r}: only {made} distinct {split} questions "
                               f"among {budget} entries, {n} asked")

    yield from unique(entries(), bad)


def from_reasoning_gym(task: str, n: int, seed: int = 0, split: str = "train", **kwargs) -> Iterator[dict]:
    """``n`` samples of a reasoning-gym task: ``prompt`` = the question, ``answer``, ``checker``
    = ``"reasoning_gym:<task>"``, the entry under ``rg_entry`` (question, answer, metadata as
    JSON) for :func:`reasoning_gym_score`, and for :data:`REASONING_GYM_WITH_SOLUTIONS` a
    ``hint`` and a worked solution as ``reasoning`` (``response`` = reasoning + "\\nAnswer: " +
    answer; otherwise just "Answer: " + answer).

    Splits never share a question: each question is hashed into 10 buckets (test 0, val 1,
    train 2-9, as the scenes task) and only the asked split's are kept, distinct; entries the
    package's own scorer does not give 1.0 for their own answer are not drawn. The package
    seeds entry i with ``seed + i``, so the package seed is ``seed * 1_000_003`` to keep
    neighbouring seeds from sharing entries. Extra keyword arguments go to the task's config.
    """
    return samples_only(reasoning_gym_records(task, n, seed, split, **kwargs))


