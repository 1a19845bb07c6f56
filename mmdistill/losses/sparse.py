"""Divergences against a teacher known only on a few ids (a served teacher's top-k and the
sampled token).

The approximation used for full-vocabulary terms ("tail"): both distributions are coarse-grained
onto the same partition of the vocabulary, {each known id} + {everything else}, and the exact
divergence is taken between the two coarse distributions. The teacher's tail mass is
1 - sum(known); the student's is its own mass outside the known ids, so the student is pulled
towards the teacher's total tail mass and never towards a guessed shape inside it. For any
f-divergence (KL either way, JS, generalized JSD) this is a lower bound of the full-vocabulary
value (data processing) and equals it when, inside the tail, the teacher is proportional to the
student; its gradient is that of the full divergence with the teacher's tail filled in that
proportion. The sampled token's log-prob and a top-K restricted to K <= k of the teacher's own
ids are exact.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")
# The teacher's tail mass is floored here: the server's known log-probs can sum to a hair over 1
# (rounding), and a zero tail would make the student's tail mass an infinite reverse KL.
TAIL_FLOOR = 1e-6


def tail_buckets(ls: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, sampled: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on k + 2 buckets: the k top ids (in the server's order),
    the sampled token when it is not among them (else -inf on both sides), the tail.

    ls: [C, V] student log-probs (gradient flows); ids, lps: [C, k] (id -1 = unknown);
    sampled: [C] log q_T(y); y: [C] sampled ids. Returns (ls_b, lt_b, y_b), y_b the sampled
    token's bucket."""
    valid = ids >= 0
    safe = ids.clamp(min=0)
    in_top = (safe == y.unsqueeze(-1)) & valid
    has_y = in_top.any(-1)
    s_top = ls.gather(-1, safe).masked_fill(~valid, NEG_INF)
    t_top = lps.to(ls.dtype).masked_fill(~valid, NEG_INF)
    s_y = ls.gather(-1, y.unsqueeze(-1)).squeeze(-1).masked_fill(has_y, NEG_INF)
    t_y = sampled.to(ls.dtype).masked_fill(has_y, NEG_INF)
    known = torch.zeros_like(ls, dtype=torch.long).scatter_add(-1, safe, valid.long()) > 0  # -1s add nothing
    known.scatter_(-1, y.unsqueeze(-1), True)
    s_tail = torch.logsumexp(ls.masked_fill(known, NEG_INF), dim=-1)
    t_known = torch.logsumexp(torch.cat([t_top, t_y.unsqueeze(-1)], -1), dim=-1)
    t_tail = torch.log((-torch.expm1(t_known.clamp(max=0.0))).clamp(min=TAIL_FLOOR))
    t_tail = t_tail.masked_fill(known.all(-1), NEG_INF)  # every id known: no tail on either side
    ls_b = torch.cat([s_top, s_y.unsqueeze(-1), s_tail.unsqueeze(-1)], -1)
    lt_b = torch.cat([t_top, t_y.unsqueeze(-1), t_tail.unsqueeze(-1)], -1)
    y_b = torch.where(has_y, in_top.float().argmax(-1), torch.full_like(y, ids.shape[-1]))
    return ls_b, lt_b, y_b


def teacher_topk(ls_b: torch.Tensor, lt_b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k buckets (the teacher's top-k ids, best first) of both sides: a top-K reverse
    KL over the teacher's ids renormalises on exactly these."""
    if k > ls_b.shape[-1] - 2:
        raise ValueError(f"top-K of {k} ids from a served teacher that returned {ls_b.shape[-1] - 2}")
    return ls_b[..., :k], lt_b[..., :k]


__all__ = ["TAIL_FLOOR", "tail_buckets", "teacher_topk"]
