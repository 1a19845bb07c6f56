"""On-policy distillation: reverse KL from the student to a target view, on student rollouts.

One class covers vanilla OPD (target "teacher_plain") and full / partial privileged OPD
(targets "teacher_full" / "teacher_partial"): only the context of the target view differs.
"""
from __future__ import annotations

import torch

from mmdistill.batch import VIEWS, Batch, ViewLogprobs
from mmdistill.divergences import (
    entropy,
    masked_mean,
    reverse_kl,
    sampled_token_pg,
    topk_reverse_kl,
)
from mmdistill.methods.base import check_reduction, choice, safe_ids, student_logprobs

ESTIMATORS = ("sampled", "topk", "full")
TOPK_FROM = ("student", "teacher")
TARGETS = tuple(v for v in VIEWS if v != "student")

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
    ):
        self.estimator = choice("estimator", estimator, ESTIMATORS)
        self.target = choice("target", target, TARGETS)
        self.reduction = check_reduction(reduction)
        self.topk_from = choice("topk_from", topk_from, TOPK_FROM)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        self.topk = topk
        self.views = ("student", target)

    def loss(self, views: ViewLogprobs, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        lp_s = student_logprobs(views, batch)
        lp_t = views[self.target].detach()
        if lp_t.shape != lp_s.shape:
            raise ValueError(
                f"{self.target} log-probs {tuple(lp_t.shape)} differ from student {tuple(lp_s.shape)}"
            )
        mask = batch.response_mask.bool()
        # Adapters may fill padded rows of a view with -inf or NaN; torch.where in masked_mean
        # hides them from the value but 0 * inf in the backward pass would still reach the student.
        lp_t = lp_t.masked_fill(~mask.unsqueeze(-1), 0.0)
        ids = safe_ids(batch.response_ids, mask)
        surrogate, kl_sampled = sampled_token_pg(lp_s, lp_t, ids)
        if self.estimator == "sampled":
            per_token = surrogate
        elif self.estimator == "topk":
            per_token = topk_reverse_kl(lp_s, lp_t, self.topk, index_from=self.topk_from)
        else:
            per_token = reverse_kl(lp_s, lp_t)
        loss = masked_mean(per_token, mask, self.reduction)

        def mean(x: torch.Tensor) -> float:
            return float(masked_mean(x, mask, self.reduction))

        with torch.no_grad():
            lp_s_ = lp_s.detach()
            metrics = {
                "loss": float(loss),
                "reverse_kl": mean(reverse_kl(lp_s_, lp_t)),
                "sampled_reverse_kl": mean(kl_sampled),
                "student_entropy": mean(entropy(lp_s_)),
                "teacher_entropy": mean(entropy(lp_t)),
            }
        return loss, metrics
