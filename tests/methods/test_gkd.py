"""GKD against float64 brute-force references written as loops over the vocabulary."""
from __future__ import annotations

import math

import pytest
import torch

from mmdistill.core.batch import Batch
from mmdistill.methods.gkd import GKD
from mmdistill.methods.opd import OPD
from tests.helpers import MASK, B, N, make_batch, make_logits, run_loss  # the SFT/OPD/GKD case


def run(method, zs, zt, batch, target="teacher_plain"):
    return run_loss(method, {"student": zs, target: zt}, batch)


def ref_gjsd(ls, lt, beta):
    """beta 0: KL(t||s); 1: KL(s||t); else KL(t||m)/(1-b) + KL(s||m)/b, m = b t + (1-b) s."""
    total = ls.new_zeros(())
    for v in range(ls.shape[0]):
        ps, pt = torch.exp(ls[v]), torch.exp(lt[v])
        if beta == 0:
            total = total + pt * (lt[v] - ls[v])
        elif beta == 1:
            total = total + ps * (ls[v] - lt[v])
        else:
            m = beta * pt + (1 - beta) * ps
            total = total + pt * torch.log(pt / m) / (1 - beta) + ps * torch.log(ps / m) / beta
    return total


def ref_loss(zs, zt, beta, mask=MASK, reduction="seq", fn=None):
    s = zs.double().clone().requires_grad_(True)
    ls, lt = s.log_softmax(-1), zt.double().log_softmax(-1)
    fn = fn or (lambda a, b: ref_gjsd(a, b, beta))
    if reduction == "token":
        vals = [fn(ls[b, n], lt[b, n]) for b in range(B) for n in range(N) if mask[b, n]]
        loss = sum(vals) / len(vals)
    else:
        means = []
        for b in range(B):
            vals = [fn(ls[b, n], lt[b, n]) for n in range(N) if mask[b, n]]
            if vals:
                means.append(sum(vals) / len(vals))
        loss = sum(means) / len(means)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("on_policy", [True, False], ids=["rollouts", "oracle"])
