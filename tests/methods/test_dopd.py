"""DOPD: routing on hand-built cases, trimmed means, and the loss against float64 loop references."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from mmdistill.core.batch import Batch
from mmdistill.losses.divergences import reverse_kl
from mmdistill.methods.dopd import DIAGNOSTICS, DOPD, HS, HT, LH, LL, route, shuffle_regimes, trimmed_mean
from tests.helpers import ref_reduce

B, N, V = 3, 6, 8
MASK = torch.tensor(
    [
        [True, True, True, True, True, True],
        [True, True, True, True, False, False],
        [True, True, True, False, False, False],
    ]
)
NAMES = ("ht", "lh", "hs", "ll")
ALL_REGIMES = 4  # a make_case seed whose tokens fall in all four regimes (3, 3, 4, 3)


# ---------------------------------------------------------------- brute-force references


def ref_trimmed_mean(values, trim):
    """Sorted Python list, drop the top floor(trim * n) values (exact rational floor), mean of the rest."""
    vals = sorted(float(v) for v in values)
    drop = math.floor(Fraction(str(trim)) * len(vals))
    kept = vals[: len(vals) - drop]
    return sum(kept) / len(kept)


def ref_route(lqs, lqt, mask, trim=0.05, hs_rejected="self"):
    """Regimes as nested lists (-1 off the mask), with plain Python floats. hs_rejected="teacher":
    HS tokens with q_T below its threshold are HT."""
    toks = [(b, n) for b in range(mask.shape[0]) for n in range(mask.shape[1]) if mask[b, n]]
    a = {bn: abs(float(lqt[bn]) - float(lqs[bn])) for bn in toks}
    qs = {bn: math.exp(float(lqs[bn])) for bn in toks}
    qt = {bn: math.exp(float(lqt[bn])) for bn in toks}
    m_a, m_s, m_t = (ref_trimmed_mean(d.values(), trim) for d in (a, qs, qt))
    out = [[-1] * mask.shape[1] for _ in range(mask.shape[0])]
    for bn in toks:
        if a[bn] >= m_a:
            teacher = qt[bn] >= qs[bn] or (hs_rejected == "teacher" and qt[bn] < m_t)
            out[bn[0]][bn[1]] = HT if teacher else HS
        else:
            out[bn[0]][bn[1]] = LH if qs[bn] + qt[bn] >= m_s + m_t else LL
    return out, (m_a, m_s, m_t)


def ref_js(ls, lt):
    total = ls.new_zeros(())
    for v in range(ls.shape[0]):
        p, q = torch.exp(ls[v]), torch.exp(lt[v])
        m = (p + q) / 2
        total = total + 0.5 * p * torch.log(p / m) + 0.5 * q * torch.log(q / m)
    return total


def ref_topk_rkl(ls, lt, k, topk_from):
    src = ls if topk_from == "student" else lt
    ids = sorted(range(ls.shape[0]), key=lambda v: -src[v].item())[:k]
    zp = sum(torch.exp(ls[v]) for v in ids)
    zq = sum(torch.exp(lt[v]) for v in ids)
    total = ls.new_zeros(())
    for v in ids:
        p, q = torch.exp(ls[v]) / zp, torch.exp(lt[v]) / zq
        total = total + p * torch.log(p / q)
    return total


def ref_kl(ls, lt):
    return sum(torch.exp(ls[v]) * (ls[v] - lt[v]) for v in range(ls.shape[0]))


def ref_loss(zs, zp, zt, ids, mask, k, topk_from="student", weights=(1.0, 0.6, 0.3), reduction="seq", trim=0.05,
             regimes=None, self_mix=1.0, hs_rejected="self", ht="js", anchor=0.0, zi=None):
    """(loss, grad w.r.t. student logits, regimes, per-regime contributions), all float64 loops.
    `regimes` (nested lists) replaces the routing, for the shuffled ablation. self_mix, hs_rejected,
    ht, anchor (to zi, the initial student's logits): the variants, each written out token by token."""
    w_ht, beta_l, beta_w = weights
    s64 = zs.double().requires_grad_(True)
    ls = torch.log_softmax(s64, -1)
    lp, lt = torch.log_softmax(zp.double(), -1), torch.log_softmax(zt.double(), -1)
    mixed = torch.log_softmax(self_mix * lp + (1 - self_mix) * lt, -1)
    li = torch.log_softmax(zi.double(), -1) if zi is not None else None
    lqs = torch.tensor([[lp[b, n, ids[b, n]].item() for n in range(mask.shape[1])] for b in range(mask.shape[0])])
    lqt = torch.tensor([[lt[b, n, ids[b, n]].item() for n in range(mask.shape[1])] for b in range(mask.shape[0])])
    if regimes is None:
        regimes, _ = ref_route(lqs, lqt, mask, trim, hs_rejected)
    per = {r: [[ls.new_zeros(()) for _ in range(mask.shape[1])] for _ in range(mask.shape[0])] for r in range(4)}
    for b in range(mask.shape[0]):
        for n in range(mask.shape[1]):
            r = regimes[b][n]
            if r == HT:
                per[r][b][n] = w_ht * (ref_js(ls[b, n], lt[b, n]) if ht == "js" else ref_kl(ls[b, n], lt[b, n]))
            elif r == LH:
                per[r][b][n] = beta_l * ref_topk_rkl(ls[b, n], lt[b, n], k, topk_from)
            elif r == HS:
                per[r][b][n] = beta_l * ref_topk_rkl(ls[b, n], mixed[b, n], k, topk_from)
            elif r == LL:
                per[r][b][n] = beta_w * ref_topk_rkl(ls[b, n], mixed[b, n], k, topk_from)
            if r >= 0 and anchor:
                per[r][b][n] = per[r][b][n] + anchor * ref_kl(ls[b, n], li[b, n])
    parts = {r: ref_reduce(per[r], mask, reduction) for r in range(4)}
    total = sum(parts.values())
    total.backward()
    return total.detach(), s64.grad, regimes, {NAMES[r]: parts[r].item() for r in range(4)}


# ---------------------------------------------------------------- data


def make_case(seed=0, mask=MASK, scale=2.5):
    """Student, student_priv and teacher_full logits that are related but differ, and rollout ids."""
    g = torch.Generator().manual_seed(seed)
    shape = (mask.shape[0], mask.shape[1], V)
    zs = torch.randn(shape, generator=g) * scale
    zp = zs + torch.randn(shape, generator=g) * scale
    zt = zs + torch.randn(shape, generator=g) * scale * 1.5
    ids = torch.randint(0, V, mask.shape, generator=g)
    return zs, zp, zt, ids


def batch_of(ids, mask=MASK):
    return Batch(response_ids=ids.masked_fill(~mask, 0), response_mask=mask.clone(), samples=[{}] * mask.shape[0])


def run(method, zs, zp, zt, ids, mask=MASK):
    """Loss, metrics and the leaf logits (student_priv and teacher_full also require grad)."""
    s, p, t = (z.clone().requires_grad_(True) for z in (zs, zp, zt))
    loss, metrics = method.loss({"student": s, "student_priv": p, "teacher_full": t}, batch_of(ids, mask))
    loss.backward()
    return loss.detach(), metrics, s, p, t


# ---------------------------------------------------------------- routing, hand-built


def test_route_ties_go_high_and_to_ht():
    # A = [0, 1, 2]: mean 1 exactly; token 1 has A == mean -> "high" side, q_T < q_S -> HS.
    # Token 2: high, q_T > q_S -> HT. Token 0: A = 0 < 1, q_S + q_T = 2/e = 0.736 above
    # mS + mT = (2e^-1 + e^-3)/3 + (2e^-1 + e^-2)/3 = 0.552 -> LH. Position 3 is padding, NaN.
    lqs = torch.tensor([[-1.0, -1.0, -3.0, float("nan")]])
    lqt = torch.tensor([[-1.0, -2.0, -1.0, float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    regime, stats = route(lqs, lqt, mask)
    assert regime.tolist() == [[LH, HS, HT, -1]]
    assert regime.dtype == torch.long
    assert stats["threshold_a"] == 1.0 and stats["adv_gap"] == 1.0
    assert stats["threshold_qs"] == pytest.approx((2 * math.exp(-1) + math.exp(-3)) / 3)
    assert stats["threshold_qt"] == pytest.approx((2 * math.exp(-1) + math.exp(-2)) / 3)
    assert [stats[f"share_{n}"] for n in NAMES] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])


def test_route_exact_ties_on_probabilities():
    # log q = 0 gives q = 1 and log q <= -800 gives q = 0 exactly, so sums tie exactly.
    #   token  log qS   log qT    qS qT   A      regime
    #   a      0        -800      1  0    800    low; qS+qT = 1 == mS+mT = 1 -> LH (tie)
    #   b      -800     0         0  1    800    low; tie -> LH
    #   c      0        0         1  1    0      low; 2 >= 1 -> LH
    #   d      -800     -10000    0  0    9200   high (mean A = 10801/6); qT == qS -> HT (tie)
    #   e      -800     -801      0  0    1      low; 0 < 1 -> LL
    #   f      0        0         1  1    0      low -> LH
    lqs = torch.tensor([[0.0, -800.0, 0.0], [-800.0, -800.0, 0.0]])
    lqt = torch.tensor([[-800.0, 0.0, 0.0], [-10000.0, -801.0, 0.0]])
    regime, stats = route(lqs, lqt, torch.ones(2, 3, dtype=torch.bool))
    assert regime.tolist() == [[LH, LH, LH], [HT, LL, LH]]
    assert stats["threshold_qs"] == 0.5 and stats["threshold_qt"] == 0.5
    assert stats["threshold_a"] == pytest.approx(10801 / 6)


def test_route_general_hand_built_case_with_trimming():
    # 20 tokens, trim 0.05 drops exactly one value per statistic (floor(0.05 * 20) = 1).
    # log qS = -1 everywhere, so mS = e^-1 and the sums depend on qT only.
    #  17 tokens: log qT = -2       A = 1
    #   1 token:  log qT = -2.5     A = 1.5 (qT < qS)
    #   1 token:  log qT = -0.5     A = 0.5 (qT > qS)
    #   1 token:  log qT = -1001    A = 1000, the outlier
    # Trimmed mA drops 1000: (17 + 1.5 + 0.5) / 19 = 1 -> the 17 are "high" (tie) and HS,
    # the 1.5 is HS, 0.5 low; the outlier stays high (it is dropped from the mean, not routed away)
    # and has qT < qS -> HS. The 0.5 token: qS + qT = e^-1 + e^-0.5 = 0.975 versus
    # mS + mT = e^-1 + (17 e^-2 + e^-2.5 + e^-1001) / 19 (e^-0.5 is dropped) = 0.493 -> LH.
    lqt = torch.full((20,), -2.0)
    lqt[17], lqt[18], lqt[19] = -2.5, -0.5, -1001.0
    lqs = torch.full((20,), -1.0)
    mask = torch.ones(1, 20, dtype=torch.bool)
    regime, stats = route(lqs[None], lqt[None], mask, trim=0.05)
    expected = [HS] * 17 + [HS, LH, HS]
    assert regime[0].tolist() == expected
    assert stats["threshold_a"] == pytest.approx(1.0)
    assert stats["threshold_qt"] == pytest.approx((17 * math.exp(-2) + math.exp(-2.5)) / 19)
    assert stats["adv_gap"] == pytest.approx((17 + 1.5 + 0.5 + 1000) / 20)
    # Plain means keep the outlier: mA = 51.0, so every token but the outlier is low.
    regime_mean, stats_mean = route(lqs[None], lqt[None], mask, threshold="mean")
    assert stats_mean["threshold_a"] == pytest.approx(50.95)
    assert regime_mean[0, 19].item() == HS and (regime_mean[0, :19] != HS).all()
    assert (regime_mean[0, :19] != HT).all()
    # trim is ignored by "mean": the same as trim 0
    assert torch.equal(regime_mean, route(lqs[None], lqt[None], mask, trim=0.0)[0])


@pytest.mark.parametrize("trim", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("n", [1, 3, 19, 20, 21, 40, 101])
def test_trimmed_mean_against_sorted_list(trim, n):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g, dtype=torch.float64).exp()
    assert trimmed_mean(values, trim).item() == pytest.approx(ref_trimmed_mean(values.tolist(), trim), rel=1e-12)


def test_trimmed_mean_small_n_drops_nothing_and_outliers_are_dropped():
    values = torch.tensor([1.0, 2.0, 3.0, 1000.0])
    assert trimmed_mean(values, 0.05).item() == pytest.approx(1006 / 4)  # floor(0.2) = 0
    assert trimmed_mean(values, 0.25).item() == pytest.approx(2.0)  # floor(1.0) = 1: the 1000 goes
    assert trimmed_mean(values, 0.5).item() == pytest.approx(1.5)
    assert trimmed_mean(torch.tensor([7.0]), 0.9).item() == 7.0  # at least one value is kept
    # 0.29 * 100 is 28.999999999999996 in floats: 29 values are still dropped
    hundred = torch.arange(100, dtype=torch.float64)
    assert trimmed_mean(hundred, 0.29).item() == pytest.approx(sum(range(71)) / 71)
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(values, 1.0)


@pytest.mark.parametrize("trim", [0.0, 0.05, 0.5])
def test_route_matches_brute_force_on_random_tokens(trim):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 10, generator=g) > 0.15
    lqs = -torch.rand(4, 10, generator=g, dtype=torch.float64) * 4
    lqt = -torch.rand(4, 10, generator=g, dtype=torch.float64) * 4
    regime, stats = route(lqs, lqt, mask, trim=trim)
    expected, (m_a, m_s, m_t) = ref_route(lqs, lqt, mask, trim)
    assert regime.tolist() == expected
    assert set(regime[mask].tolist()) == {HT, LH, HS, LL}
    assert ((stats["threshold_a"], stats["threshold_qs"], stats["threshold_qt"])
            == pytest.approx((m_a, m_s, m_t), rel=1e-12))
    assert sum(stats[f"share_{n}"] for n in NAMES) == pytest.approx(1.0)
    for code, name in enumerate(NAMES):
        assert stats[f"share_{name}"] == pytest.approx(sum(r == code for row in expected for r in row)
                                                       / int(mask.sum()))


def test_route_all_tokens_in_one_regime():
    # Equal A everywhere: every token is on the threshold, hence "high".
    mask = torch.ones(2, 5, dtype=torch.bool)
    regime, stats = route(torch.full((2, 5), -1.0), torch.full((2, 5), -0.5), mask)
    assert (regime == HT).all() and stats["share_ht"] == 1.0
    regime, stats = route(torch.full((2, 5), -0.5), torch.full((2, 5), -1.0), mask)
    assert (regime == HS).all() and stats["share_hs"] == 1.0 and stats["share_ll"] == 0.0


def test_route_empty_mask_routes_nothing():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    regime, stats = route(torch.full((2, 3), float("nan")), torch.full((2, 3), float("nan")), mask)
    assert (regime == -1).all()
    assert all(v == 0.0 for v in stats.values())


def test_route_never_reads_masked_positions():
    g = torch.Generator().manual_seed(4)
    lqs, lqt = -torch.rand(3, 7, generator=g) * 3, -torch.rand(3, 7, generator=g) * 3
    mask = torch.rand(3, 7, generator=g) > 0.4
    clean, clean_stats = route(lqs, lqt, mask)
    dirty_s, dirty_t = lqs.clone(), lqt.clone()
    dirty_s[~mask] = float("nan")
    dirty_t[~mask] = float("inf")
    dirty, dirty_stats = route(dirty_s, dirty_t, mask)
    assert torch.equal(clean, dirty) and clean_stats == dirty_stats
    assert (dirty[~mask] == -1).all() and (dirty[mask] >= 0).all()
    # and they really are excluded from the statistics
    assert clean_stats["adv_gap"] == pytest.approx((lqt - lqs).abs()[mask].double().mean().item())


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("reduction", ["seq", "token"])
@pytest.mark.parametrize("topk_from", ["student", "teacher"])
@pytest.mark.parametrize("weights", [(1.0, 0.6, 0.3), (0.5, 1.3, 0.2)])
def test_loss_and_gradient_equal_float64_loop_reference(reduction, topk_from, weights):
    zs, zp, zt, ids = make_case(ALL_REGIMES)
    w_ht, beta_l, beta_w = weights
    method = DOPD(topk=3, topk_from=topk_from, reduction=reduction, w_ht=w_ht, beta_l=beta_l, beta_w=beta_w)
    loss, metrics, s, p, t = run(method, zs, zp, zt, ids)
    ref, ref_grad, regimes, parts = ref_loss(zs, zp, zt, ids, MASK, 3, topk_from, weights, reduction)
    assert {r for row in regimes for r in row} == {-1, HT, LH, HS, LL}  # every regime is exercised
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert p.grad is None and t.grad is None  # stop-gradient on student_priv; teacher frozen
    assert (s.grad[~MASK] == 0).all()
    n_tok = int(MASK.sum())
    for code, name in enumerate(NAMES):
        assert metrics[f"share_{name}"] == pytest.approx(sum(r == code for row in regimes for r in row) / n_tok)
        assert metrics[f"loss_{name}"] == pytest.approx(parts[name], rel=1e-5, abs=1e-7)
        assert parts[name] > 1e-3
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)


