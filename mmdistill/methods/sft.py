"""Supervised fine-tuning on the oracle response: the off-policy baseline."""
from __future__ import annotations

import torch

from mmdistill.batch import Batch, ViewLogprobs
from mmdistill.divergences import entropy, masked_mean
from mmdistill.methods.base import check_reduction, gather_ids, student_logprobs


class SFT:
    """Cross-entropy on batch.response_ids, which here are oracle responses, not rollouts."""

    name = "sft"
    views = ("student",)
    on_policy = False

    def __init__(self, reduction: str = "seq"):
        self.reduction = check_reduction(reduction)

    def loss(self, views: ViewLogprobs, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        lp_s = student_logprobs(views, batch)
        mask = batch.response_mask.bool()
        nll = -gather_ids(lp_s, batch.response_ids, mask)
        loss = masked_mean(nll, mask, self.reduction)
        with torch.no_grad():
            metrics = {
                "loss": float(loss),
                "nll": float(masked_mean(nll, mask, self.reduction)),
                "student_entropy": float(masked_mean(entropy(lp_s), mask, self.reduction)),
            }
        return loss, metrics
