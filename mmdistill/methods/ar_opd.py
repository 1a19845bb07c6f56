"""AR-OPD: Anchored Residual On-Policy Distillation (arXiv 2606.10385).

The target is anchored on the partially privileged teacher view qP and moved towards the
fully privileged view qF by a bounded residual, per response position (T = temperature):

    lF = log_softmax(z_full / T);  lP = log_softmax(z_partial / T)
    r  = clamp(lF - lP, -c, +c)
    log_target = log_softmax(lP + lam * r)

lam = 0 is partial privileged OPD, lam = 1 without the clip is full privileged OPD, lam > 1
extrapolates. lam defaults to 0.8, the paper's setting and the release's main-experiment config
(its code falls back to 1.0, which with the clip is full OPD with a bounded residual, not the
method). The loss is a divergence between the target and pi_S(.|x), chosen by alpha:
0 forward KL(target || student) (the release's default), 1 reverse KL(student || target), in
between the generalized JSD of mmdistill.divergences (beta = alpha): `jsd_scale` "continuous"
(default) is continuous at both ends so an alpha sweep is smooth, "unscaled" is the release's
term for term (alpha(1 - alpha) times smaller, and discontinuous at both ends). The two agree at
alpha 0 and 1, so the release's default run does not depend on it. The temperature applies to
the two teacher views only; the student is scored at T = 1.

The first `skip` response tokens of each sequence are dropped (the release skips 3): they
add neither value nor gradient, and the reduction weights are computed on the remaining
tokens, so "seq" is the mean over a sequence's kept tokens, then over the sequences. A response
no longer than `skip` keeps nothing: `empty_sequences` "exclude" (default) leaves it out of the
mean, so the loss of the others does not shrink with the number of short responses; "zero"
counts it as a 0, the release's batch mean (each sequence weighs 1/B).

Vocabulary entries with log-prob -inf (logits masked to -inf by the model or the adapter) never
produce NaN. The rule, per entry v, with the target built from the formula's limits:
  * clip on: r(v) is clamped, so lF(v) = -inf gives r = -c, and lP(v) = -inf keeps the target
    at -inf (the target's support is exactly the anchor's: the residual can reweight tokens qP
    allows, never add tokens it excludes);
  * clip off: lP + lam (lF - lP) = (1 - lam) lP + lam lF, a geometric interpolation. lam = 0
    gives exactly lP and lam = 1 exactly lF (support of qP resp. qF); any other lam leaves an
    entry present only where both views have it (for lam > 1 the formal +inf on entries that qF
    has and qP lacks is NOT used: extrapolation stays on the anchor's support).
  * if no entry survives (clip off, qP and qF with disjoint supports, lam not in {0, 1}), the
    target falls back to the anchor qP for that position.
A target with zero entries is fine for alpha < 1 (forward KL and the generalized JSD stay
finite); alpha = 1 (reverse KL) is +inf there wherever the student has mass, exactly as OPD is
against such a view. Diagnostics are honest about supports too: KL(qF || qP) is +inf where qF
has mass qP lacks.
"""
from __future__ import annotations

import math

import torch

from mmdistill.core.batch import Batch, SparseLogProbs, ViewLogits
from mmdistill.losses.chunked import EMPTY_SEQUENCES, reduction_weights, token_loss
from mmdistill.losses.divergences import JSD_SCALES, entropy, forward_kl, generalized_jsd, none_absent
from mmdistill.methods.base import (
    check_chunk_size,
    check_reduction,
    choice,
    student_logits,
    target_logits,
    weighted_means,
)
from mmdistill.methods.options import AR_OPD_SERVED as SERVED_REFUSAL

NEG_INF = float("-inf")
TOP_OVERLAP_K = 16


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def anchored_residual_target(
    lp_full: torch.Tensor, lp_partial: torch.Tensor, lam: float, clip: float | None
) -> torch.Tensor:
    """log_softmax(lP + lam * clamp(lF - lP, -clip, clip)) over the last dim, -inf safe.

    lp_full, lp_partial: [..., V] log-probs (already at the temperature). clip None or <= 0:
    no clip. See the module docstring for entries that are -inf in either view.
    """
    if none_absent(lp_full, lp_partial):  # no entry to mask: the same numbers, without the masks
        r = lp_full - lp_partial
        return torch.log_softmax(lp_partial + lam * (r if clip is None or clip <= 0 else r.clamp(-clip, clip)), dim=-1)
    absent_p = lp_partial == NEG_INF
    absent_f = lp_full == NEG_INF
    safe_p = lp_partial.masked_fill(absent_p, 0.0)
    safe_f = lp_full.masked_fill(absent_f, 0.0)
    r = safe_f - safe_p  # exact where both views have the entry
    neg_inf = torch.full_like(safe_p, NEG_INF)
    if clip is not None and clip > 0:
        r = r.clamp(-clip, clip).masked_fill(absent_f, -clip)  # lF - lP = -inf clamps to -c
        logits = torch.where(absent_p, neg_inf, safe_p + lam * r)
    else:
        logits = torch.where(absent_p | absent_f, neg_inf, safe_p + lam * r)
        if lam == 0.0:  # exactly the anchor: 0 * (lF - lP) = 0 even where lF = -inf
            logits = torch.where(absent_p, neg_inf, safe_p)
        elif lam == 1.0:  # exactly the full view: lP + (lF - lP) = lF even where lP = -inf
            logits = torch.where(absent_f, neg_inf, torch.where(absent_p, safe_f, logits))
    empty = (logits == NEG_INF).all(-1, keepdim=True)
    logits = torch.where(empty, lp_partial, logits)
    return torch.log_softmax(logits, dim=-1)