def test_metrics_diagnostics_against_reference():
    zs, zp, zt, ids = make_case(1)
    loss, metrics, *_ = run(DOPD(topk=3), zs, zp, zt, ids)
    ls, lp, lt = (torch.log_softmax(z.double(), -1) for z in (zs, zp, zt))

    def ent(lp_):
        return [[-(lp_[b, n].exp() * lp_[b, n]).sum() for n in range(N)] for b in range(B)]

    assert metrics["student_entropy"] == pytest.approx(ref_reduce(ent(ls), MASK, "seq").item(), rel=1e-5)
    assert metrics["teacher_entropy"] == pytest.approx(ref_reduce(ent(lt), MASK, "seq").item(), rel=1e-5)
    rkl = [[(ls[b, n].exp() * (ls[b, n] - lt[b, n])).sum() for n in range(N)] for b in range(B)]
    assert metrics["reverse_kl"] == pytest.approx(ref_reduce(rkl, MASK, "seq").item(), rel=1e-5)
    assert metrics["self_entropy"] == pytest.approx(ref_reduce(ent(lp), MASK, "seq").item(), rel=1e-5)
    self_kl = [[(ls[b, n].exp() * (ls[b, n] - lp[b, n])).sum() for n in range(N)] for b in range(B)]
    assert metrics["self_kl"] == pytest.approx(ref_reduce(self_kl, MASK, "seq").item(), rel=1e-5)
    lqs = torch.stack([lp[b, n, ids[b, n]] for b in range(B) for n in range(N)]).reshape(B, N)
    lqt = torch.stack([lt[b, n, ids[b, n]] for b in range(B) for n in range(N)]).reshape(B, N)
    _, (m_a, m_s, m_t) = ref_route(lqs, lqt, MASK)
    assert metrics["threshold_a"] == pytest.approx(m_a, rel=1e-5)
    assert metrics["threshold_qs"] == pytest.approx(m_s, rel=1e-5)
    assert metrics["threshold_qt"] == pytest.approx(m_t, rel=1e-5)
    assert metrics["adv_gap"] == pytest.approx((lqt - lqs).abs()[MASK].mean().item(), rel=1e-5)
    assert sum(metrics[f"share_{n}"] for n in NAMES) == pytest.approx(1.0)
    assert sum(metrics[f"loss_{n}"] for n in NAMES) == pytest.approx(metrics["loss"], rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item())
    assert all(isinstance(v, float) for v in metrics.values())


