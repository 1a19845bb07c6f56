"""Supervised fine-tuning on the oracle response: the off-policy baseline."""
from __future__ import annotations

import torch

from mmdistill.core.batch import Batch, ViewLogits
from mmdistill.losses.chunked import reduction_weights, token_loss
from mmdistill.losses.divergences import entropy
from mmdistill.methods.base import (
    check_chunk_size,
    check_reduction,
    gather_at,
    safe_ids,
    student_logits,
    weighted_means,
)


def _nll(ls: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -gather_at(ls, ids)


class SFT:
    """Cross-entropy on batch.response_ids, which here are oracle responses, not rollouts."""

    name = "sft"
    views = ("student",)
    on_policy = False

    def __init__(self, reduction: str = "seq", chunk_size: int | None = None):
        self.reduction = check_reduction(reduction)
        self.chunk_size = check_chunk_size(chunk_size)

    def loss(self, views: ViewLogits, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = student_logits(views, batch)
        mask = batch.response_mask.bool()
        weight = reduction_weights(mask, self.reduction).to(s.device)
        ids = safe_ids(batch.response_ids, mask).to(s.device)
        diag: dict[str, torch.Tensor] = {}
        loss = token_loss(_nll, s, [], weight, extras=[ids], chunk_size=self.chunk_size,
                          diagnostics=lambda ls, y: {"nll": _nll(ls, y), "student_entropy": entropy(ls)}, diag_out=diag)
        return loss, {"loss": float(loss.detach()), **weighted_means(diag, weight)}
