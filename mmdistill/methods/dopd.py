"""DOPD: Dual On-policy Distillation (arXiv 2606.30626; no code released).

Each response token is routed by an advantage gap measured with the privileged information p
on BOTH sides. On the sampled token y_n:

    q_S = pi_S(y_n | x, p, y<n)    (view "student_priv", the student's own weights)
    q_T = pi_T(y_n | x, p, y<n)    (view "teacher_full")
    A_n = |log q_T - log q_S|

Thresholds are batch statistics over the batch's response tokens: mA, mS, mT, the trimmed
means (see `trimmed_mean`) of A, q_S and q_T (probabilities, not logs), each trimmed on its
own. The batch is the optimizer step's (threshold_scope="step", the paper's): every micro-batch
of gradient accumulation on every process; the training step gathers each micro-batch's
`token_statistics` and hands them to `fit` before any loss. threshold_scope="micro_batch"
routes each micro-batch on its own statistics (less memory: no micro-batch's privileged views
wait for the others). Every response token falls in exactly one regime:

    regime  condition                          loss on pi_S(.|x)                           weight
    HT      A >= mA and q_T >= q_S             JS(pi_S(.|x), pi_T(.|x,p)), full vocabulary  w_ht = 1
    LH      A <  mA and q_S + q_T >= mS + mT   top-K KL(pi_S(.|x) || pi_T(.|x,p))          beta_l
    HS      A >= mA and q_T <  q_S             top-K KL(pi_S(.|x) || sg pi_S(.|x,p))       beta_l
    LL      A <  mA and q_S + q_T <  mS + mT   top-K KL(pi_S(.|x) || sg pi_S(.|x,p))       beta_w

Ties go to the first row that matches: A == mA is "high", q_T == q_S is HT, and
q_S + q_T == mS + mT is LH. The loss is the per-token weighted regime term, reduced with the
usual reduction weights ((1/|y|) over each sequence, then the mean over the batch, for
reduction="seq"), with no per-regime renormalisation. A regime switched off (`regimes`) keeps
its tokens (routing and shares are unchanged) but they add nothing to the loss.

Variants (not in the paper; each an option, the paper's value the default): `self_mix` g < 1 aims
HS and LL at log_softmax(g log pi_S(.|x,p) + (1 - g) log pi_T(.|x,p)), a self target the teacher
corrects; `hs_rejected="teacher"` sends HS tokens the teacher rejects (q_T below mT) to HT instead of
to the self; `ht_divergence="reverse_kl"` makes HT a full-vocabulary reverse KL (JS is bounded by
log 2 and nearly flat where the two distributions barely overlap); `anchor` > 0 adds
anchor * KL(pi_S(.|x) || pi_init(.|x)) on every response token, to the initial student (view
student_init).

Cost, all chunked (chunked.py): a no-grad pass gathers q_S, q_T and computes the diagnostics
(routing needs the batch's q_S, q_T before any loss); the loss (one `token_loss` call) computes
for each token only its own regime's term, with gradient into views["student"] only, and hands
back each token's term for the loss_ht/lh/hs/ll metrics (`values_out`).
"""
from __future__ import annotations

import math

import torch