def test_student_priv_and_teacher_receive_no_gradient():
    zs, zp, zt, ids = make_case(2)
    for chunk in (None, 0, 2):
        _, _, s, p, t = run(DOPD(topk=3, chunk_size=chunk), zs, zp, zt, ids)
        assert p.grad is None and t.grad is None
        assert s.grad.abs().max() > 1e-4


def test_chunk_sizes_agree():
    zs, zp, zt, ids = make_case(3)
    results = [run(DOPD(topk=3, chunk_size=c), zs, zp, zt, ids) for c in (None, 0, 1, 3)]
    loss0, metrics0, s0 = results[0][0], results[0][1], results[0][2]
    assert loss0.item() > 1e-3
    for loss, metrics, s, *_ in results[1:]:
        torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(s.grad, s0.grad, atol=1e-7, rtol=1e-5)
        assert metrics == pytest.approx(metrics0, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("chunk", [0, 2])
def test_disabling_a_regime_removes_exactly_its_term(chunk):
    zs, zp, zt, ids = make_case(ALL_REGIMES)
    loss_all, metrics_all, s_all, *_ = run(DOPD(topk=3, chunk_size=chunk), zs, zp, zt, ids)
    grad_sum = torch.zeros_like(zs)
    for name in NAMES:
        others = tuple(n for n in NAMES if n != name)
        loss_wo, metrics_wo, s_wo, *_ = run(DOPD(topk=3, chunk_size=chunk, regimes=others), zs, zp, zt, ids)
        loss_only, _, s_only, *_ = run(DOPD(topk=3, chunk_size=chunk, regimes=(name,)), zs, zp, zt, ids)
        assert metrics_all[f"loss_{name}"] > 1e-3
        assert (loss_all - loss_wo).item() == pytest.approx(metrics_all[f"loss_{name}"], rel=1e-4)
        assert loss_only.item() == pytest.approx(metrics_all[f"loss_{name}"], rel=1e-5)
        torch.testing.assert_close(s_all.grad - s_wo.grad, s_only.grad, atol=1e-6, rtol=1e-4)
        assert s_only.grad.abs().max() > 1e-4
        assert metrics_wo[f"loss_{name}"] == 0.0
        # routing does not change: a disabled regime keeps its tokens
        assert all(metrics_wo[f"share_{n}"] == metrics_all[f"share_{n}"] for n in NAMES)
        grad_sum += s_only.grad
    torch.testing.assert_close(grad_sum, s_all.grad, atol=1e-6, rtol=1e-4)
    loss_none, _, s_none, *_ = run(DOPD(topk=3, chunk_size=chunk, regimes=()), zs, zp, zt, ids)
    assert loss_none.item() == 0.0 and (s_none.grad == 0).all()


def test_topk_at_least_vocab_is_full_reverse_kl():
    zs, zp, zt, ids = make_case(5)
    method = DOPD(topk=V, regimes=("lh", "hs", "ll"))
    loss, _, s, *_ = run(method, zs, zp, zt, ids)
    loss_big, _, s_big, *_ = run(DOPD(topk=V + 5, regimes=("lh", "hs", "ll")), zs, zp, zt, ids)
    torch.testing.assert_close(loss, loss_big)
    torch.testing.assert_close(s.grad, s_big.grad)
    # reference: the same routing, full-vocabulary reverse KL, float64
    _, _, regimes, _ = ref_loss(zs, zp, zt, ids, MASK, V)
    s64 = zs.double().requires_grad_(True)
    ls, lp, lt = torch.log_softmax(s64, -1), torch.log_softmax(zp.double(), -1), torch.log_softmax(zt.double(), -1)
    full_t, full_p = reverse_kl(ls, lt), reverse_kl(ls, lp)
    per = [[0.6 * full_t[b, n] if regimes[b][n] == LH else 0.6 * full_p[b, n] if regimes[b][n] == HS
            else 0.3 * full_p[b, n] if regimes[b][n] == LL else ls.new_zeros(()) for n in range(N)] for b in range(B)]
    ref = ref_reduce(per, MASK, "seq")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-6, rtol=1e-5)
    # and K < V is a different (truncated) objective
    loss_small, *_ = run(DOPD(topk=2, regimes=("lh", "hs", "ll")), zs, zp, zt, ids)
    assert abs(loss_small.item() - loss.item()) > 1e-3


