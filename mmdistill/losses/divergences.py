"""Divergences between next-token distributions, as pure functions of log-probs.

Inputs are ``[..., V]`` log-prob tensors (log_softmax outputs); outputs are per-position
``[...]`` values, reduced later by ``masked_mean`` so that every objective shares one notion of
"mean over response tokens". Gradient flows into whichever argument requires it: callers detach
targets themselves, which keeps self-distillation (target = the student's own view) explicit.

Vocabulary entries with log-prob ``-inf`` (exact zeros, e.g. masked-out tokens) must add 0 to a
sum and 0 to its gradient. ``0 * -inf`` is NaN in floating point, and ``torch.where`` alone does
not help because the discarded branch's NaN still leaks into the backward pass, so the helpers
below replace ``-inf`` operands by a harmless 0 *before* the arithmetic and select afterwards.
"""
from __future__ import annotations

import math

import torch

from mmdistill.losses.chunked import reduction_weights

NEG_INF = float("-inf")


def _absent(lp: torch.Tensor) -> torch.Tensor:
    return lp == NEG_INF


def none_absent(*lps: torch.Tensor) -> bool:
    """Whether these are CPU tensors without a -inf entry, so that a function of them may skip its
    masks (see _without_absent); always False on an accelerator."""
    return all(lp.device.type == "cpu" and (lp.numel() == 0 or bool(lp.detach().amin() != NEG_INF))
               for lp in lps)


def _without_absent(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lp with its -inf entries as 0, where they are), or (lp, None) for a CPU tensor without any.

    On the CPU a boolean mask over the vocabulary and each `where` that reads it cost 2-4 times an
    exp over the same entries (vocabulary 49,152: OPD's closed-form reverse KL took 219 ms per 512
    positions with them, 44 without), and log-probs of finite logits have no -inf: one min over
    the tensor says so. The values are the same bit for bit; a gradient that sums more than two
    uses of lp may add them in another order. On an accelerator that min would stop the host once
    per chunk, while the masks are cheap, so they are always built there."""
    if none_absent(lp):
        return lp, None
    return _masked(lp)


def _masked(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lp with its -inf entries as 0, where they are): what every device did before the CPU's
    mask-free path, and what an accelerator always does."""
    absent = _absent(lp)
    return lp.masked_fill(absent, 0.0), absent


def _zero_at(absent: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if absent is None else torch.where(absent, torch.zeros_like(x), x)


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q): entries with p = 0 contribute nothing; p > 0 = q gives +inf, as it should."""
    a, absent = _without_absent(lp_p)
    return _zero_at(absent, a.exp() * (a - lp_q)).sum(-1)


def reverse_kl(lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """KL(p_s || p_t) over the full vocabulary: mode-seeking, the on-policy distillation target."""
    return _kl(lp_s, lp_t)


def reverse_kl_and_grad(lp_s: torch.Tensor, lp_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reverse_kl(lp_s, lp_t), its gradient in the student's logits), in closed form:
    d KL / d z_k = p_k (log p_k - log q_k - KL), where lp_s = log_softmax(z). The same sums as
    reverse_kl and the same gradient autograd takes through log_softmax and it, in about half
    the passes over the vocabulary (chunked.token_loss's `closed_form`)."""
    a, absent = _without_absent(lp_s)
    p = a.exp()
    d = a - lp_t
    kl = _zero_at(absent, p * d).sum(-1)
    return kl, _zero_at(absent, p * (d - kl.unsqueeze(-1)))


def forward_kl(lp_t: torch.Tensor, lp_s: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s): mass-covering; infinite where the teacher has support the student lacks."""
    return _kl(lp_t, lp_s)


def entropy_and_reverse_kls(lp_s: torch.Tensor,
                            lp_targets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(entropy(lp_s), [reverse_kl(lp_s, t) for t in lp_targets]) with p_s exponentiated once:
    the same sums as the separate functions, for diagnostics over the full vocabulary."""
    a, absent = _without_absent(lp_s)
    p = a.exp()
    h = -(p * a).sum(-1)  # 1 * 0 where absent, as in entropy()
    return h, [_zero_at(absent, p * (a - t)).sum(-1) for t in lp_targets]