from mmdistill.core.batch import Batch, SparseLogProbs, ViewLogits
from mmdistill.losses.chunked import diagnosing, reduction_weights, token_loss, token_values
from mmdistill.losses.divergences import entropy, entropy_and_reverse_kls, js, reverse_kl, topk_reverse_kl
from mmdistill.losses.sparse import tail_buckets, teacher_topk
from mmdistill.methods.base import (
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
from mmdistill.methods.options import PAPER_DOPD

# Regime codes returned by `route` (-1 = not a response token).
HT, LH, HS, LL = 0, 1, 2, 3


REGIMES = ("ht", "lh", "hs", "ll")
THRESHOLDS = ("trimmed_mean", "mean")
SCOPES = ("step", "micro_batch")
ROUTINGS = ("advantage", "shuffled")
HS_REJECTED = ("self", "teacher")  # where HS tokens with q_T below mT go
HT_DIVERGENCES = ("js", "reverse_kl")
# The self target of HS/LL: the live student reading p (the paper), or the initial student, frozen.
SELF_TARGETS = {"live": "student_priv", "frozen": "student_init_priv"}
# Kinds of term, in the order of the per-token weight extras [B, N, 3 or 4]: JS (or reverse KL) to
# teacher_full (HT), top-K reverse KL to teacher_full (LH), top-K reverse KL to the self target (HS,
# LL), reverse KL to the initial student (the anchor, every token).
TERMS = ("ht_teacher", "topk_teacher", "topk_self", "anchor")
# self_kl and self_entropy watch the self target: KL(pi_S(.|x) || pi_S(.|x,p)) and the entropy of
# pi_S(.|x,p), the two numbers that say whether self-distillation is drifting or collapsing.
DIAGNOSTICS = ("reverse_kl", "student_entropy", "teacher_entropy", "self_kl", "self_entropy")


def _drop_count(n: int, trim: float) -> int:
    """floor(trim * n) with 1e-9 slack (0.29 * 100 is 28.999999999999996 in floats), < n."""
    return min(n - 1, math.floor(trim * n + 1e-9)) if n > 0 else 0


def trimmed_mean(values: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean after dropping the top outliers: sort ascending, drop the largest floor(trim * n)
    values, average the rest. When floor(trim * n) is 0 (small n) nothing is dropped; since
    trim < 1 at least one value is always kept. Computed in float64. values: 1-D, non-empty.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"trimmed_mean needs a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    n = values.numel()
    kept = values.double().sort().values[: n - _drop_count(n, trim)]
    return kept.mean()


def route(
    log_qs: torch.Tensor,
    log_qt: torch.Tensor,
    mask: torch.Tensor,
    trim: float = 0.05,
    threshold: str = "trimmed_mean",
    thresholds: tuple[float, float, float] | None = None,
    hs_rejected: str = "self",
) -> tuple[torch.Tensor, dict[str, float]]:
    """DOPD's routing of response tokens into regimes HT=0, LH=1, HS=2, LL=3.

    log_qs, log_qt: [B, N] log-probs of the sampled tokens under student_priv and
    teacher_full; mask: [B, N] response tokens. Masked positions get -1 and are never read
    (they may hold NaN or inf). threshold "trimmed_mean" drops the top `trim` fraction of each
    statistic (`trimmed_mean`); "mean" is the plain mean (trim ignored). Everything is compared
    in float64, so a token whose value equals the threshold is exactly on it. An empty mask
    routes nothing and reports 0 for every statistic. `thresholds`: (mA, mS, mT) of a larger
    batch these tokens belong to (`step_thresholds`), used instead of their own. hs_rejected
    "teacher" routes HS tokens whose q_T is below mT to HT (a variant, not the paper).

    stats: threshold_a, threshold_qs, threshold_qt (the thresholds mA, mS, mT), adv_gap (the
    untrimmed mean of A over the batch's response tokens), share_ht/lh/hs/ll (fractions of the
    batch's response tokens; they sum to 1 when there is any).
    """
    choice("threshold", threshold, THRESHOLDS)
    choice("hs_rejected", hs_rejected, HS_REJECTED)
    if log_qs.shape != log_qt.shape or log_qs.shape != mask.shape:
        raise ValueError(
            f"log_qs {tuple(log_qs.shape)}, log_qt {tuple(log_qt.shape)} and mask {tuple(mask.shape)} differ in shape"
        )
    mask = mask.bool()
    regime = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    stats = dict.fromkeys(
        ("threshold_a", "threshold_qs", "threshold_qt", "adv_gap", "share_ht", "share_lh", "share_hs", "share_ll"), 0.0
    )
    n = int(mask.sum())
    if n == 0:
        return regime, stats
    ls = torch.where(mask, log_qs.double(), torch.zeros_like(log_qs, dtype=torch.float64))
    lt = torch.where(mask, log_qt.double(), torch.zeros_like(log_qt, dtype=torch.float64))
    a = (lt - ls).abs()
    qs, qt = ls.exp(), lt.exp()
    if thresholds is None:
        m_a, m_s, m_t = step_thresholds(ls[mask], lt[mask], trim, threshold)
    else:
        m_a, m_s, m_t = (torch.tensor(float(v), dtype=torch.float64, device=a.device) for v in thresholds)
    high = a >= m_a
    teacher_ahead = qt >= qs
    confident = qs + qt >= m_s + m_t
    codes = torch.where(
        high,
        torch.where(teacher_ahead, HT, HS),
        torch.where(confident, LH, LL),
    )
    if hs_rejected == "teacher":
        codes = torch.where((codes == HS) & (qt < m_t), HT, codes)
    regime = torch.where(mask, codes, regime)
    stats.update(
        threshold_a=float(m_a),
        threshold_qs=float(m_s),
        threshold_qt=float(m_t),
        adv_gap=float(a[mask].mean()),
    )
    for code, name in enumerate(REGIMES):
        stats[f"share_{name}"] = int((regime == code).sum()) / n
    return regime, stats


def step_thresholds(log_qs: torch.Tensor, log_qt: torch.Tensor, trim: float = 0.05,
                    threshold: str = "trimmed_mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mA, mS, mT) over 1-D log q_S, log q_T of a batch's response tokens (float64)."""
    choice("threshold", threshold, THRESHOLDS)
    ls, lt = log_qs.double(), log_qt.double()
    cut = trim if threshold == "trimmed_mean" else 0.0
    return tuple(trimmed_mean(v, cut) for v in ((lt - ls).abs(), ls.exp(), lt.exp()))


def shuffle_regimes(regime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same regime labels dealt to the batch's response tokens (regime >= 0) in a random order:
    each regime keeps its share, no token keeps its reason. The ablation that asks whether the
    advantage routing, rather than the mix of terms, is what helps (or hurts)."""
    flat = regime.reshape(-1).clone()
    where = (flat >= 0).nonzero().squeeze(-1)
    order = torch.randperm(where.numel(), generator=generator, device="cpu").to(flat.device)
    flat[where] = flat[where][order]
    return flat.reshape(regime.shape)


def _weight(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _regimes(value) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    for v in items:
        if v not in REGIMES:
            raise ValueError(f"regimes must be drawn from {list(REGIMES)}, got {v!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"regimes lists a regime twice: {items}")
    return tuple(items)


class DOPD:
    """Dual on-policy distillation: per-token routing between teacher and self targets.

    beta_l: weight of LH and HS; beta_w: weight of LL; w_ht: weight of HT (1 in the paper, exposed
    for ablations). self_mix, hs_rejected, ht_divergence, anchor: the variants in the module
    docstring (1.0, "self", "js", 0.0: the paper). topk: K of the top-K reverse KLs; topk_from:
    whose top-K ids, "student" (of pi_S(.|x), both sides renormalised on them) or "teacher" (of the
    target side: teacher_full for LH, student_priv for HS/LL). trim, threshold: see `route`.
    regimes: the regimes that contribute (ablation: a regime left out adds nothing). chunk_size: see
    chunked.token_loss (None = automatic). self_target: "live" (the paper: sg pi_S(.|x,p) of the
    current student, view student_priv) or "frozen" (not in the paper: the initial student reading
    p, view student_init_priv). It is also where q_S comes from. With the live target, a student can
    satisfy HS and LL by ceasing to read p, after which no term corrects its HS tokens
    (docs/experiments/scenes.md); a frozen target cannot follow the student there.
    """

    name = "dopd"
    on_policy = True
    views = ("student", "student_priv", "teacher_full")

    def __init__(
        self,
        beta_l: float = 0.6,
        beta_w: float = 0.3,
        topk: int = 128,
        topk_from: str = "student",
        trim: float = 0.05,
        threshold: str = "trimmed_mean",
        reduction: str = "seq",
        chunk_size: int | None = None,
        w_ht: float = 1.0,
        regimes=REGIMES,
        routing: str = "advantage",
        self_target: str = "live",
        threshold_scope: str = "step",
        self_mix: float = 1.0,
        hs_rejected: str = "self",
        ht_divergence: str = "js",
        anchor: float = 0.0,
        paper: bool = False,
    ):
        if paper:
            self_mix, hs_rejected, ht_divergence, anchor = (PAPER_DOPD[k] for k in (
                "self_mix", "hs_rejected", "ht_divergence", "anchor"))
        self.beta_l, self.beta_w, self.w_ht = (_weight("beta_l", beta_l), _weight("beta_w", beta_w),
                                               _weight("w_ht", w_ht))
        if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= trim < 1.0:
            raise ValueError(f"trim must be a number in [0, 1), got {trim!r}")
        self.topk, self.trim = check_topk(topk), float(trim)
        self.topk_from = choice("topk_from", topk_from, TOPK_FROM)
        self.threshold = choice("threshold", threshold, THRESHOLDS)
        self.reduction = check_reduction(reduction)
        self.regimes = _regimes(regimes)
        self.routing = choice("routing", routing, ROUTINGS)
        self.self_view = SELF_TARGETS[choice("self_target", self_target, tuple(SELF_TARGETS))]
        if isinstance(self_mix, bool) or not isinstance(self_mix, (int, float)) or not 0.0 <= self_mix <= 1.0:
            raise ValueError(f"self_mix must be a number in [0, 1], got {self_mix!r}")
        self.self_mix = float(self_mix)
        self.hs_rejected = choice("hs_rejected", hs_rejected, HS_REJECTED)
        self.ht_divergence = choice("ht_divergence", ht_divergence, HT_DIVERGENCES)
        self.anchor = _weight("anchor", anchor)
        self.views = ("student", self.self_view, "teacher_full") + (("student_init",) if self.anchor else ())
        self.chunk_size = check_chunk_size(chunk_size)
        self.threshold_scope = choice("threshold_scope", threshold_scope, SCOPES)
        self.statistics_views = (self.self_view, "teacher_full")
        self.thresholds: tuple[float, float, float] | None = None  # the step's, set by `fit`
        variant = {k: v for k, v in (("self_mix", self.self_mix), ("hs_rejected", self.hs_rejected),
                                     ("ht_divergence", self.ht_divergence), ("anchor", self.anchor))
                   if v != PAPER_DOPD[k]}
        named = ", ".join(f"{k}={v}" for k, v in variant.items())
        # said once at the start of a run (setup.py): the benchmark's rule did not make DOPD the default
        what = (f"a variant of the paper's DOPD ({named}; method.dopd.paper=true for the paper's)" if variant
                else "the paper's DOPD")
        self.caveat = (f"method=dopd is {what}: not shown to beat full privileged OPD on the project's benchmarks "
                       "(docs/experiments/gap.md)")

    # ------------------------------------------------------------ the step's thresholds

    @property
    def step_statistics(self) -> bool:
        """Whether routing reads statistics of the whole optimizer step (see `fit`)."""
        return self.threshold_scope == "step"

    def token_statistics(self, views: ViewLogits, batch: Batch) -> dict[str, torch.Tensor]:
        """log q_S and log q_T of this micro-batch's response tokens, 1-D in mask order: what the
        step's thresholds are computed from. Reads only `statistics_views` (no gradient)."""
        mask = batch.response_mask.bool()
        return {k: v[mask.to(v.device)] for k, v in self._sampled_logprobs(views, batch).items()}

    def _sampled_logprobs(self, views: ViewLogits, batch: Batch) -> dict[str, torch.Tensor]:
        """[B, N] log q_S and log q_T of the sampled tokens (0 off the response), from the two
        statistics views alone: routing's inputs, without the student's view or any diagnostic."""
        p = views[self.self_view].detach()
        mask = batch.response_mask.bool().to(p.device)
        ids = safe_ids(batch.response_ids.to(p.device), mask)
        zero = torch.zeros(mask.shape, device=p.device)
        if isinstance(views["teacher_full"], SparseLogProbs):
            t = served_target(views, "teacher_full", p)
            got = token_values(lambda lp, i: {"log_qs": gather_at(lp, i)}, p, [], mask, extras=[ids],
                               chunk_size=self.chunk_size)
            return {"log_qs": got.get("log_qs", zero), "log_qt": torch.where(mask, t.sampled.float(), zero)}
        t = target_logits(views, "teacher_full", p)
        got = token_values(lambda lp, lt, i: {"log_qs": gather_at(lp, i), "log_qt": gather_at(lt, i)}, p, [t], mask,
                           extras=[ids], chunk_size=self.chunk_size)
        return {k: got.get(k, zero) for k in ("log_qs", "log_qt")}

    def fit(self, statistics: dict[str, torch.Tensor] | None) -> None:
        """The step's thresholds from every micro-batch's `token_statistics` on every process,
        concatenated; every micro-batch of the step is then routed by them. None: the step is a
        single micro-batch, routed by its own statistics."""
        if statistics is None or statistics["log_qs"].numel() == 0:
            self.thresholds = None
            return
        found = step_thresholds(statistics["log_qs"], statistics["log_qt"], self.trim, self.threshold)
        self.thresholds = tuple(float(v) for v in found)

    # ------------------------------------------------------------ per-regime weights

    def regime_weights(self, regime: torch.Tensor) -> torch.Tensor:
        """[B, N] regime codes -> [B, N, 3] float32 weights of the kinds of term (TERMS), [B, N, 4]
        with the anchor."""
        on = {r: (r in self.regimes) for r in REGIMES}
        w = torch.zeros(*regime.shape, 4 if self.anchor else 3, dtype=torch.float32, device=regime.device)
        w[..., 0] = (regime == HT).float() * (self.w_ht if on["ht"] else 0.0)
        w[..., 1] = (regime == LH).float() * (self.beta_l if on["lh"] else 0.0)
        w[..., 2] = (regime == HS).float() * (self.beta_l if on["hs"] else 0.0) + (regime == LL).float() * (
            self.beta_w if on["ll"] else 0.0
        )
        if self.anchor:
            w[..., 3] = (regime >= 0).float() * self.anchor
        return w

    # ------------------------------------------------------------ per-token functions

    def self_target(self, lp: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        """Log-probs of HS and LL's target: the self (lp), or its geometric mix with the teacher."""
        if self.self_mix == 1.0:
            return lp
        return torch.log_softmax(self.self_mix * lp + (1.0 - self.self_mix) * lt, dim=-1)

    def _terms(self, ls: torch.Tensor, lt: torch.Tensor, lp: torch.Tensor, li: torch.Tensor,
               which: int) -> torch.Tensor:
        if which == 0:
            return js(ls, lt) if self.ht_divergence == "js" else reverse_kl(ls, lt)
        if which == 3:
            return reverse_kl(ls, li)
        target = lt if which == 1 else self.self_target(lp, lt)
        return topk_reverse_kl(ls, target, self.topk, index_from=self.topk_from)

    def _weighted_terms(self, ls: torch.Tensor, lt: torch.Tensor, lp: torch.Tensor, li: torch.Tensor,
                        w: torch.Tensor) -> list[torch.Tensor]:
        """[w[:, j] * term_j for each kind j of TERMS], each computed only on the rows where
        w[:, j] != 0 and 0 elsewhere: a row whose weights are all 0 is never computed, so it
        gives exactly 0 and a zero gradient (and no NaN) whatever its log-probs."""
        w = w.to(ls.dtype)
        out = []
        for j in range(w.shape[-1]):
            col = ls[..., :0].sum(-1)  # zeros still attached to ls: a chunk of all-zero rows backpropagates 0
            rows = (w[:, j] != 0).nonzero().squeeze(-1)
            if rows.numel():
                # index_select, not x[rows]: the same rows, in half the time and a third of the backward on the CPU
                ls_j, lt_j, lp_j, li_j = (x.index_select(0, rows) for x in (ls, lt, lp, li))
                col = col.index_add(0, rows, w[rows, j] * self._terms(ls_j, lt_j, lp_j, li_j, j))
            out.append(col)
        return out

    def _per_token_sparse(self, ls: torch.Tensor, lp: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """A served teacher_full: HT on the tail buckets (losses/sparse.py), LH over the first topk of
        the teacher's ids; the self terms and the anchor as with a local teacher (self_mix is 1)."""
        li, w, y, tid, tlp, tsampled = rest if len(rest) == 6 else (ls, *rest)
        ls_b, lt_b, _ = tail_buckets(ls, tid, tlp, tsampled, y)
        w = w.to(ls.dtype)
        total = ls[..., :0].sum(-1)
        for j in range(w.shape[-1]):
            rows = (w[:, j] != 0).nonzero().squeeze(-1)
            if not rows.numel():
                continue
            if j == 0:
                term = (js if self.ht_divergence == "js" else reverse_kl)(ls_b[rows], lt_b[rows])
            elif j == 1:
                term = topk_reverse_kl(*teacher_topk(ls_b[rows], lt_b[rows], self.topk), self.topk,
                                       index_from="teacher")
            else:
                term = self._terms(*(x.index_select(0, rows) for x in (ls, lp, lp, li)), j)
            total = total.index_add(0, rows, w[rows, j] * term)
        return total

    def _first_pass_sparse(self, ls: torch.Tensor, lp: torch.Tensor, ids: torch.Tensor, tid: torch.Tensor,
                           tlp: torch.Tensor, tsampled: torch.Tensor) -> dict[str, torch.Tensor]:
        """As _first_pass; reverse_kl and teacher_entropy on the tail buckets (lower bounds)."""
        ls_b, lt_b, _ = tail_buckets(ls, tid, tlp, tsampled, ids)
        h_s, (kl_p,) = entropy_and_reverse_kls(ls, [lp])
        return {"log_qs": gather_at(lp, ids), "log_qt": tsampled.float(), "reverse_kl": reverse_kl(ls_b, lt_b),
                "student_entropy": h_s, "teacher_entropy": entropy(lt_b), "self_kl": kl_p,
                "self_entropy": entropy(lp)}

    def _per_token(self, ls: torch.Tensor, lt: torch.Tensor, lp: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """rest: (the initial student's log-probs, the weights) with the anchor, else (the weights)."""
        li, w = rest if len(rest) == 2 else (ls, rest[0])
        return sum(self._weighted_terms(ls, lt, lp, li, w))

    def _first_pass(self, ls: torch.Tensor, lt: torch.Tensor, lp: torch.Tensor,
                    ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h_s, (kl_t, kl_p) = entropy_and_reverse_kls(ls, [lt, lp])
        return {
            "log_qs": gather_at(lp, ids),
            "log_qt": gather_at(lt, ids),
            "reverse_kl": kl_t,  # diagnostic: student vs teacher_full, full vocabulary
            "student_entropy": h_s,
            "teacher_entropy": entropy(lt),
            "self_kl": kl_p,
            "self_entropy": entropy(lp),
        }

    # ------------------------------------------------------------ loss

    def loss(self, views: ViewLogits, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = student_logits(views, batch)
        served = isinstance(views["teacher_full"], SparseLogProbs)
        t = served_target(views, "teacher_full", s) if served else target_logits(views, "teacher_full", s)
        if served and self.self_mix != 1.0:
            raise ValueError("method.dopd.self_mix < 1 mixes the teacher's full vocabulary into the self target; "
                             "a served teacher gives its top-k only")
        p = target_logits(views, self.self_view, s)  # stop-gradient: the student's own privileged view
        mask = batch.response_mask.bool().to(s.device)
        weight = reduction_weights(mask, self.reduction).to(s.device)
        ids = safe_ids(batch.response_ids.to(s.device), mask)
        zero = torch.zeros_like(weight)
        logged = diagnosing()

        # Pass 1 (no grad): q_S, q_T on the sampled tokens, and the diagnostics on a step that is logged.
        if not logged:
            first = self._sampled_logprobs(views, batch)
        elif served:
            first = token_values(self._first_pass_sparse, s.detach(), [p], mask,
                                 extras=[ids, t.ids, t.logprobs, t.sampled], chunk_size=self.chunk_size)
        else:
            first = token_values(self._first_pass, s.detach(), [t, p], mask, extras=[ids], chunk_size=self.chunk_size)
        regime, stats = route(first.get("log_qs", zero), first.get("log_qt", zero), mask, self.trim, self.threshold,
                              self.thresholds if self.step_statistics else None, self.hs_rejected)
        if self.routing == "shuffled":
            regime = shuffle_regimes(regime)
        w = self.regime_weights(regime)

        # The loss: one chunked pass, each token computing its own regime's term only. Tokens whose
        # regime adds nothing are left out of the chunks (the same sum, less work).
        active = torch.where(w.sum(-1) > 0, weight, zero)
        per_token = torch.zeros_like(weight)  # each token's weighted term: its regime's contribution
        if bool(active.any()):
            init = [target_logits(views, "student_init", s)] if self.anchor else []
            if served:
                loss = token_loss(self._per_token_sparse, s, [p] + init, active,
                                  extras=[w, ids, t.ids, t.logprobs, t.sampled], chunk_size=self.chunk_size,
                                  values_out=per_token)
            else:
                loss = token_loss(self._per_token, s, [t, p] + init, active, extras=[w], chunk_size=self.chunk_size,
                                  values_out=per_token)
        else:  # an empty sum: 0, attached to the graph, whatever padding rows hold (even NaN)
            loss = s.reshape(-1)[:0].sum().to(torch.promote_types(s.dtype, torch.float32))
        contributions = {f"loss_{name}": torch.where(regime == code, per_token, zero)
                         for code, name in enumerate(REGIMES)}
        diag = {k: first.get(k, zero) for k in DIAGNOSTICS} if logged else {}
        metrics = {"loss": float(loss.detach()), **stats, **weighted_means(diag, weight),
                   **weighted_means(contributions, weight)}
        return loss, metrics