def test_self_check_identical_views_give_zero_loss_and_gradient():
    zs, _, _, ids = make_case(6)
    for chunk in (None, 0):
        loss, metrics, s, *_ = run(DOPD(topk=3, chunk_size=chunk), zs, zs, zs, ids)
        assert abs(loss.item()) < 1e-6
        torch.testing.assert_close(s.grad, torch.zeros_like(s.grad), atol=1e-6, rtol=0)
        assert metrics["share_ht"] == 1.0  # A = 0 everywhere, on the threshold, q_T == q_S
        assert abs(metrics["reverse_kl"]) < 1e-6 and metrics["adv_gap"] == 0.0


def test_self_terms_vanish_when_student_equals_student_priv():
    zs, _, zt, ids = make_case(7)
    loss, _, s, *_ = run(DOPD(topk=3, regimes=("hs", "ll")), zs, zs, zt, ids)
    assert abs(loss.item()) < 1e-6
    torch.testing.assert_close(s.grad, torch.zeros_like(s.grad), atol=1e-6, rtol=0)
    loss_all, *_ = run(DOPD(topk=3), zs, zs, zt, ids)
    assert loss_all.item() > 1e-3  # the teacher regimes still pull


def test_masked_positions_are_never_read():
    zs, zp, zt, ids = make_case(8)
    method = DOPD(topk=3)
    clean = run(method, zs, zp, zt, ids)
    dirty_views = []
    for z in (zs, zp, zt):
        d = z.clone()
        d[~MASK] = float("nan")
        dirty_views.append(d)
    weird_ids = ids.masked_fill(~MASK, -100)
    s, p, t = (z.clone().requires_grad_(True) for z in dirty_views)
    batch = Batch(response_ids=weird_ids, response_mask=MASK.clone(), samples=[{}] * B)
    loss, metrics = method.loss({"student": s, "student_priv": p, "teacher_full": t}, batch)
    loss.backward()
    torch.testing.assert_close(loss, clean[0])
    torch.testing.assert_close(s.grad, clean[2].grad)
    assert metrics == pytest.approx(clean[1])


