"""OPD on hand-built batches, against float64 loop references."""
from __future__ import annotations

import pytest
import torch

from mmdistill.core.batch import Batch
from mmdistill.methods.opd import OPD
from tests.helpers import MASK, B, N, V, make_batch, make_logits, ref_reduce  # the SFT/OPD/GKD case


def ref_kl_rows(lp_p, lp_q, ids_per_pos=None):
    """KL(p||q) per position as nested lists, optionally restricted to and renormalised on ids."""
    out = []
    for b in range(lp_p.shape[0]):
        row = []
        for n in range(lp_p.shape[1]):
            vocab = range(lp_p.shape[2]) if ids_per_pos is None else ids_per_pos[b][n]
            zp = sum(torch.exp(lp_p[b, n, v]) for v in vocab)
            zq = sum(torch.exp(lp_q[b, n, v]) for v in vocab)
            total = lp_p.new_zeros(())
            for v in vocab:
                p = torch.exp(lp_p[b, n, v]) / zp
                q = torch.exp(lp_q[b, n, v]) / zq
                total = total + p * torch.log(p / q)
            row.append(total)
        out.append(row)
    return out


def topk_ids(lp, k):
    return [[sorted(range(lp.shape[2]), key=lambda v: -lp[b, n, v].item())[:k] for n in range(lp.shape[1])]
            for b in range(lp.shape[0])]


def views_for(zs, zt, target="teacher_plain"):
    s = zs.clone().requires_grad_()
    t = zt.clone().requires_grad_()
    return s, t, {"student": torch.log_softmax(s, -1), target: torch.log_softmax(t, -1)}


# ---------------------------------------------------------------- OPD values


@pytest.mark.parametrize("chunk", [None, 1, 3])  # chunked, "full" takes its gradient in closed form
@pytest.mark.parametrize("reduction", ["seq", "token"])
@pytest.mark.parametrize("estimator,k", [("full", None), ("topk", 3), ("topk", 1), ("topk", V)])
def test_opd_full_and_topk_equal_reverse_kl_reference(estimator, k, reduction, chunk):
    batch = make_batch(seed=3)
    zs, zt = make_logits(3), make_logits(4)
    method = OPD(estimator=estimator, topk=k or 2, reduction=reduction, chunk_size=chunk)  # "full" ignores topk
    s, t, views = views_for(zs, zt)
    loss, metrics = method.loss(views, batch)
    loss.backward()

    s64 = zs.double().requires_grad_()
    ls, lt = torch.log_softmax(s64, -1), torch.log_softmax(zt.double(), -1)
    ids = None if estimator == "full" else topk_ids(ls, k)
    ref = ref_reduce(ref_kl_rows(ls, lt, ids), MASK, reduction)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-6, rtol=1e-5)
    assert t.grad is None
    full_ref = ref_reduce(ref_kl_rows(ls, lt), MASK, reduction).item()
    assert metrics["reverse_kl"] == pytest.approx(full_ref, rel=1e-5)
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    if k == 1:
        assert ref.item() == pytest.approx(0.0, abs=1e-7) and full_ref > 0.1


def test_opd_topk_index_from_teacher():
    batch = make_batch(seed=5)
    zs, zt = make_logits(5), make_logits(6)
    views = {"student": torch.log_softmax(zs, -1), "teacher_plain": torch.log_softmax(zt, -1)}
    a, _ = OPD(estimator="topk", topk=3, topk_from="teacher").loss(views, batch)
    b, _ = OPD(estimator="topk", topk=3).loss(views, batch)
    ls, lt = (x.double() for x in views.values())
    ref = ref_reduce(ref_kl_rows(ls, lt, topk_ids(lt, 3)), MASK, "seq")
    torch.testing.assert_close(a.double(), ref, atol=1e-6, rtol=1e-5)
    assert abs(a.item() - b.item()) > 1e-3


def test_opd_metrics_entropies_and_sampled_kl():
    batch = make_batch(seed=7)
    zs, zt = make_logits(7), make_logits(8, scale=0.5)
    _, _, views = views_for(zs, zt)
    _, metrics = OPD(estimator="full").loss(views, batch)
    ls, lt = (x.detach().double() for x in views.values())

    def ent(lp):
        return [[-(lp[b, n].exp() * lp[b, n]).sum() for n in range(N)] for b in range(B)]

    assert metrics["student_entropy"] == pytest.approx(ref_reduce(ent(ls), MASK, "seq").item(), rel=1e-5)
    assert metrics["teacher_entropy"] == pytest.approx(ref_reduce(ent(lt), MASK, "seq").item(), rel=1e-5)
    assert metrics["teacher_entropy"] > metrics["student_entropy"]  # flatter teacher logits
    ids = batch.response_ids
    est = [[ls[b, n, ids[b, n]] - lt[b, n, ids[b, n]] for n in range(N)] for b in range(B)]
    assert metrics["sampled_reverse_kl"] == pytest.approx(ref_reduce(est, MASK, "seq").item(), rel=1e-5)
    assert set(metrics) >= {"loss", "reverse_kl", "student_entropy", "teacher_entropy"}
    assert all(isinstance(v, float) for v in metrics.values())


# ---------------------------------------------------------------- OPD sampled estimator


