"""GKD: generalized knowledge distillation (Agarwal et al., 2024).

Per token, the generalized JSD between the student and a target view with beta in [0, 1]
(mmdistill.divergences.generalized_jsd: 0 = forward KL(p_t || p_s), 1 = reverse KL(p_s || p_t)),
averaged over response tokens. `jsd_scale` "continuous" (default) divides TRL's value by
beta (1 - beta) so the loss is continuous at both ends of beta, which the method spec asks for and
a beta sweep needs; it is 4x TRL's at beta 0.5. "unscaled" is TRL's `generalized_jsd_loss`, for
runs that reuse a TRL recipe's learning rate and gradient clip or compare loss values with TRL.

`lam` is the fraction of on-policy batches. The method does not sample: the training loop reads
`on_policy_fraction`, draws per micro-batch whether to score student rollouts (probability lam)
or oracle responses, and sets `batch.on_policy`; the loss is the same function of the logits
either way, and the "on_policy" metric records which kind of batch it was.
"""
from __future__ import annotations

import math

import torch

from mmdistill.core.batch import Batch, SparseLogProbs, ViewLogits
from mmdistill.losses.chunked import reduction_weights, token_loss
from mmdistill.losses.divergences import JSD_SCALES, entropy, forward_kl, generalized_jsd, reverse_kl
from mmdistill.losses.sparse import tail_buckets
from mmdistill.methods.base import (
    TARGETS,
    check_chunk_size,
    check_reduction,
    choice,
    safe_ids,
    served_target,
    student_logits,
    target_logits,
    weighted_means,
)


def _unit(key: str, value) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0.0 <= value <= 1.0):
        raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
    return float(value)


class GKD:
    """Generalized JSD(beta) to a target view, on a mix of on-policy and oracle batches."""

    name = "gkd"

    def __init__(
        self,
        beta: float = 0.5,
        lam: float = 0.5,
        target: str = "teacher_plain",
        reduction: str = "seq",
        chunk_size: int | None = None,
        jsd_scale: str = "continuous",
    ):
        self.beta = _unit("beta", beta)
        self.lam = _unit("lam", lam)
        self.on_policy_fraction = self.lam
        self.on_policy = self.lam > 0  # the loop needs rollouts at all only if lam > 0
        self.target = choice("target", target, TARGETS)
        self.reduction = check_reduction(reduction)
        self.chunk_size = check_chunk_size(chunk_size)
        self.jsd_scale = choice("jsd_scale", jsd_scale, JSD_SCALES)
        self.views = ("student", target)

    def _per_token(self, ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        return generalized_jsd(ls, lt, self.beta, self.jsd_scale)

    @staticmethod
    def _diagnostics(ls: torch.Tensor, lt: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "reverse_kl": reverse_kl(ls, lt),
            "forward_kl": forward_kl(lt, ls),
            "student_entropy": entropy(ls),
            "teacher_entropy": entropy(lt),
        }

    def _sparse(self, fn):
        """fn on the tail buckets of a served teacher (losses/sparse.py): an approximation."""
        def on_buckets(ls, ids, tid, tlp, tsampled):
            ls_b, lt_b, _ = tail_buckets(ls, tid, tlp, tsampled, ids)
            return fn(ls_b, lt_b)
        return on_buckets

    def loss(self, views: ViewLogits, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = student_logits(views, batch)
        mask = batch.response_mask.bool().to(s.device)
        weight = reduction_weights(mask, self.reduction).to(s.device)
        diag: dict[str, torch.Tensor] = {}
        if isinstance(views[self.target], SparseLogProbs):
            t = served_target(views, self.target, s)
            ids = safe_ids(batch.response_ids.to(s.device), mask)
            loss = token_loss(self._sparse(self._per_token), s, [], weight, extras=[ids, t.ids, t.logprobs, t.sampled],
                              chunk_size=self.chunk_size, diagnostics=self._sparse(self._diagnostics), diag_out=diag)
        else:
            t = target_logits(views, self.target, s)
            loss = token_loss(self._per_token, s, [t], weight, chunk_size=self.chunk_size,
                              diagnostics=self._diagnostics, diag_out=diag)
        return loss, {
            "loss": float(loss.detach()),
            **weighted_means(diag, weight),
            "on_policy": 1.0 if batch.on_policy else 0.0,
        }