@pytest.mark.parametrize("chunk", [0, 2])
def test_rows_with_all_zero_weights_are_never_computed(chunk):
    """A row whose regime weights are all 0 gives 0 and a zero gradient even where its terms
    would be infinite (teacher without mass on the student's top-K ids)."""
    from mmdistill.losses.chunked import token_loss

    zs = torch.full((1, 3, V), float("-inf"))
    zs[..., :2] = torch.tensor([1.0, 0.5])
    zt = torch.full((1, 3, V), float("-inf"))
    zt[..., 5:7] = torch.tensor([0.3, 0.2])
    method = DOPD(topk=2)
    w = torch.zeros(1, 3, 3)
    w[0, 1] = torch.tensor([0.0, 1.0, 0.0])  # row 1 asks for the top-K KL to the teacher: inf
    weight = torch.full((1, 3), 1 / 3)
    x = zs.clone().requires_grad_(True)
    value = token_loss(method._per_token, x, [zt, zt], weight, extras=[w], chunk_size=chunk)
    assert value.item() == float("inf")
    w[0, 1] = 0.0
    w[0, 2] = torch.tensor([0.0, 0.0, 0.5])  # the self term with student_priv == student: 0
    x = zs.clone().requires_grad_(True)
    value = token_loss(method._per_token, x, [zt, zs], weight, extras=[w], chunk_size=chunk)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("chunk", [None, 0])
def test_empty_mask_gives_zero_loss_and_finite_metrics(chunk):
    mask = torch.zeros(B, N, dtype=torch.bool)
    zs, zp, zt, ids = make_case(9, mask=mask)
    zs[0, 0, 0] = float("nan")  # nothing is a response token: nothing may be read
    loss, metrics, s, *_ = run(DOPD(topk=3, chunk_size=chunk), zs, zp, zt, ids, mask=mask)
    assert loss.item() == 0.0
    assert (s.grad == 0).all()
    assert all(v == 0.0 for v in metrics.values())


