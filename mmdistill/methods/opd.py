"""On-policy distillation: reverse KL from the student to a target view, on student rollouts.

One class covers vanilla OPD (target "teacher_plain") and full / partial privileged OPD
(targets "teacher_full" / "teacher_partial"): only the context of the target view differs.
"""
from __future__ import annotations

import torch

from mmdistill.core.batch import Batch, SparseLogProbs, ViewLogits
from mmdistill.losses.chunked import reduction_weights, token_loss
from mmdistill.losses.divergences import entropy, reverse_kl, reverse_kl_and_grad, sampled_token_pg, topk_reverse_kl
from mmdistill.losses.sparse import tail_buckets, teacher_topk
from mmdistill.methods.base import (
    TARGETS,
    TOPK_FROM,
    check_chunk_size,
    check_reduction,
    check_topk,
    choice,
    gather_at,
    safe_ids,
    served_target,
    student_logits,
    target_logits,
    weighted_means,
)

ESTIMATORS = ("sampled", "topk", "full")

class OPD:
    """Per-token reverse KL(pi_S || target), averaged over response tokens.

    estimator: "sampled" (policy gradient on the rollout token with advantage
    log p_t(y) - log p_s(y)), "topk" (renormalised over `topk` ids of `topk_from`), or "full".
    The full-vocabulary reverse KL is logged whatever the estimator, so runs are comparable.
    """

    name = "opd"
    on_policy = True

    def __init__(
        self,
        estimator: str = "full",
        topk: int = 128,
        target: str = "teacher_plain",
        reduction: str = "seq",
        topk_from: str = "student",
        chunk_size: int | None = None,
    ):
        self.estimator = choice("estimator", estimator, ESTIMATORS)
        self.target = choice("target", target, TARGETS)
        self.reduction = check_reduction(reduction)
        self.topk_from = choice("topk_from", topk_from, TOPK_FROM)
        self.topk, self.chunk_size = check_topk(topk), check_chunk_size(chunk_size)
        self.views = ("student", target)

    def _per_token(self, ls: torch.Tensor, lt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.estimator == "sampled":
            return sampled_token_pg(ls, lt, ids)[0]
        if self.estimator == "topk":
            return topk_reverse_kl(ls, lt, self.topk, index_from=self.topk_from)
        return reverse_kl(ls, lt)

    @staticmethod
    def _diagnostics(ls: torch.Tensor, lt: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"reverse_kl": reverse_kl(ls, lt), **OPD._diagnostics_besides_kl(ls, lt, ids)}

    @staticmethod
    def _diagnostics_besides_kl(ls: torch.Tensor, lt: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The full estimator's per-token loss is the reverse KL itself (values_out), so its
        diagnostics skip a second pass over the vocabulary for it."""
        return {
            "sampled_reverse_kl": gather_at(ls, ids) - gather_at(lt, ids),
            "student_entropy": entropy(ls),
            "teacher_entropy": entropy(lt),
        }

    def _per_token_sparse(self, ls: torch.Tensor, ids: torch.Tensor, tid: torch.Tensor, tlp: torch.Tensor,
                          tsampled: torch.Tensor) -> torch.Tensor:
        ls_b, lt_b, y_b = tail_buckets(ls, tid, tlp, tsampled, ids)
        if self.estimator == "sampled":
            return sampled_token_pg(ls_b, lt_b, y_b)[0]
        if self.estimator == "topk":
            return topk_reverse_kl(*teacher_topk(ls_b, lt_b, self.topk), self.topk, index_from="teacher")
        return reverse_kl(ls_b, lt_b)

    @staticmethod
    def _diagnostics_sparse(ls: torch.Tensor, ids: torch.Tensor, tid: torch.Tensor, tlp: torch.Tensor,
                            tsampled: torch.Tensor) -> dict[str, torch.Tensor]:
        """reverse_kl and teacher_entropy on the tail buckets: lower bounds of the full values."""
        ls_b, lt_b, y_b = tail_buckets(ls, tid, tlp, tsampled, ids)
        return {
            "reverse_kl": reverse_kl(ls_b, lt_b),
            "sampled_reverse_kl": gather_at(ls, ids) - tsampled,
            "student_entropy": entropy(ls),
            "teacher_entropy": entropy(lt_b),
        }

    def loss(self, views: ViewLogits, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = student_logits(views, batch)
        mask = batch.response_mask.bool()
        weight = reduction_weights(mask, self.reduction).to(s.device)
        ids = safe_ids(batch.response_ids, mask).to(s.device)
        diag: dict[str, torch.Tensor] = {}
        if isinstance(views[self.target], SparseLogProbs):
            t = served_target(views, self.target, s)
            loss = token_loss(self._per_token_sparse, s, [], weight, extras=[ids, t.ids, t.logprobs, t.sampled],
                              chunk_size=self.chunk_size, diagnostics=self._diagnostics_sparse, diag_out=diag)
            return loss, {"loss": float(loss.detach()), **weighted_means(diag, weight)}
        t = target_logits(views, self.target, s)
        if self.estimator == "full":
            diag["reverse_kl"] = torch.zeros(weight.shape, dtype=torch.float32, device=s.device)
            loss = token_loss(self._per_token, s, [t], weight, extras=[ids], chunk_size=self.chunk_size,
                              values_out=diag["reverse_kl"], diagnostics=self._diagnostics_besides_kl, diag_out=diag,
                              closed_form=_reverse_kl_and_grad)
        else:
            loss = token_loss(self._per_token, s, [t], weight, extras=[ids], chunk_size=self.chunk_size,
                              diagnostics=self._diagnostics, diag_out=diag)
        return loss, {"loss": float(loss.detach()), **weighted_means(diag, weight)}


def _reverse_kl_and_grad(ls: torch.Tensor, lt: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reverse_kl_and_grad(ls, lt)
