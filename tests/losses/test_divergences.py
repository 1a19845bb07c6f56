"""Divergences against float64 brute-force references written as loops over the vocabulary."""
from __future__ import annotations

import math

import pytest
import torch

from mmdistill.losses import divergences as D

B, N, V = 2, 3, 7
INF = float("inf")


# ---------------------------------------------------------------- brute-force references
# Each takes float64 log-probs [B, N, V] and returns [B, N], built element by element so that
# autograd through the loop is an independent gradient reference. p == 0 entries are skipped,
# the 0 log 0 = 0 convention; p > 0 against q == 0 gives +inf.


def _stack(vals):
    return torch.stack([torch.stack(row) for row in vals])


def _kl_vec(lp_p, lp_q):
    """KL(p||q) for one position, a loop over the vocabulary."""
    total = lp_p.new_zeros(())
    for v in range(lp_p.shape[0]):
        if lp_p[v].item() == -INF:
            continue
        if lp_q[v].item() == -INF:
            return lp_p.new_tensor(INF)
        total = total + torch.exp(lp_p[v]) * (lp_p[v] - lp_q[v])
    return total


def _per_position(fn, *lps):
    rows = []
    for b in range(lps[0].shape[0]):
        rows.append([fn(*(lp[b, n] for lp in lps)) for n in range(lps[0].shape[1])])
    return _stack(rows)


def ref_reverse_kl(lp_s, lp_t):
    return _per_position(_kl_vec, lp_s, lp_t)


def ref_forward_kl(lp_t, lp_s):
    return _per_position(_kl_vec, lp_t, lp_s)


def ref_entropy(lp):
    def h(row):
        total = row.new_zeros(())
        for v in range(row.shape[0]):
            if row[v].item() != -INF:
                total = total - torch.exp(row[v]) * row[v]
        return total

    return _per_position(h, lp)


def _kl_probs(p, q):
    """KL between lists of scalar probability tensors."""
    total = p[0].new_zeros(())
    for pv, qv in zip(p, q):
        if pv.item() == 0.0:
            continue
        total = total + pv * torch.log(pv / qv)
    return total


def ref_gjsd(lp_s, lp_t, beta):
    """GKD/TRL form beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*p_t + (1-beta)*p_s, over beta(1-beta)."""

    def f(ls, lt):
        ps = [torch.exp(ls[v]) for v in range(ls.shape[0])]
        pt = [torch.exp(lt[v]) for v in range(lt.shape[0])]
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        trl = beta * _kl_probs(pt, m) + (1 - beta) * _kl_probs(ps, m)
        return trl / (beta * (1 - beta))

    return _per_position(f, lp_s, lp_t)


def ref_js(lp_s, lp_t):
    def f(ls, lt):
        ps = [torch.exp(ls[v]) for v in range(ls.shape[0])]
        pt = [torch.exp(lt[v]) for v in range(lt.shape[0])]
        m = [(a + b) / 2 for a, b in zip(ps, pt)]
        return (_kl_probs(ps, m) + _kl_probs(pt, m)) / 2

    return _per_position(f, lp_s, lp_t)


def ref_topk_reverse_kl(lp_s, lp_t, k, index_from):
    def f(ls, lt):
        src = ls if index_from == "student" else lt
        order = sorted(range(src.shape[0]), key=lambda v: -src[v].item())[: min(k, src.shape[0])]
        zs = sum(torch.exp(ls[v]) for v in order)
        zt = sum(torch.exp(lt[v]) for v in order)
        ps = [torch.exp(ls[v]) / zs for v in order]
        pt = [torch.exp(lt[v]) / zt for v in order]
        return _kl_probs(ps, pt)

    return _per_position(f, lp_s, lp_t)


# ---------------------------------------------------------------- fixtures and helpers