def test_all_tokens_in_one_regime_through_the_loss():
    # student_priv and teacher_full equal but different from the student: A = 0 -> all HT, the
    # loss is exactly the (weighted) JS to the teacher.
    zs, _, zt, ids = make_case(10)
    loss, metrics, *_ = run(DOPD(topk=3, w_ht=2.0), zs, zt, zt, ids)
    assert metrics["share_ht"] == 1.0 and metrics["loss_ht"] == pytest.approx(metrics["loss"])
    ls, lt = torch.log_softmax(zs.double(), -1), torch.log_softmax(zt.double(), -1)
    per = [[2.0 * ref_js(ls[b, n], lt[b, n]) for n in range(N)] for b in range(B)]
    assert loss.item() == pytest.approx(ref_reduce(per, MASK, "seq").item(), rel=1e-5)


# ---------------------------------------------------------------- protocol and options


def test_shuffle_regimes_keeps_every_share_and_the_padding():
    regime = torch.tensor([[HT, LH, LH, HS, -1], [LL, LL, HS, -1, -1]])
    seen = set()
    for seed in range(20):
        out = shuffle_regimes(regime, torch.Generator().manual_seed(seed))
        assert (out[regime < 0] == -1).all() and (out[regime >= 0] >= 0).all()
        assert sorted(out[regime >= 0].tolist()) == sorted(regime[regime >= 0].tolist())
        seen.add(tuple(out.flatten().tolist()))
    assert len(seen) > 10  # it really moves labels around
    assert (shuffle_regimes(torch.full((2, 3), -1)) == -1).all()  # empty mask: nothing to deal


def test_shuffled_routing_loss_equals_reference_with_the_same_draw():
    zs, zp, zt, ids = make_case(ALL_REGIMES)
    torch.manual_seed(123)
    loss, metrics, s, *_ = run(DOPD(topk=3, routing="shuffled"), zs, zp, zt, ids)
    # the reference: the paper's routing, then the same permutation drawn from the same RNG state
    lp, lt = torch.log_softmax(zp, -1), torch.log_softmax(zt, -1)
    regime, _ = route(lp.gather(-1, ids[..., None])[..., 0], lt.gather(-1, ids[..., None])[..., 0], MASK)
    torch.manual_seed(123)
    dealt = shuffle_regimes(regime)
    assert not torch.equal(dealt, regime)
    ref, ref_grad, _, parts = ref_loss(zs, zp, zt, ids, MASK, 3, regimes=dealt.tolist())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(s.grad.double(), ref_grad, atol=1e-6, rtol=1e-4)
    _, paper, *_ = run(DOPD(topk=3), zs, zp, zt, ids)
    assert all(metrics[f"share_{n}"] == paper[f"share_{n}"] for n in NAMES)  # shares are the routing's
    assert metrics["loss"] != pytest.approx(paper["loss"], rel=1e-3)


def test_protocol_fields_and_defaults():
    m = DOPD()
    assert (m.name, m.on_policy, m.views) == ("dopd", True, ("student", "student_priv", "teacher_full"))
    assert (m.beta_l, m.beta_w, m.w_ht, m.topk, m.topk_from, m.trim, m.threshold, m.reduction) == (
        0.6, 0.3, 1.0, 128, "student", 0.05, "trimmed_mean", "seq")
    assert m.regimes == ("ht", "lh", "hs", "ll")
    assert DOPD(regimes=["ll", "ht"]).regimes == ("ll", "ht")
    assert DOPD(regimes="ht, lh").regimes == ("ht", "lh")


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"threshold": "median"}, "threshold"),
        ({"trim": 1.0}, "trim"),
        ({"trim": -0.1}, "trim"),
        ({"topk": 0}, "topk"),
        ({"topk": 2.0}, "topk"),
        ({"topk_from": "both"}, "topk_from"),
        ({"reduction": "batch"}, "reduction"),
        ({"beta_l": -1.0}, "beta_l"),
        ({"beta_w": float("nan")}, "beta_w"),
        ({"w_ht": True}, "w_ht"),
        ({"regimes": ("ht", "xx")}, "regimes"),
        ({"regimes": ("ht", "ht")}, "regimes"),
        ({"routing": "random"}, "routing"),
    ],
)
def test_options_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DOPD(**kwargs)


def test_rejects_misaligned_views():
    zs, zp, zt, ids = make_case(11)
    with pytest.raises(ValueError):
        DOPD().loss({"student": zs, "student_priv": zp[:, :-1], "teacher_full": zt}, batch_of(ids))


def test_a_frozen_self_target_reads_the_initial_students_view():
    """self_target=frozen takes q_S and the HS/LL targets from student_init_priv, and only from
    it: the same numbers as the paper's DOPD given that tensor as student_priv, whatever
    student_priv holds."""
    zs, zp, zt, ids = make_case(1)
    frozen = DOPD(topk=3, self_target="frozen")
    assert frozen.views == ("student", "student_init_priv", "teacher_full")
    assert DOPD(topk=3).views == ("student", "student_priv", "teacher_full")
    ref_loss, ref_metrics, ref_s, *_ = run(DOPD(topk=3), zs, zp, zt, ids)
    s, p, t = (z.clone().requires_grad_(True) for z in (zs, zp, zt))
    views = {"student": s, "student_init_priv": p, "teacher_full": t, "student_priv": torch.full_like(zp, float("nan"))}
    loss, metrics = frozen.loss(views, batch_of(ids, MASK))
    loss.backward()
    assert loss.detach() == ref_loss and metrics == ref_metrics
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=0, atol=0)
    assert p.grad is None
    with pytest.raises(ValueError, match="self_target must be one of"):
        DOPD(self_target="ema")


def test_views_name_what_the_frozen_self_target_needs():
    from mmdistill.adapters.scoring import Views

    with pytest.raises(ValueError, match="view 'student_init_priv' needs a frozen copy of the initial student"):
        Views(None, None, torch.nn.Linear(1, 1), None)["student_init_priv"]