def entropy(lp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats; zeros contribute 0 (the p log p -> 0 limit): a -inf filled with 0
    gives exp(0) * 0 = 0 exactly, and masked_fill passes no gradient there."""
    safe, _ = _without_absent(lp)
    return -(safe.exp() * safe).sum(-1)


def _renormalise(gathered: torch.Tensor) -> torch.Tensor:
    """log_softmax over the kept ids; a row with no mass there stays all -inf, without NaN.

    That happens when the ids come from the other side (e.g. the teacher's top-k where the
    student has no mass); the row then adds 0 (student side) or +inf (target side) to the KL.
    """
    empty = _absent(gathered).all(-1, keepdim=True)
    safe = gathered.masked_fill(empty, 0.0)
    out = safe - torch.logsumexp(safe, dim=-1, keepdim=True)
    return out.masked_fill(empty, NEG_INF)


def topk_reverse_kl(
    lp_s: torch.Tensor, lp_t: torch.Tensor, k: int, index_from: str = "student"
) -> torch.Tensor:
    """Reverse KL restricted to k ids and renormalised on them (both sides), the cheap estimator.

    The ids are the top-k of the student (default: where the student actually puts its mass,
    which is what reverse KL weighs) or of the teacher. They are picked without gradient; only
    the gathered values carry it. k >= V is the full vocabulary.
    """
    if index_from not in ("student", "teacher"):
        raise ValueError(f"index_from must be 'student' or 'teacher', got {index_from!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = min(k, lp_s.shape[-1])
    with torch.no_grad():
        # a set: its order is not needed
        ids = (lp_s if index_from == "student" else lp_t).detach().topk(k, dim=-1, sorted=False).indices
    s = _renormalise(lp_s.gather(-1, ids))
    t = _renormalise(lp_t.gather(-1, ids))
    return _kl(s, t)


def _kl_to_mixture(lp_a: torch.Tensor, lp_b: torch.Tensor, w_a: float, w_b: float) -> torch.Tensor:
    """KL(p_a || w_a p_a + w_b p_b) for w_a, w_b in (0, 1).

    Written with log(m / p_a) = logaddexp(log w_a, log w_b + lp_b - lp_a) rather than
    lp_a - log m: when w_b is tiny the two terms of lp_a - log m cancel to ~w_b and float32
    rounding of lp_a alone (~1e-7 * |lp_a|) would swamp it, which matters because the
    generalized JSD divides this term by w_b.
    """
    a, absent = _without_absent(lp_a)
    log_ratio = torch.logaddexp(
        torch.full_like(a, math.log(w_a)), math.log(w_b) + (lp_b - a)
    )
    return _zero_at(absent, -a.exp() * log_ratio).sum(-1)


# How the generalized JSD is scaled for beta in (0, 1); the ends are forward / reverse KL either way.
JSD_SCALES = ("continuous", "unscaled")


def generalized_jsd(lp_s: torch.Tensor, lp_t: torch.Tensor, beta: float, scale: str = "continuous") -> torch.Tensor:
    """GKD's generalized JSD; by default rescaled so that it is continuous in beta on [0, 1].

    With m = beta p_t + (1 - beta) p_s, TRL/GKD use beta KL(p_t||m) + (1 - beta) KL(p_s||m),
    which tends to 0 at both ends while the special cases beta = 0 / 1 are forward / reverse KL:
    a jump. Dividing by beta (1 - beta) gives KL(p_t||m)/(1 - beta) + KL(p_s||m)/beta, whose
    limits are exactly KL(p_t||p_s) at beta -> 0 and KL(p_s||p_t) at beta -> 1 (the other term
    vanishes like beta resp. 1 - beta), so a beta sweep moves smoothly between the two.
    At beta = 0.5 it is 4x the standard Jensen-Shannon divergence, and 4x TRL's value.

    scale="unscaled" is TRL's `generalized_jsd_loss` and the AR-OPD release's
    `_compute_distillation_kl` term for term, so their learning rates and loss curves compare
    one to one. It is NOT continuous at either end: it goes to 0 as beta -> 0 or 1 (unless the
    two distributions are equal) while the ends themselves are the KLs, as in both references.
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if scale not in JSD_SCALES:
        raise ValueError(f"scale must be one of {list(JSD_SCALES)}, got {scale!r}")
    if beta == 0.0:
        return forward_kl(lp_t, lp_s)
    if beta == 1.0:
        return reverse_kl(lp_s, lp_t)
    kl_t = _kl_to_mixture(lp_t, lp_s, beta, 1.0 - beta)
    kl_s = _kl_to_mixture(lp_s, lp_t, 1.0 - beta, beta)
    if scale == "unscaled":
        return beta * kl_t + (1.0 - beta) * kl_s
    return kl_t / (1.0 - beta) + kl_s / beta


def js(lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """Standard symmetric Jensen-Shannon, (KL(p_s||m) + KL(p_t||m)) / 2 with m the midpoint.

    Bounded by log 2 and finite for any supports, which is why DOPD uses it on the tokens where
    the teacher is far ahead of the student.
    """
    return 0.5 * (_kl_to_mixture(lp_s, lp_t, 0.5, 0.5) + _kl_to_mixture(lp_t, lp_s, 0.5, 0.5))


def sampled_token_pg(
    lp_s: torch.Tensor, lp_t: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-sample reverse KL on the rollout's own tokens, as a policy-gradient surrogate.

    With y ~ p_s and A = log p_t(y) - log p_s(y) held constant, E_y[-A grad log p_s(y)] equals
    grad KL(p_s||p_t) exactly (the score-function term of the p_s weights; the other term has
    zero mean), so one gathered log-prob per token replaces the vocabulary sum. Returns
    (surrogate, kl_estimate); the estimate -A is detached and only for logging.
    """
    idx = ids.unsqueeze(-1)
    ls = lp_s.gather(-1, idx).squeeze(-1)
    lt = lp_t.gather(-1, idx).squeeze(-1)
    advantage = (lt - ls).detach()
    return -advantage * ls, -advantage


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduction: str = "seq") -> torch.Tensor:
    """Mean of per-token values over response tokens.

    "seq": mean within each sequence, then over sequences that have a token, so long rollouts do
    not outweigh short ones (the papers' reduction). "token": one mean over all tokens.
    Padding is removed with torch.where, so whatever sits there (inf, NaN from padded positions)
    reaches neither the value nor the gradient; an empty mask gives a 0 still attached to x.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    weight = reduction_weights(mask, reduction, dtype=x.dtype)
    return (torch.where(mask, x, torch.zeros_like(x)) * weight).sum()