def logits_pair(seed=0, zeros_s=(), zeros_t=(), scale=2.0):
    """Random student/teacher logits (float32 leaves); zeros_* are (b, n, v) set to -inf."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, N, V, generator=g) * scale
    zt = torch.randn(B, N, V, generator=g) * scale
    for b, n, v in zeros_s:
        zs[b, n, v] = -INF
    for b, n, v in zeros_t:
        zt[b, n, v] = -INF
    return zs, zt


def compare(fn, ref, zs, zt, *, atol=1e-5, rtol=1e-4, grad=True, seed=1):
    """Value and logit-gradients of fn (float32) against ref (float64 loops)."""
    out = {}
    for dtype, f in ((torch.float32, fn), (torch.float64, ref)):
        s = zs.detach().to(dtype).requires_grad_()
        t = zt.detach().to(dtype).requires_grad_()
        val = f(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
        out[dtype] = [val, s, t]
        if grad:
            w = (torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype)
            (val * w).sum().backward()
    v32, s32, t32 = out[torch.float32]
    v64, s64, t64 = out[torch.float64]
    assert v32.shape == (B, N)
    torch.testing.assert_close(v32.double(), v64.detach(), atol=atol, rtol=rtol)
    if grad:
        for a, b in ((s32, s64), (t32, t64)):
            ga = torch.zeros_like(a) if a.grad is None else a.grad
            gb = torch.zeros_like(b) if b.grad is None else b.grad
            assert torch.isfinite(ga).all()
            torch.testing.assert_close(ga.double(), gb, atol=atol, rtol=rtol)
    return v32


def lps(zs, zt):
    return torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)


# ---------------------------------------------------------------- KL, entropy


@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_kl_matches_reference(seed):
    zs, zt = logits_pair(seed)
    v = compare(D.reverse_kl, ref_reverse_kl, zs, zt)
    assert (v > 1e-3).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_kl_matches_reference(seed):
    zs, zt = logits_pair(seed)
    compare(lambda s, t: D.forward_kl(t, s), lambda s, t: ref_forward_kl(t, s), zs, zt)


def test_forward_and_reverse_differ():
    ls, lt = lps(*logits_pair(3))
    assert not torch.allclose(D.reverse_kl(ls, lt), D.forward_kl(lt, ls), atol=1e-3)


def test_entropy_matches_reference():
    zs, _ = logits_pair(2, zeros_s=[(0, 0, 1), (1, 2, 0), (1, 2, 6)])
    compare(lambda s, t: D.entropy(s), lambda s, t: ref_entropy(s), zs, zs)
    uniform = torch.full((4, V), -math.log(V))
    torch.testing.assert_close(D.entropy(uniform), torch.full((4,), math.log(V)))


def test_kl_shared_zeros_finite_and_matches_reference():
    shared = [(0, 0, 2), (0, 1, 0), (1, 2, 6), (1, 2, 5)]
    zs, zt = logits_pair(4, zeros_s=shared, zeros_t=shared)
    v = compare(D.reverse_kl, ref_reverse_kl, zs, zt)
    assert torch.isfinite(v).all()
    compare(lambda s, t: D.forward_kl(t, s), lambda s, t: ref_forward_kl(t, s), zs, zt)


def test_kl_support_mismatch_is_inf_not_nan():
    # student zero where teacher has mass: reverse KL finite (and exact), forward KL infinite
    zs, zt = logits_pair(5, zeros_s=[(0, 1, 3), (1, 0, 0)])
    compare(D.reverse_kl, ref_reverse_kl, zs, zt)
    ls, lt = lps(zs, zt)
    fwd = D.forward_kl(lt, ls)
    assert not torch.isnan(fwd).any()
    assert fwd[0, 1] == INF and fwd[1, 0] == INF
    assert torch.isfinite(fwd[0, 0]) and torch.isfinite(fwd[1, 1])
    assert D.reverse_kl(lt, ls)[0, 1] == INF  # the same thing spelled the other way


def test_kl_gradient_zero_at_absent_entries():
    zs, zt = logits_pair(6, zeros_s=[(0, 0, 4)], zeros_t=[(0, 0, 4)])
    s = zs.clone().requires_grad_()
    D.reverse_kl(torch.log_softmax(s, -1), torch.log_softmax(zt, -1)).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 0, 4] == 0


@pytest.mark.parametrize(
    "fn",
    [
        D.reverse_kl,
        lambda s, t: D.forward_kl(t, s),
        lambda s, t: D.topk_reverse_kl(s, t, 3),
        lambda s, t: D.topk_reverse_kl(s, t, 3, index_from="teacher"),
        lambda s, t: D.generalized_jsd(s, t, 0.3),
        D.js,
    ],
)
def test_identical_distributions_zero_value_and_gradient(fn):
    zs, _ = logits_pair(7, zeros_s=[(1, 1, 2)])
    s = zs.clone().requires_grad_()
    val = fn(torch.log_softmax(s, -1), torch.log_softmax(zs, -1))
    torch.testing.assert_close(val, torch.zeros(B, N), atol=1e-6, rtol=0)
    val.sum().backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("index_from", ["student", "teacher"])
@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_topk_matches_reference(k, index_from):
    zs, zt = logits_pair(8 + k)
    v = compare(
        lambda s, t: D.topk_reverse_kl(s, t, k, index_from=index_from),
        lambda s, t: ref_topk_reverse_kl(s, t, k, index_from),
        zs,
        zt,
    )
    if k == 1:  # one id renormalises to probability 1 on both sides
        torch.testing.assert_close(v, torch.zeros(B, N), atol=1e-6, rtol=0)
    else:
        assert (v > 0).all()


def test_topk_index_source_matters():
    ls, lt = lps(*logits_pair(20))
    a = D.topk_reverse_kl(ls, lt, 3, index_from="student")
    b = D.topk_reverse_kl(ls, lt, 3, index_from="teacher")
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("k", [V, V + 5, 10_000])
def test_topk_full_vocabulary_equals_reverse_kl(k):
    zs, zt = logits_pair(21)
    compare(lambda s, t: D.topk_reverse_kl(s, t, k), ref_reverse_kl, zs, zt)
    ls, lt = lps(zs, zt)
    torch.testing.assert_close(D.topk_reverse_kl(ls, lt, k), D.reverse_kl(ls, lt), atol=1e-6, rtol=1e-5)


def test_topk_with_zeros_in_the_kept_ids():
    shared = [(0, 0, v) for v in range(4)]  # position (0,0) has only 3 ids with mass
    zs, zt = logits_pair(22, zeros_s=shared, zeros_t=shared)
    v = compare(lambda s, t: D.topk_reverse_kl(s, t, 5), lambda s, t: ref_topk_reverse_kl(s, t, 5, "student"), zs, zt)
    ls, lt = lps(zs, zt)
    torch.testing.assert_close(v[0, 0], D.reverse_kl(ls, lt)[0, 0], atol=1e-6, rtol=1e-5)


def test_topk_no_target_mass_on_kept_ids_is_inf_not_nan():
    zs, zt = logits_pair(23)
    zt[0, 0, zs[0, 0].topk(2).indices] = -INF
    out = D.topk_reverse_kl(*lps(zs, zt), 2)
    assert out[0, 0] == INF
    assert torch.isfinite(out.flatten()[1:]).all()


def test_topk_no_student_mass_on_teacher_ids_is_finite_with_finite_gradient():
    zs, zt = logits_pair(24)
    zs[1, 2, zt[1, 2].topk(3).indices] = -INF
    s = zs.clone().requires_grad_()
    out = D.topk_reverse_kl(torch.log_softmax(s, -1), torch.log_softmax(zt, -1), 3, index_from="teacher")
    assert out[1, 2] == 0 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1, 2] == 0).all()
    assert (s.grad[0, 0] != 0).any()


def test_topk_validates_arguments():
    ls, lt = lps(*logits_pair(0))
    with pytest.raises(ValueError, match="index_from"):
        D.topk_reverse_kl(ls, lt, 2, index_from="mixture")
    with pytest.raises(ValueError, match="k"):
        D.topk_reverse_kl(ls, lt, 0)


# ---------------------------------------------------------------- generalized JSD, JS


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_gjsd_matches_reference(beta):
    zs, zt = logits_pair(30)
    compare(lambda s, t: D.generalized_jsd(s, t, beta), lambda s, t: ref_gjsd(s, t, beta), zs, zt)


def test_gjsd_endpoints_are_forward_and_reverse_kl():
    zs, zt = logits_pair(31)
    compare(lambda s, t: D.generalized_jsd(s, t, 0.0), lambda s, t: ref_forward_kl(t, s), zs, zt)
    compare(lambda s, t: D.generalized_jsd(s, t, 1), lambda s, t: ref_reverse_kl(s, t), zs, zt)


# Near an end the gap closes like eps * max(p_t/p_s) (resp. p_s/p_t), so these use mild logits.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps,atol", [(1e-6, 1e-4), (1e-9, 1e-5)])
def test_gjsd_continuous_at_both_ends(dtype, eps, atol):
    ls, lt = (x.to(dtype) for x in lps(*logits_pair(32, scale=1.0)))
    fwd, rev = D.forward_kl(lt, ls), D.reverse_kl(ls, lt)
    assert (fwd - rev).abs().max() > 0.1  # the two ends really differ
    torch.testing.assert_close(D.generalized_jsd(ls, lt, eps), fwd, atol=atol, rtol=0)
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 1 - eps), rev, atol=atol, rtol=0)


def test_gjsd_converges_linearly_towards_the_ends():
    ls, lt = (x.double() for x in lps(*logits_pair(33, scale=1.0)))
    fwd, rev = D.forward_kl(lt, ls), D.reverse_kl(ls, lt)
    eps = (1e-3, 1e-4, 1e-5)
    gaps0 = [(D.generalized_jsd(ls, lt, e) - fwd).abs().max().item() for e in eps]
    gaps1 = [(D.generalized_jsd(ls, lt, 1 - e) - rev).abs().max().item() for e in eps]
    for gaps in (gaps0, gaps1):
        assert gaps[0] > 0
        assert 0.05 < gaps[1] / gaps[0] < 0.2 and 0.05 < gaps[2] / gaps[1] < 0.2


def test_gjsd_gradient_continuous_at_ends():
    zs, zt = logits_pair(34, scale=1.0)

    def grad(beta):
        s = zs.clone().requires_grad_()
        D.generalized_jsd(torch.log_softmax(s, -1), torch.log_softmax(zt, -1), beta).sum().backward()
        return s.grad

    torch.testing.assert_close(grad(1e-6), grad(0.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(grad(1 - 1e-6), grad(1.0), atol=1e-4, rtol=0)
    assert (grad(0.0) - grad(1.0)).abs().max() > 0.1


def test_gjsd_half_is_four_times_js():
    ls, lt = lps(*logits_pair(35))
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 0.5), 4 * D.js(ls, lt))


def test_gjsd_and_js_finite_for_disjoint_zeros():
    zs, zt = logits_pair(36, zeros_s=[(0, 0, 1), (1, 1, 3)], zeros_t=[(0, 0, 2), (1, 1, 4), (1, 2, 0)])
    v = compare(lambda s, t: D.generalized_jsd(s, t, 0.4), lambda s, t: ref_gjsd(s, t, 0.4), zs, zt)
    assert torch.isfinite(v).all()
    v = compare(D.js, ref_js, zs, zt)
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_gjsd_validates_beta(bad):
    ls, lt = lps(*logits_pair(0))
    with pytest.raises(ValueError, match="beta"):
        D.generalized_jsd(ls, lt, bad)


@pytest.mark.parametrize("seed", [40, 41])
def test_js_matches_reference_and_is_symmetric_and_bounded(seed):
    zs, zt = logits_pair(seed, scale=4.0)
    v = compare(D.js, ref_js, zs, zt)
    ls, lt = lps(zs, zt)
    torch.testing.assert_close(D.js(lt, ls), v)
    assert (v > 0).all() and (v <= math.log(2) + 1e-6).all()


def test_js_of_disjoint_supports_is_log2():
    ls = torch.tensor([[0.0, -INF, -INF]])
    lt = torch.tensor([[-INF, math.log(0.5), math.log(0.5)]])
    torch.testing.assert_close(D.js(ls, lt), torch.tensor([math.log(2)]))


# ---------------------------------------------------------------- sampled-token estimator


def sampled_ids(seed=50):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def test_sampled_token_values():
    ls, lt = lps(*logits_pair(51))
    ids = sampled_ids()
    sur, kl = D.sampled_token_pg(ls, lt, ids)
    for b in range(B):
        for n in range(N):
            y = ids[b, n]
            a = lt[b, n, y] - ls[b, n, y]
            torch.testing.assert_close(sur[b, n], -a * ls[b, n, y])
            torch.testing.assert_close(kl[b, n], ls[b, n, y] - lt[b, n, y])
    assert not kl.requires_grad


def test_sampled_token_gradient_is_advantage_weighted_score():
    zs, zt = logits_pair(52)
    s = zs.clone().requires_grad_()
    t = zt.clone().requires_grad_()
    ids = sampled_ids(53)
    sur, _ = D.sampled_token_pg(torch.log_softmax(s, -1), torch.log_softmax(t, -1), ids)
    sur.sum().backward()
    assert t.grad is None or (t.grad == 0).all()  # the advantage is a constant
    ps, ls, lt = zs.softmax(-1), zs.log_softmax(-1), zt.log_softmax(-1)
    expected = torch.zeros(B, N, V)
    for b in range(B):
        for n in range(N):
            y = ids[b, n].item()
            a = (lt[b, n, y] - ls[b, n, y]).item()
            for v in range(V):
                expected[b, n, v] = -a * ((1.0 if v == y else 0.0) - ps[b, n, v].item())
    torch.testing.assert_close(s.grad, expected, atol=1e-5, rtol=1e-4)


def test_sampled_token_gradient_is_unbiased_for_reverse_kl():
    """sum_y p_s(y) * grad surrogate(y) == grad KL(p_s||p_t), enumerating y exactly."""
    zs, zt = logits_pair(54)
    zs, zt = zs.double(), zt.double()
    lt = torch.log_softmax(zt, -1)
    ps = torch.softmax(zs, -1)
    expected_grad = torch.zeros(B, N, V, dtype=torch.float64)
    for y in range(V):
        s = zs.clone().requires_grad_()
        sur, _ = D.sampled_token_pg(torch.log_softmax(s, -1), lt, torch.full((B, N), y))
        sur.sum().backward()
        expected_grad += ps[..., y : y + 1] * s.grad
    s = zs.clone().requires_grad_()
    ref_reverse_kl(torch.log_softmax(s, -1), lt).sum().backward()
    torch.testing.assert_close(expected_grad, s.grad)
    assert s.grad.abs().max() > 1e-3


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_seq_and_token():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    torch.testing.assert_close(D.masked_mean(x, mask), torch.tensor((2.0 + 10.0) / 2))
    torch.testing.assert_close(D.masked_mean(x, mask, "seq"), torch.tensor(6.0))
    torch.testing.assert_close(D.masked_mean(x, mask, "token"), torch.tensor(16.0 / 4))


@pytest.mark.parametrize("reduction", ["seq", "token"])
def test_masked_mean_ignores_nan_and_inf_in_padding(reduction):
    base = torch.tensor([[1.0, 2.0, 3.0, 5.0], [4.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    poisoned = base.clone()
    poisoned[0, 2], poisoned[0, 3], poisoned[1, 3] = float("nan"), INF, -INF
    clean = base.clone().requires_grad_()
    dirty = poisoned.clone().requires_grad_()
    a = D.masked_mean(clean, mask, reduction)
    b = D.masked_mean(dirty, mask, reduction)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(clean.grad, dirty.grad)
    assert (dirty.grad[~mask] == 0).all()
    if reduction == "seq":
        expected = torch.tensor([[1 / 4, 1 / 4, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]])
        torch.testing.assert_close(a, torch.tensor((1.5 + 17 / 3) / 2))
    else:
        expected = torch.where(mask, torch.tensor(1 / 5), torch.tensor(0.0))
        torch.testing.assert_close(a, torch.tensor(20.0 / 5))
    torch.testing.assert_close(dirty.grad, expected)


@pytest.mark.parametrize("reduction", ["seq", "token"])
def test_masked_mean_empty_mask_is_attached_zero(reduction):
    x = torch.tensor([[1.0, float("nan")], [INF, 2.0]], requires_grad=True)
    out = D.masked_mean(x, torch.zeros(2, 2, dtype=torch.bool), reduction)
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 2))


def test_masked_mean_seq_skips_sequences_without_tokens():
    x = torch.tensor([[2.0, 4.0], [100.0, 100.0], [5.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    out = D.masked_mean(x, mask, "seq")
    torch.testing.assert_close(out, torch.tensor((3.0 + 5.0) / 2))  # not divided by 3
    out.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.25, 0.25], [0.0, 0.0], [0.5, 0.0]]))


def test_masked_mean_validates():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        D.masked_mean(x, x.bool(), "batch")
    with pytest.raises(ValueError):
        D.masked_mean(x, torch.ones(2, 2, dtype=torch.bool))


def test_entropy_and_reverse_kls_equal_the_separate_functions_with_zeros_on_either_side():
    """One exponentiation of p_s, the same numbers as entropy() and reverse_kl(); -inf entries
    (exact zeros) on the student side add 0, on the target side where p_s > 0 give +inf."""
    from mmdistill.losses.divergences import entropy_and_reverse_kls

    g = torch.Generator().manual_seed(3)
    ls = torch.randn(4, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    ls[0, 2] = float("-inf")
    ls[0] = ls[0].log_softmax(-1)
    lt = torch.randn(4, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    lt[0, 2] = float("-inf")  # zero on both sides: adds 0
    lt[1, 3] = float("-inf")  # zero only on the target side: +inf
    lt = lt.log_softmax(-1)
    lp = torch.randn(4, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    h, (kl_t, kl_p) = entropy_and_reverse_kls(ls, [lt, lp])
    torch.testing.assert_close(h, D.entropy(ls))
    torch.testing.assert_close(kl_t, D.reverse_kl(ls, lt))
    torch.testing.assert_close(kl_p, D.reverse_kl(ls, lp))
    brute = [sum(float(ls[r, v].exp()) * (float(ls[r, v]) - float(lp[r, v]))
                 for v in range(7) if ls[r, v] > float("-inf"))
             for r in range(4)]
    torch.testing.assert_close(kl_p, torch.tensor(brute, dtype=torch.float64))
    assert math.isinf(kl_t[1]) and math.isfinite(kl_t[0]) and not torch.isnan(torch.stack([h, kl_t, kl_p])).any()


# ---------------------------------------------------------------- generalized JSD, TRL's scale


def ref_gjsd_unscaled(lp_s, lp_t, beta):
    """GKD/TRL form as is: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*p_t + (1-beta)*p_s."""

    def f(ls, lt):
        ps = [torch.exp(ls[v]) for v in range(ls.shape[0])]
        pt = [torch.exp(lt[v]) for v in range(lt.shape[0])]
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return beta * _kl_probs(pt, m) + (1 - beta) * _kl_probs(ps, m)

    return _per_position(f, lp_s, lp_t)


def trl_generalized_jsd(lp_s, lp_t, beta):
    """TRL's GKDTrainer.generalized_jsd_loss per position (reduction='none', summed over the vocab),
    written out with its F.kl_div calls; the AR-OPD release's _compute_distillation_kl is the same
    with alpha for beta."""
    F = torch.nn.functional
    if beta == 0:
        return F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lp_t, lp_s, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=lp_s.dtype)
    mix = torch.logsumexp(torch.stack([lp_s + torch.log(1 - b), lp_t + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mix, lp_t, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mix, lp_s, reduction="none", log_target=True).sum(-1)
    return b * kl_teacher + (1 - b) * kl_student


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.5, 0.9, 1 - 1e-3])
def test_gjsd_unscaled_matches_reference(beta):
    zs, zt = logits_pair(40)
    compare(lambda s, t: D.generalized_jsd(s, t, beta, "unscaled"), lambda s, t: ref_gjsd_unscaled(s, t, beta), zs, zt)


def test_gjsd_unscaled_with_zeros_on_either_side_matches_reference():
    zs, zt = logits_pair(41, zeros_s=[(0, 0, 1), (1, 1, 3)], zeros_t=[(0, 0, 2), (1, 1, 4), (1, 2, 0)])
    v = compare(lambda s, t: D.generalized_jsd(s, t, 0.4, "unscaled"), lambda s, t: ref_gjsd_unscaled(s, t, 0.4),
                zs, zt)
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_gjsd_unscaled_is_trls_formula_and_the_default_is_trls_over_beta_one_minus_beta(beta):
    ls, lt = (x.double() for x in lps(*logits_pair(42)))
    trl = trl_generalized_jsd(ls, lt, beta)
    torch.testing.assert_close(D.generalized_jsd(ls, lt, beta, "unscaled"), trl)
    scaled = D.generalized_jsd(ls, lt, beta)
    if beta in (0.0, 1.0):
        torch.testing.assert_close(scaled, trl)  # both scales are the KLs at the ends
    else:
        torch.testing.assert_close(scaled, trl / (beta * (1 - beta)))
    if beta == 0.5:
        torch.testing.assert_close(scaled, 4 * trl)


@pytest.mark.parametrize("eps", [1e-4, 1e-6])
def test_gjsd_unscaled_is_not_continuous_at_either_end(eps):
    """It tends to 0 like eps * KL while the ends are the KLs: a jump of the whole KL."""
    ls, lt = (x.double() for x in lps(*logits_pair(43, scale=1.0)))
    fwd, rev = D.forward_kl(lt, ls), D.reverse_kl(ls, lt)
    assert fwd.min() > 0.05 and rev.min() > 0.05
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 0.0, "unscaled"), fwd)
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 1.0, "unscaled"), rev)
    near0, near1 = D.generalized_jsd(ls, lt, eps, "unscaled"), D.generalized_jsd(ls, lt, 1 - eps, "unscaled")
    torch.testing.assert_close(near0, eps * fwd, atol=0, rtol=1e-2)
    torch.testing.assert_close(near1, eps * rev, atol=0, rtol=1e-2)
    # the same sums as the continuous scale, times beta (1 - beta)
    torch.testing.assert_close(near0, eps * (1 - eps) * D.generalized_jsd(ls, lt, eps))


def test_gjsd_unscaled_of_identical_distributions_is_zero_with_zero_gradient():
    zs, _ = logits_pair(44)
    s = zs.clone().requires_grad_()
    ls = torch.log_softmax(s, -1)
    v = D.generalized_jsd(ls, ls.detach(), 0.3, "unscaled")
    assert v.abs().max() < 1e-6
    v.sum().backward()
    assert s.grad.abs().max() < 1e-6


def test_gjsd_validates_scale():
    ls, lt = lps(*logits_pair(0))
    with pytest.raises(ValueError, match="scale"):
        D.generalized_jsd(ls, lt, 0.5, "trl")


def test_reverse_kl_closed_form_gradient_is_autograds():
    """reverse_kl_and_grad: the value is reverse_kl's to the bit and the gradient in the logits is
    autograd's through log_softmax, with ids the student gives no mass (-inf logits) and ids only
    the student gives mass to (the teacher's -inf where the student has none gives 0)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, 13, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(4, 6, 13, generator=g, dtype=torch.float64) * 3
    z[0, :, 2] = float("-inf")
    zt[0, :, 2] = float("-inf")  # absent on both sides
    z[1, 3, 5] = float("-inf")
    lt = torch.log_softmax(zt, -1)
    x = z.clone().requires_grad_(True)
    ref = D.reverse_kl(torch.log_softmax(x, -1), lt)
    w = torch.rand(4, 6, generator=g, dtype=torch.float64)
    (ref * w).sum().backward()
    value, grad = D.reverse_kl_and_grad(torch.log_softmax(z, -1), lt)
    assert torch.equal(value, ref.detach())
    torch.testing.assert_close(w.unsqueeze(-1) * grad, x.grad, rtol=1e-10, atol=1e-13)
    assert (grad[0, :, 2] == 0).all() and grad.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_rows_without_zeros_skip_the_masks_and_give_the_masked_results_bit_for_bit(dtype, monkeypatch):
    """On the CPU, log-probs with no -inf take a path without boolean masks (_without_absent):
    every value equals the masked path's exactly, and so does every gradient but those of the
    mixtures (GKD, JS): there autograd adds the same terms in another order. A tensor with one -inf
    is masked."""
    g = torch.Generator().manual_seed(0)
    lp_s = torch.log_softmax(torch.randn(3, 4, 50, generator=g, dtype=dtype) * 3, -1)
    lp_t = torch.log_softmax(torch.randn(3, 4, 50, generator=g, dtype=dtype) * 3, -1)
    fns = {
        "reverse_kl": lambda s, t: D.reverse_kl(s, t),
        "forward_kl": lambda s, t: D.forward_kl(t, s),
        "entropy": lambda s, t: D.entropy(s),
        "gjsd": lambda s, t: D.generalized_jsd(s, t, 0.3),
        "js": lambda s, t: D.js(s, t),
    }

    def run():
        out = {}
        for name, fn in fns.items():
            x = lp_s.clone().requires_grad_(True)
            value = fn(x, lp_t)
            value.sum().backward()
            out[name] = (value.detach(), x.grad)
        out["closed_form"] = D.reverse_kl_and_grad(lp_s, lp_t)  # these two run without autograd
        entropy, (kl,) = D.entropy_and_reverse_kls(lp_s, [lp_t])
        out["entropy_and_kls"] = (entropy, kl)
        return out

    taken = []
    real = D._without_absent
    monkeypatch.setattr(D, "_without_absent", lambda lp: taken.append(real(lp)[1] is None) or real(lp))
    fast = run()
    assert taken and all(taken)
    monkeypatch.setattr(D, "_without_absent", D._masked)
    for name, (value, grad) in run().items():
        assert torch.equal(value, fast[name][0]), name
        if name in ("gjsd", "js"):  # lp_s has more than two uses: autograd sums them in another order
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(grad, fast[name][1], rtol=16 * eps, atol=16 * eps * float(grad.abs().max()))
        else:
            assert torch.equal(grad, fast[name][1]), name
    lp_s[1, 2, 7] = -INF
    assert real(lp_s)[1] is not None and real(lp_s)[1].sum() == 1