# ---------------------------------------------------------------- thresholds of the whole step

MASK4 = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 5 + [False], [True] * 2 + [False] * 4])
SPLIT_ROUTES_APART = 1  # a make_case seed (MASK4) whose halves, each routed alone, route tokens otherwise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_statistics_are_the_sampled_tokens_log_probs_under_both_privileged_views(seed):
    zs, zp, zt, ids = make_case(seed, MASK4)
    got = DOPD(chunk_size=2).token_statistics({"student_priv": zp, "teacher_full": zt}, batch_of(ids, MASK4))
    toks = [(b, n) for b in range(4) for n in range(6) if MASK4[b, n]]
    want_s = [float(torch.log_softmax(zp[b, n].double(), -1)[ids[b, n]]) for b, n in toks]
    want_t = [float(torch.log_softmax(zt[b, n].double(), -1)[ids[b, n]]) for b, n in toks]
    assert got["log_qs"].tolist() == pytest.approx(want_s, abs=1e-5)
    assert got["log_qt"].tolist() == pytest.approx(want_t, abs=1e-5)


@pytest.mark.parametrize("threshold", ["trimmed_mean", "mean"])
def test_micro_batches_fitted_to_the_step_route_and_lose_as_the_whole_batch(threshold):
    """Gradient accumulation over two micro-batches, thresholds fitted to both: every token gets
    the regime and term it gets in one whole batch, so the accumulated loss is the whole batch's.
    Each micro-batch routed by itself (micro_batch scope) does not."""
    zs, zp, zt, ids = make_case(SPLIT_ROUTES_APART, MASK4)
    whole, whole_metrics, *_ = run(DOPD(threshold=threshold, trim=0.2), zs, zp, zt, ids, MASK4)
    ref, (m_a, m_s, m_t) = ref_route(torch.log_softmax(zp.double(), -1).gather(-1, ids[..., None])[..., 0],
                                     torch.log_softmax(zt.double(), -1).gather(-1, ids[..., None])[..., 0], MASK4,
                                     trim=0.2 if threshold == "trimmed_mean" else 0.0)
    halves = [slice(0, 2), slice(2, 4)]
    step = DOPD(threshold=threshold, trim=0.2)
    found = [step.token_statistics({"student_priv": zp[h], "teacher_full": zt[h]}, batch_of(ids[h], MASK4[h]))
             for h in halves]
    step.fit({k: torch.cat([f[k] for f in found]) for k in ("log_qs", "log_qt")})
    assert step.thresholds == pytest.approx((m_a, m_s, m_t), rel=1e-6)
    losses = [run(step, zs[h], zp[h], zt[h], ids[h], MASK4[h]) for h in halves]
    assert (losses[0][0] + losses[1][0]) / 2 == pytest.approx(float(whole), rel=1e-5)
    for loss, metrics, *_ in losses:
        assert metrics["threshold_a"] == pytest.approx(whole_metrics["threshold_a"], rel=1e-9)
        assert metrics["threshold_qt"] == pytest.approx(whole_metrics["threshold_qt"], rel=1e-9)
    alone = DOPD(threshold=threshold, trim=0.2, threshold_scope="micro_batch")
    alone.fit({k: torch.cat([f[k] for f in found]) for k in ("log_qs", "log_qt")})  # ignored: each routes itself
    apart = [run(alone, zs[h], zp[h], zt[h], ids[h], MASK4[h]) for h in halves]
    assert (apart[0][0] + apart[1][0]) / 2 != pytest.approx(float(whole), rel=1e-5)
    assert {m["threshold_a"] for _, m, *_ in apart} != {whole_metrics["threshold_a"]}


def test_fit_none_routes_each_batch_by_itself():
    zs, zp, zt, ids = make_case(ALL_REGIMES)
    method = DOPD()
    method.fit({"log_qs": torch.tensor([-9.0, -0.1]), "log_qt": torch.tensor([-0.1, -9.0])})
    assert method.thresholds is not None
    method.fit(None)
    assert method.thresholds is None
    assert run(method, zs, zp, zt, ids)[0] == run(DOPD(), zs, zp, zt, ids)[0]


# ---------------------------------------------------------------- variants (not in the paper)


@pytest.mark.parametrize("variant", [
    {"self_mix": 0.5}, {"self_mix": 0.0}, {"hs_rejected": "teacher"}, {"ht_divergence": "reverse_kl"}, {"anchor": 0.3},
    {"hs_rejected": "teacher", "ht_divergence": "reverse_kl"},
    {"self_mix": 0.25, "hs_rejected": "teacher", "ht_divergence": "reverse_kl", "anchor": 1.5},
])
@pytest.mark.parametrize("seed", [ALL_REGIMES, 5])
def test_variants_equal_float64_loop_reference(variant, seed):
    zs, zp, zt, ids = make_case(seed)
    zi = zs + torch.randn(zs.shape, generator=torch.Generator().manual_seed(seed + 100))
    method = DOPD(topk=3, chunk_size=4, **variant)
    s, p, t, i = (z.clone().requires_grad_(True) for z in (zs, zp, zt, zi))
    views = {"student": s, "student_priv": p, "teacher_full": t, "student_init": i}
    loss, metrics = method.loss(views, batch_of(ids))
    loss.backward()
    ref, grad, regimes, parts = ref_loss(zs, zp, zt, ids, MASK, 3, self_mix=variant.get("self_mix", 1.0),
                                         hs_rejected=variant.get("hs_rejected", "self"),
                                         ht=variant.get("ht_divergence", "js"), anchor=variant.get("anchor", 0.0),
                                         zi=zi)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(s.grad.double(), grad, rtol=1e-4, atol=1e-6)
    for name in NAMES:
        assert metrics[f"loss_{name}"] == pytest.approx(parts[name], rel=1e-4, abs=1e-7)
    shares = {n: sum(r == c for row in regimes for r in row) / int(MASK.sum()) for c, n in enumerate(NAMES)}
    assert all(metrics[f"share_{n}"] == pytest.approx(shares[n]) for n in NAMES)
    assert p.grad is None and t.grad is None and i.grad is None
    assert ("student_init" in method.views) == bool(variant.get("anchor"))