@pytest.mark.parametrize("reduction", ["seq", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_loss_and_gradient_equal_brute_force(beta, reduction, on_policy):
    zs, zt = make_logits(1), make_logits(2)
    loss, metrics, grad = run(GKD(beta=beta, reduction=reduction), zs, zt, make_batch(on_policy=on_policy))
    ref, ref_grad = ref_loss(zs, zt, beta, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["on_policy"] == (1.0 if on_policy else 0.0)
    assert (grad[~MASK] == 0).all()


def test_beta_ends_are_forward_and_reverse_kl():
    zs, zt = make_logits(3), make_logits(4)
    batch = make_batch()
    fwd, mf, _ = run(GKD(beta=0.0), zs, zt, batch)
    rev, mr, g_rev = run(GKD(beta=1.0), zs, zt, batch)
    assert fwd.item() == pytest.approx(mf["forward_kl"], rel=1e-6)
    assert rev.item() == pytest.approx(mr["reverse_kl"], rel=1e-6)
    assert abs(fwd.item() - rev.item()) > 1e-2
    opd, _, g_opd = run(OPD(estimator="full"), zs, zt, batch)
    torch.testing.assert_close(rev, opd)
    torch.testing.assert_close(g_rev, g_opd)

    def kl(p, q):
        return (p.exp() * (p - q)).sum()

    ref_fwd, _ = ref_loss(zs, zt, 0.0, fn=lambda ls, lt: kl(lt, ls))
    ref_rev, _ = ref_loss(zs, zt, 1.0, fn=kl)
    assert fwd.item() == pytest.approx(ref_fwd.item(), rel=1e-5)
    assert rev.item() == pytest.approx(ref_rev.item(), rel=1e-5)


@pytest.mark.parametrize("end,near", [(0.0, 1e-5), (1.0, 1 - 1e-5)])
def test_continuous_at_both_ends(end, near):
    zs, zt = make_logits(5, dtype=torch.float64), make_logits(6, dtype=torch.float64)
    batch = make_batch()
    a, _, ga = run(GKD(beta=end), zs, zt, batch)
    b, _, gb = run(GKD(beta=near), zs, zt, batch)
    mid, _, _ = run(GKD(beta=0.5), zs, zt, batch)
    assert abs(a.item() - b.item()) < 1e-3 * a.item()
    assert (ga - gb).abs().max() < 1e-3 * ga.abs().max()
    assert abs(mid.item() - a.item()) > 0.05 * a.item()


def test_metrics_and_batch_kind():
    zs, zt = make_logits(7), make_logits(8)
    _, m_on, _ = run(GKD(beta=0.3, lam=0.5), zs, zt, make_batch(on_policy=True))
    _, m_off, _ = run(GKD(beta=0.3, lam=0.5), zs, zt, make_batch(on_policy=False))
    assert m_on["on_policy"] == 1.0 and m_off["on_policy"] == 0.0
    assert {k: v for k, v in m_on.items() if k != "on_policy"} == {k: v for k, v in m_off.items() if k != "on_policy"}
    assert set(m_on) == {"loss", "reverse_kl", "forward_kl", "student_entropy", "teacher_entropy", "on_policy"}

    def ent(p, _):
        return -(p.exp() * p).sum()

    def kl(p, q):
        return (p.exp() * (p - q)).sum()

    checks = {
        "reverse_kl": kl,
        "forward_kl": lambda ls, lt: kl(lt, ls),
        "student_entropy": ent,
        "teacher_entropy": lambda ls, lt: ent(lt, None),
    }
    for key, fn in checks.items():
        assert m_on[key] == pytest.approx(ref_loss(zs, zt, 0.3, fn=fn)[0].item(), rel=1e-5), key
    assert all(isinstance(v, float) for v in m_on.values())


def test_protocol_fields_and_target_views():
    m = GKD(beta=0.2, lam=0.7)
    assert (m.name, m.views, m.on_policy_fraction, m.on_policy) == ("gkd", ("student", "teacher_plain"), 0.7, True)
    off = GKD(lam=0.0)
    assert off.on_policy is False and off.on_policy_fraction == 0.0
    zs, zt = make_logits(9), make_logits(10)
    for target in ("teacher_full", "teacher_partial", "student_priv"):
        m = GKD(beta=0.3, target=target)
        assert m.views == ("student", target)
        t = zt.clone().requires_grad_(True)
        loss, _, _ = run(m, zs, t, make_batch(), target=target)
        ref, _ = ref_loss(zs, zt, 0.3)
        torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
        assert t.grad is None


def test_padding_garbage_empty_mask_and_chunks():
    zs, zt = make_logits(11), make_logits(12)
    batch = make_batch()
    clean = run(GKD(beta=0.3), zs, zt, batch)
    dirty_t = zt.clone()
    dirty_t[~MASK] = float("nan")
    weird = Batch(batch.response_ids.masked_fill(~MASK, -100), MASK.clone(), [{}] * B)
    dirty = run(GKD(beta=0.3), zs, dirty_t, weird)
    torch.testing.assert_close(clean[0], dirty[0])
    torch.testing.assert_close(clean[2], dirty[2])
    for chunk in (0, 1, 3):
        loss, _, grad = run(GKD(beta=0.3, chunk_size=chunk), zs, zt, batch)
        torch.testing.assert_close(loss, clean[0])
        torch.testing.assert_close(grad, clean[2])
    empty = make_batch(mask=torch.zeros(B, N, dtype=torch.bool))
    loss, metrics, grad = run(GKD(beta=0.3), zs, zt, empty)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert not any(math.isnan(v) for v in metrics.values())


def test_identical_views_zero_loss_and_gradient():
    z = make_logits(13)
    for beta in (0.0, 0.3, 1.0):
        loss, _, grad = run(GKD(beta=beta), z, z.clone(), make_batch())
        assert abs(loss.item()) < 1e-6
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"beta": 1.5}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"lam": 1.1}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"target": "student"}, "target"),
        ({"reduction": "batch"}, "reduction"),
        ({"chunk_size": -2}, "chunk_size"),
        ({"jsd_scale": "trl"}, "jsd_scale"),
    ],
)
def test_validates_options(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GKD(**kwargs)


# ---------------------------------------------------------------- TRL's scale


def ref_gjsd_unscaled(ls, lt, beta):
    """beta 0: KL(t||s); 1: KL(s||t); else beta KL(t||m) + (1-beta) KL(s||m), m = b t + (1-b) s."""
    total = ls.new_zeros(())
    for v in range(ls.shape[0]):
        ps, pt = torch.exp(ls[v]), torch.exp(lt[v])
        if beta == 0:
            total = total + pt * (lt[v] - ls[v])
        elif beta == 1:
            total = total + ps * (ls[v] - lt[v])
        else:
            m = beta * pt + (1 - beta) * ps
            total = total + beta * pt * torch.log(pt / m) + (1 - beta) * ps * torch.log(ps / m)
    return total


def trl_loss(student_logits, teacher_logits, labels, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (temperature 1, reduction "batchmean"), written out:
    per-token generalized JSD, masked where labels == -100, summed and divided by the tokens kept."""
    F = torch.nn.functional
    ls, lt = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        mix = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
        jsd = (b * F.kl_div(mix, lt, reduction="none", log_target=True)
               + (1 - b) * F.kl_div(mix, ls, reduction="none", log_target=True))
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("reduction", ["seq", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_unscaled_loss_and_gradient_equal_brute_force(beta, reduction):
    zs, zt = make_logits(20), make_logits(21)
    loss, _, grad = run(GKD(beta=beta, reduction=reduction, jsd_scale="unscaled"), zs, zt, make_batch())
    ref, ref_grad = ref_loss(zs, zt, beta, reduction=reduction, fn=lambda a, b: ref_gjsd_unscaled(a, b, beta))
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert ref.item() > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_unscaled_token_mean_is_trls_loss(beta):
    """TRL's "batchmean" is a mean over all kept tokens: mmdistill's reduction="token"."""
    zs, zt = make_logits(22, dtype=torch.float64), make_logits(23, dtype=torch.float64)
    batch = make_batch()
    labels = batch.response_ids.masked_fill(~MASK, -100)
    s = zs.clone().requires_grad_(True)
    ref = trl_loss(s, zt, labels, beta)
    ref.backward()
    loss, _, grad = run(GKD(beta=beta, reduction="token", jsd_scale="unscaled"), zs, zt, batch)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, s.grad)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.7])
def test_default_scale_is_trls_over_beta_one_minus_beta(beta):
    """So at beta 0.5 the default loss, and its gradient, are 4x TRL's."""
    zs, zt = make_logits(24, dtype=torch.float64), make_logits(25, dtype=torch.float64)
    batch = make_batch()
    assert GKD().jsd_scale == "continuous"
    a, _, ga = run(GKD(beta=beta), zs, zt, batch)
    b, _, gb = run(GKD(beta=beta, jsd_scale="unscaled"), zs, zt, batch)
    factor = 1 / (beta * (1 - beta))
    torch.testing.assert_close(a, factor * b)
    torch.testing.assert_close(ga, factor * gb)


@pytest.mark.parametrize("end,near", [(0.0, 1e-5), (1.0, 1 - 1e-5)])
def test_unscaled_jumps_at_both_ends(end, near):
    """TRL's scale is not continuous in beta: next to an end the loss is about 1e-5 of the end's KL."""
    zs, zt = make_logits(5, dtype=torch.float64), make_logits(6, dtype=torch.float64)
    batch = make_batch()
    a, _, _ = run(GKD(beta=end, jsd_scale="unscaled"), zs, zt, batch)
    b, _, _ = run(GKD(beta=near, jsd_scale="unscaled"), zs, zt, batch)
    assert a.item() > 0.1 and b.item() < 1e-4 * a.item()