def _top_overlap(lp_a: torch.Tensor, lp_b: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, lp_a.shape[-1])
    a = lp_a.topk(k, dim=-1, sorted=False).indices
    b = lp_b.topk(k, dim=-1, sorted=False).indices
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    return shared.to(torch.float32) / k


def skip_mask(mask: torch.Tensor, skip: int) -> torch.Tensor:
    """mask without the first `skip` True positions of each row (wherever the row starts)."""
    mask = mask.bool()
    if skip <= 0:
        return mask
    return mask & (mask.long().cumsum(-1) > skip)


class AROPD:
    """Anchored residual target from (teacher_full, teacher_partial); divergence to the student."""

    name = "ar_opd"
    on_policy = True
    views = ("student", "teacher_full", "teacher_partial")

    def __init__(
        self,
        lam: float = 0.8,
        clip: float | None = 5.0,
        alpha: float = 0.0,
        skip: int = 3,
        temperature: float = 1.0,
        reduction: str = "seq",
        chunk_size: int | None = None,
        jsd_scale: str = "continuous",
        empty_sequences: str = "exclude",
    ):
        self.lam = _number("lam", lam)
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if clip is not None:
            clip = _number("clip", clip)
        self.clip = clip if clip is not None and clip > 0 else None
        self.alpha = _number("alpha", alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be a non-negative int, got {skip!r}")
        self.skip = skip
        self.temperature = _number("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.reduction = check_reduction(reduction)
        self.chunk_size = check_chunk_size(chunk_size)
        self.jsd_scale = choice("jsd_scale", jsd_scale, JSD_SCALES)
        self.empty_sequences = choice("empty_sequences", empty_sequences, EMPTY_SEQUENCES)

    # -- per-token pieces (rows [C, V] of float32 log-probs at T = 1)

    def _tempered(self, lp: torch.Tensor) -> torch.Tensor:
        # lp = z - logsumexp(z), so log_softmax(lp / T) = log_softmax(z / T).
        return lp if self.temperature == 1.0 else torch.log_softmax(lp / self.temperature, dim=-1)

    def target(self, lp_full: torch.Tensor,
               lp_partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log_target, lF, lP) from T = 1 log-prob rows."""
        lf, lpp = self._tempered(lp_full), self._tempered(lp_partial)
        return anchored_residual_target(lf, lpp, self.lam, self.clip), lf, lpp

    def _divergence(self, ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        # generalized_jsd: beta 0 = forward KL(p_t || p_s), 1 = reverse KL(p_s || p_t), like alpha.
        return generalized_jsd(ls, lt, self.alpha, self.jsd_scale)

    def _per_token(self, ls: torch.Tensor, lt: torch.Tensor, lf: torch.Tensor, lpp: torch.Tensor) -> torch.Tensor:
        return self._divergence(ls, lt)

    def _diagnostics(self, ls: torch.Tensor, lt: torch.Tensor, lf: torch.Tensor,
                     lpp: torch.Tensor) -> dict[str, torch.Tensor]:
        kl_p_pi = forward_kl(lpp, ls)
        h_s = entropy(ls)
        return {
            "belief_shift": forward_kl(lf, lpp),  # KL(qF || qP)
            "anchor_drift": kl_p_pi,  # KL(qP || pi)
            "residual_uptake": kl_p_pi - forward_kl(lf, ls),  # KL(qP||pi) - KL(qF||pi)
            "top16_overlap": _top_overlap(ls, lf, TOP_OVERLAP_K),
            "entropy_gap": (entropy(lf) - h_s).abs(),
            "student_entropy": h_s,
            "target_entropy": entropy(lt),
        }

    def loss(self, views: ViewLogits, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = student_logits(views, batch)
        if isinstance(views["teacher_full"], SparseLogProbs):
            raise ValueError(SERVED_REFUSAL)
        full = target_logits(views, "teacher_full", s)
        partial = target_logits(views, "teacher_partial", s)
        kept = skip_mask(batch.response_mask, self.skip).to(s.device)
        weight = reduction_weights(kept, self.reduction, empty=self.empty_sequences).to(s.device)
        diag: dict[str, torch.Tensor] = {}
        loss = token_loss(self._per_token, s, [full, partial], weight, chunk_size=self.chunk_size,
                          diagnostics=self._diagnostics, diag_out=diag, prepare=self.target)
        # Diagnostics describe the tokens that were scored, so short responses never dilute them
        # (empty_sequences="zero" is about the loss's scale only).
        diag_weight = (weight if self.empty_sequences == "exclude"
                       else reduction_weights(kept, self.reduction).to(s.device))
        return loss, {"loss": float(loss.detach()), **weighted_means(diag, diag_weight)}