def test_rejected_hs_tokens_move_to_ht_and_nothing_else_moves():
    """The teacher's outright rejections among HS (q_T below mT) go to HT; an HS token the teacher
    still finds likely (q_T above mT) stays, and so does every other token. Plain means (trim 0):
    mA = 1.0635, mT = 0.3226."""
    pairs = [(0.999, 0.33), (0.9, 0.001), (0.3, 0.3), (0.2, 0.25), (0.4, 0.35), (0.35, 0.3), (0.5, 0.5), (0.6, 0.55)]
    lqs = torch.tensor([[math.log(s) for s, _ in pairs]])
    lqt = torch.tensor([[math.log(t) for _, t in pairs]])
    mask = torch.ones_like(lqs, dtype=torch.bool)
    paper, stats = route(lqs, lqt, mask, trim=0.0)
    assert paper.tolist() == [[HS, HS, LL, LL, LL, LL, LH, LH]]
    assert stats["threshold_qt"] == pytest.approx(sum(t for _, t in pairs) / 8)
    moved, _ = route(lqs, lqt, mask, trim=0.0, hs_rejected="teacher")
    assert moved.tolist() == [[HS, HT, LL, LL, LL, LL, LH, LH]]
    assert ref_route(lqs, lqt, mask, 0.0, hs_rejected="teacher")[0] == moved.tolist()


def test_a_full_self_mix_and_a_zero_anchor_are_the_paper():
    zs, zp, zt, ids = make_case(ALL_REGIMES)
    paper = run(DOPD(topk=3), zs, zp, zt, ids)
    same = run(DOPD(topk=3, self_mix=1.0, anchor=0.0, hs_rejected="self", ht_divergence="js"), zs, zp, zt, ids)
    assert paper[0] == same[0] and paper[1] == same[1]
    assert DOPD(anchor=0.0).views == DOPD().views


@pytest.mark.parametrize("kwargs, key", [({"self_mix": 1.5}, "self_mix"), ({"self_mix": True}, "self_mix"),
                                         ({"hs_rejected": "both"}, "hs_rejected"),
                                         ({"ht_divergence": "jsd"}, "ht_divergence"),
                                         ({"anchor": -0.1}, "anchor"), ({"anchor": float("inf")}, "anchor")])
def test_variant_options_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DOPD(**kwargs)


# ---------------------------------------------------------------- the paper's DOPD, one option away


def test_paper_true_is_the_papers_dopd_whatever_the_variant_keys_say():
    from mmdistill.methods.options import PAPER_DOPD

    m = DOPD(self_mix=0.5, hs_rejected="teacher", ht_divergence="reverse_kl", anchor=0.1, paper=True)
    assert {k: getattr(m, k) for k in PAPER_DOPD} == PAPER_DOPD and "student_init" not in m.views
    assert m.caveat.startswith("method=dopd is the paper's DOPD: not shown to beat full privileged OPD")
    variant = DOPD(hs_rejected="teacher", ht_divergence="reverse_kl")
    assert variant.caveat.startswith("method=dopd is a variant of the paper's DOPD (hs_rejected=teacher, "
                                     "ht_divergence=reverse_kl; method.dopd.paper=true for the paper's)")


def test_paper_true_with_a_variant_key_set_is_refused():
    from mmdistill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"config key 'method.dopd.anchor' is 0.3, but method.dopd.paper=true"):
        load_config("tiny", ["method.name=dopd", "method.dopd.paper=true", "method.dopd.anchor=0.3"])
    load_config("tiny", ["method.name=dopd", "method.dopd.paper=true", "method.dopd.anchor=0.0"])


def test_a_dopd_run_says_its_caveat_once_at_the_start(tmp_path):
    from tests.helpers import run_mmdistill

    proc = run_mmdistill("train", "tiny", "method.name=dopd", f"train.output_dir={tmp_path}", "train.max_steps=1",
                         "eval.num_samples=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "not shown to beat full privileged OPD" in line]
    assert len(lines) == 1 and lines[0].startswith("mmdistill: method=dopd is")


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_step_nobody_logs_skips_the_diagnostics_and_keeps_the_loss(chunk, monkeypatch):
    """Under skip_diagnostics (a metrics row nobody logs) the first pass reads only the two
    statistics views: the same routing, loss and gradient bit for bit, and no diagnostic."""
    import mmdistill.methods.dopd as D
    from mmdistill.losses.chunked import skip_diagnostics

    zs, zp, zt, ids = make_case(4)
    out, calls = {}, []
    real = D.entropy_and_reverse_kls
    monkeypatch.setattr(D, "entropy_and_reverse_kls", lambda *a: calls.append(1) or real(*a))
    for skip in (False, True):
        calls.clear()
        with skip_diagnostics(skip):
            out[skip] = run(DOPD(topk=3, chunk_size=chunk), zs, zp, zt, ids)
        assert bool(calls) != skip
    (loss, metrics, s, *_), (loss_s, metrics_s, s_s, *_) = out[False], out[True]
    assert torch.equal(loss, loss_s) and torch.equal(s.grad, s_s.grad)
    assert set(metrics) - set(metrics_s) == set(DIAGNOSTICS)
    assert all(metrics[k] == metrics_s[k] for k in metrics_s)