@pytest.mark.parametrize("reduction", ["seq", "token"])
def test_opd_sampled_gradient_is_brute_force_policy_gradient(reduction):
    batch = make_batch(seed=9)
    zs, zt = make_logits(9), make_logits(10)
    s, t, views = views_for(zs, zt)
    loss, _ = OPD(estimator="sampled", reduction=reduction).loss(views, batch)
    loss.backward()
    assert t.grad is None

    ps, ls, lt = zs.softmax(-1), zs.log_softmax(-1), zt.log_softmax(-1)
    counts = MASK.sum(1)
    expected = torch.zeros(B, N, V)
    expected_loss = 0.0
    for b in range(B):
        for n in range(N):
            if not MASK[b, n]:
                continue
            w = 1 / (counts[b].item() * B) if reduction == "seq" else 1 / MASK.sum().item()
            y = batch.response_ids[b, n].item()
            adv = (lt[b, n, y] - ls[b, n, y]).item()
            expected_loss += w * -adv * ls[b, n, y].item()
            for v in range(V):
                expected[b, n, v] = w * -adv * ((1.0 if v == y else 0.0) - ps[b, n, v].item())
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=1e-4)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert (s.grad[~MASK] == 0).all()


def test_opd_sampled_gradient_expectation_is_full_reverse_kl_gradient():
    """Averaging the sampled gradient over y ~ p_s (enumerated exactly) gives the full one."""
    mask = torch.ones(B, N, dtype=torch.bool)
    zs, zt = make_logits(11).double(), make_logits(12).double()
    ps = zs.softmax(-1)
    expected = torch.zeros(B, N, V, dtype=torch.float64)
    for y in range(V):
        batch = Batch(torch.full((B, N), y), mask, [{}] * B)
        s, _, views = views_for(zs, zt)
        OPD(estimator="sampled", reduction="token").loss(views, batch)[0].backward()
        expected += ps[..., y : y + 1] * s.grad
    s, _, views = views_for(zs, zt)
    OPD(estimator="full", reduction="token").loss(
        views, Batch(torch.zeros(B, N, dtype=torch.long), mask, [{}] * B))[0].backward()
    torch.testing.assert_close(expected, s.grad)
    assert s.grad.abs().max() > 1e-3


# ---------------------------------------------------------------- OPD invariants


@pytest.mark.parametrize("estimator", ["sampled", "topk", "full"])
def test_opd_teacher_equal_student_gives_zero_loss_and_gradient(estimator):
    batch = make_batch(seed=13)
    zs = make_logits(13)
    s = zs.clone().requires_grad_()
    lp = torch.log_softmax(s, -1)
    loss, metrics = OPD(estimator=estimator, topk=3).loss({"student": lp, "teacher_plain": lp}, batch)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-6, rtol=0)
    assert abs(metrics["reverse_kl"]) < 1e-6


@pytest.mark.parametrize("estimator", ["sampled", "topk", "full"])
@pytest.mark.parametrize("target", ["teacher_plain", "teacher_full", "teacher_partial"])
def test_opd_target_never_receives_gradient(estimator, target):
    batch = make_batch(seed=14)
    zs, zt = make_logits(14), make_logits(15)
    s, t, views = views_for(zs, zt, target)
    method = OPD(estimator=estimator, target=target, topk=3)
    assert method.views == ("student", target) and method.on_policy and method.name == "opd"
    loss, _ = method.loss(views, batch)
    loss.backward()
    assert t.grad is None or (t.grad == 0).all()
    assert s.grad.abs().max() > 0


def test_opd_ignores_garbage_in_padding():
    """A target view may fill padded rows with -inf or NaN: neither may reach loss or gradient."""
    batch = make_batch(seed=16)
    zs, zt = make_logits(16), make_logits(17)
    for estimator in ("sampled", "topk", "full"):
        method = OPD(estimator=estimator, topk=3)
        s1, _, clean = views_for(zs, zt)
        s2 = zs.clone().requires_grad_()
        dirty_t = torch.log_softmax(zt, -1)
        dirty_t[1, 2:] = float("-inf")
        dirty_t[2, 1:] = float("nan")
        dirty = {"student": torch.log_softmax(s2, -1), "teacher_plain": dirty_t}
        weird = Batch(batch.response_ids.masked_fill(~MASK, -1), MASK.clone(), [{}] * B)
        a, ma = method.loss(clean, batch)
        b, mb = method.loss(dirty, weird)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(s1.grad, s2.grad)
        assert ma["reverse_kl"] == pytest.approx(mb["reverse_kl"])


def test_opd_empty_mask_zero_loss():
    mask = torch.zeros(B, N, dtype=torch.bool)
    batch = make_batch(seed=18, mask=mask)
    for estimator in ("sampled", "topk", "full"):
        s, _, views = views_for(make_logits(18), make_logits(19))
        loss, metrics = OPD(estimator=estimator).loss(views, batch)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
        assert all(v == v for v in metrics.values())  # no NaN


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"estimator": "exact"}, "estimator"),
        ({"target": "student"}, "target"),
        ({"target": "teacher"}, "target"),
        ({"reduction": "batch"}, "reduction"),
        ({"topk": 0}, "topk"),
        ({"topk": 2.5}, "topk"),
        ({"topk_from": "both"}, "topk_from"),
    ],
)
def test_opd_validates_options(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OPD(**kwargs)


def test_opd_error_lists_allowed_values():
    with pytest.raises(ValueError, match="sampled.*topk.*full"):
        OPD(estimator="exact")
