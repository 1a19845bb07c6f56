"""Held-out accuracy with greedy decoding: the number a user checks before and after training."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from mmdistill.tasks import arith, scenes

CHECKERS = {"arith": arith.is_correct, "scenes": scenes.is_correct}


def is_correct(text: str, sample: dict) -> bool:
    """The sample's domain's checker; exact match after "Answer:" for any other domain."""
    return CHECKERS.get(sample.get("domain"), arith.is_correct)(text, sample["answer"])


@torch.no_grad()
def accuracy(adapter, model, samples: list[dict], batch_size: int, max_new_tokens: int) -> float:
    if not samples:
        raise ValueError("no evaluation samples")
    greedy = SimpleNamespace(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, num_rollouts=1)
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = adapter.rollout(model, chunk, greedy)
        texts = adapter.tok.batch_decode(batch.response_ids, skip_special_tokens=True)
        correct += sum(is_correct(t, s) for t, s in zip(texts, chunk))
    return correct / len(samples)
