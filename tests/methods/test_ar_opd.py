"""AR-OPD against float64 brute-force references written as loops over the vocabulary."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mmdistill.core.batch import Batch
from mmdistill.methods.ar_opd import AROPD, anchored_residual_target, skip_mask
from mmdistill.methods.gkd import GKD
from mmdistill.methods.opd import OPD
from tests import helpers
from tests.helpers import make_logits, run_loss

B, N, V = 3, 5, 7
INF = float("inf")
# lengths 5, 3, 1: with skip=2 the last response keeps nothing.
MASK = torch.tensor(
    [
        [True, True, True, True, True],
        [True, True, True, False, False],
        [True, False, False, False, False],
    ]
)


make_batch = partial(helpers.make_batch, mask=MASK, vocab=V)


def three(seed=0, shape=(B, N, V), dtype=torch.float32):
    return tuple(make_logits(seed * 10 + k, shape=shape, dtype=dtype) for k in range(3))


def run(method, zs, zf, zp, batch):
    """(loss, metrics, student grad) with raw logits as views."""
    return run_loss(method, {"student": zs, "teacher_full": zf, "teacher_partial": zp}, batch)


# ---------------------------------------------------------------- brute-force reference


def ref_log_softmax(z):
    """A list of scalar tensors -> list of log-probs, -inf entries allowed."""
    finite = [x for x in z if x.item() != -INF]
    m = max(x.item() for x in finite)
    log_z = torch.log(sum(torch.exp(x - m) for x in finite)) + m
    return [x - log_z if x.item() != -INF else x for x in z]


def ref_target(zf, zp, lam, clip, T=1.0):
    lf = ref_log_softmax([zf[v] / T for v in range(len(zf))])
    lp = ref_log_softmax([zp[v] / T for v in range(len(zp))])
    u = []
    for v in range(len(lf)):
        r = lf[v] - lp[v]
        if clip is not None:
            r = torch.clamp(r, -clip, clip)
        u.append(lp[v] + lam * r)
    return ref_log_softmax(u)


def ref_div(ls, lt, alpha):
    """alpha 0: KL(t||s); 1: KL(s||t); between: KL(t||m)/(1-a) + KL(s||m)/a, m = a t + (1-a) s."""
    total = ls[0].new_zeros(())
    for v in range(len(ls)):
        ps, pt = torch.exp(ls[v]), torch.exp(lt[v])
        if alpha == 0:
            if pt.item() > 0:
                total = total + pt * (lt[v] - ls[v])
        elif alpha == 1:
            total = total + ps * (ls[v] - lt[v])
        else:
            m = alpha * pt + (1 - alpha) * ps
            if pt.item() > 0:
                total = total + pt * torch.log(pt / m) / (1 - alpha)
            total = total + ps * torch.log(ps / m) / alpha
    return total


def kept_positions(mask, skip):
    out = []
    for b in range(mask.shape[0]):
        seen, row = 0, []
        for n in range(mask.shape[1]):
            if mask[b, n]:
                seen += 1
                if seen > skip:
                    row.append(n)
        out.append(row)
    return out


def ref_reduce(per_pos, kept, reduction):
    """per_pos[(b, n)] -> masked mean over the kept positions."""
    if reduction == "token":
        vals = [per_pos[(b, n)] for b, row in enumerate(kept) for n in row]
        return sum(vals) / len(vals)
    means = [sum(per_pos[(b, n)] for n in row) / len(row) for b, row in enumerate(kept) if row]
    return sum(means) / len(means)


def ref_aropd(zs, zf, zp, mask, lam, clip, alpha, skip, T=1.0, reduction="seq"):
    """(loss, grad wrt zs) in float64."""
    s = zs.double().clone().requires_grad_(True)
    kept = kept_positions(mask, skip)
    per_pos = {}
    for b, row in enumerate(kept):
        for n in row:
            ls = ref_log_softmax([s[b, n, v] for v in range(s.shape[2])])
            lt = ref_target(zf[b, n].double(), zp[b, n].double(), lam, clip, T)
            per_pos[(b, n)] = ref_div(ls, lt, alpha)
    loss = ref_reduce(per_pos, kept, reduction)
    loss.backward()
    return loss.detach(), s.grad


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("clip", [1.0, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("lam", [0.0, 0.4, 0.8, 1.0, 1.4])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_and_gradient_equal_brute_force(alpha, lam, clip):
    zs, zf, zp = three(1)
    batch = make_batch()
    loss, metrics, grad = run(AROPD(lam=lam, clip=clip, alpha=alpha, skip=1), zs, zf, zp, batch)
    ref, ref_grad = ref_aropd(zs, zf, zp, MASK, lam, clip, alpha, skip=1)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert ref.item() > 1e-3


def test_clip_is_active_in_the_grid_data():
    """Otherwise the clip=1 half of the grid above would not test the clamp."""
    zs, zf, zp = three(1)
    r = zf.log_softmax(-1) - zp.log_softmax(-1)
    assert (r[MASK].abs() > 1.0).float().mean() > 0.3
    a, _, _ = run(AROPD(lam=0.8, clip=1.0, skip=1), zs, zf, zp, make_batch())
    b, _, _ = run(AROPD(lam=0.8, clip=None, skip=1), zs, zf, zp, make_batch())
    assert abs(a.item() - b.item()) > 1e-2


@pytest.mark.parametrize("reduction", ["seq", "token"])
def test_reduction_and_temperature_against_brute_force(reduction):
    zs, zf, zp = three(2)
    loss, _, grad = run(AROPD(lam=0.8, clip=2.0, alpha=0.3, skip=2, temperature=1.7, reduction=reduction),
                        zs, zf, zp, make_batch())
    ref, ref_grad = ref_aropd(zs, zf, zp, MASK, 0.8, 2.0, 0.3, skip=2, T=1.7, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


def test_temperature_scales_the_teachers_only():
    zs, zf, zp = three(3)
    batch = make_batch()
    a, ma, ga = run(AROPD(temperature=2.0, skip=0), zs, zf, zp, batch)
    b, mb, gb = run(AROPD(temperature=1.0, skip=0), zs, zf / 2, zp / 2, batch)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    assert ma == pytest.approx(mb, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- the two ends of lam


def _opd_style(alpha, target, zs, zt, batch):
    """The same divergence straight to one teacher view (GKD's gJSD, beta = alpha)."""
    s = zs.clone().requires_grad_(True)
    loss, _ = GKD(beta=alpha, lam=1.0, target=target).loss({"student": s, target: zt}, batch)
    loss.backward()
    return loss, s.grad


@pytest.mark.parametrize("clip", [5.0, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_lam_zero_is_partial_opd(alpha, clip):
    zs, zf, zp = three(4)
    batch = make_batch()
    loss, _, grad = run(AROPD(lam=0.0, clip=clip, alpha=alpha, skip=0), zs, zf, zp, batch)
    ref, ref_grad = _opd_style(alpha, "teacher_partial", zs, zp, batch)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    full, _ = _opd_style(alpha, "teacher_full", zs, zf, batch)
    assert abs(loss.item() - full.item()) > 1e-2


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_lam_one_without_clip_is_full_opd(alpha):
    zs, zf, zp = three(5)
    batch = make_batch()
    loss, _, grad = run(AROPD(lam=1.0, clip=None, alpha=alpha, skip=0), zs, zf, zp, batch)
    ref, ref_grad = _opd_style(alpha, "teacher_full", zs, zf, batch)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    clipped, _, _ = run(AROPD(lam=1.0, clip=0.5, alpha=alpha, skip=0), zs, zf, zp, batch)
    assert abs(clipped.item() - ref.item()) > 1e-2


@pytest.mark.parametrize("target,lam", [("teacher_partial", 0.0), ("teacher_full", 1.0)])
def test_reverse_kl_ends_equal_opd_full_estimator(target, lam):
    zs, zf, zp = three(6)
    batch = make_batch()
    loss, _, grad = run(AROPD(lam=lam, clip=None, alpha=1.0, skip=0), zs, zf, zp, batch)
    s = zs.clone().requires_grad_(True)
    ref, _ = OPD(estimator="full", target=target).loss(
        {"student": s, "teacher_full": zf, "teacher_partial": zp}, batch
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, s.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the clip


def test_clip_caps_the_residual_at_c():
    zp = torch.zeros(1, 4, dtype=torch.float64)
    zf = torch.tensor([[10.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    lf, lp = zf.log_softmax(-1), zp.log_softmax(-1)
    assert (lf - lp)[0, 0] > 1.3 and (lf - lp)[0, 1:].max() < -8  # both ends exceed c = 1
    for lam in (0.4, 1.0, 1.4):
        got = anchored_residual_target(lf, lp, lam, 1.0)
        expected = (lp + lam * torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)).log_softmax(-1)
        torch.testing.assert_close(got, expected)
        unclipped = anchored_residual_target(lf, lp, lam, None)
        torch.testing.assert_close(unclipped, (lp + lam * (lf - lp)).log_softmax(-1))
        assert (got - unclipped).abs().max() > 0.1
    # and the method uses that target: forward KL to the student equals the brute force
    zs = torch.randn(1, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = Batch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), [{}])
    loss, _, _ = run(AROPD(lam=1.0, clip=1.0, alpha=0.0, skip=0), zs, zf[None], zp[None], batch)
    lt = anchored_residual_target(lf, lp, 1.0, 1.0)[0]
    expected = (lt.exp() * (lt - zs[0, 0].log_softmax(-1))).sum()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("clip", [0, -1.0, None])
def test_nonpositive_clip_means_no_clip(clip):
    assert AROPD(clip=clip).clip is None
    zs, zf, zp = three(7)
    batch = make_batch()
    a, _, _ = run(AROPD(clip=clip, skip=0), zs, zf, zp, batch)
    b, _, _ = run(AROPD(clip=1e9, skip=0), zs, zf, zp, batch)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_views_without_zeros_build_the_masked_target_bit_for_bit(dtype, monkeypatch):
    """On the CPU, two views with no -inf entry build the target without boolean masks: the
    same numbers as the masked path, for every lam and clip; one -inf takes the masked path."""
    import mmdistill.methods.ar_opd as A

    g = torch.Generator().manual_seed(3)
    lf = torch.log_softmax(torch.randn(4, 6, 40, generator=g, dtype=dtype) * 4, -1)
    lp = torch.log_softmax(torch.randn(4, 6, 40, generator=g, dtype=dtype) * 4, -1)
    settings = [(lam, clip) for lam in (0.0, 0.8, 1.0, 1.5) for clip in (5.0, 0.3, None, 0.0)]
    taken = []
    real = A.none_absent
    monkeypatch.setattr(A, "none_absent", lambda *t: taken.append(real(*t)) or taken[-1])
    fast = [anchored_residual_target(lf, lp, lam, clip) for lam, clip in settings]
    assert taken == [True] * len(settings)
    monkeypatch.setattr(A, "none_absent", lambda *t: False)
    for (lam, clip), got in zip(settings, fast):
        assert torch.equal(got, anchored_residual_target(lf, lp, lam, clip)), (lam, clip)
    assert (lf - lp).abs().max() > 5  # the clip at 5 and 0.3 both bind somewhere
    lf[0, 0, 0] = -INF
    assert not real(lf, lp)


# ---------------------------------------------------------------- -inf entries


def test_minus_inf_entries_follow_the_documented_limits():
    lf = torch.tensor([[-1.0, -2.0, -3.0, -INF]]).log_softmax(-1)
    lp = torch.tensor([[-1.0, -INF, -0.5, -2.0]]).log_softmax(-1)
    # clip on: support is the anchor's; lF = -inf clamps to -c
    t = anchored_residual_target(lf, lp, 0.8, 5.0)
    assert t[0, 1] == -INF and torch.isfinite(t[0, [0, 2, 3]]).all()
    r3 = -5.0
    u = torch.stack([lp[0, 0] + 0.8 * (lf[0, 0] - lp[0, 0]).clamp(-5, 5),
                     lp[0, 2] + 0.8 * (lf[0, 2] - lp[0, 2]).clamp(-5, 5),
                     lp[0, 3] + 0.8 * r3])
    torch.testing.assert_close(t[0, [0, 2, 3]], u.log_softmax(-1))
    # clip off: lam = 0 -> exactly lP, lam = 1 -> exactly lF, otherwise the common support
    torch.testing.assert_close(anchored_residual_target(lf, lp, 0.0, None), lp)
    torch.testing.assert_close(anchored_residual_target(lf, lp, 1.0, None), lf)
    for lam in (0.5, 1.4):
        t = anchored_residual_target(lf, lp, lam, None)
        assert t[0, 1] == -INF and t[0, 3] == -INF
        keep = [0, 2]
        torch.testing.assert_close(t[0, keep], (lp[0, keep] + lam * (lf[0, keep] - lp[0, keep])).log_softmax(-1))
    # disjoint supports: the anchor
    lf2 = torch.tensor([[0.0, -INF]])
    lp2 = torch.tensor([[-INF, 0.0]])
    torch.testing.assert_close(anchored_residual_target(lf2, lp2, 0.5, None), lp2)
    for lam, clip in [(0.0, None), (0.4, 5.0), (1.0, None), (1.4, None), (1.4, 5.0), (0.5, None)]:
        assert not torch.isnan(anchored_residual_target(lf, lp, lam, clip)).any()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lam,clip", [(0.8, 5.0), (1.0, None), (0.5, None)])
def test_masked_vocab_in_the_teachers_gives_finite_loss_and_gradient(alpha, lam, clip):
    zs, zf, zp = three(8)
    zp = zp.clone()
    zp[..., 2] = -INF  # partial view excludes a token the full view allows
    zf = zf.clone()
    zf[..., 4] = -INF
    batch = make_batch()
    loss, metrics, grad = run(AROPD(lam=lam, clip=clip, alpha=alpha, skip=0), zs, zf, zp, batch)
    if alpha == 1.0:
        # reverse KL to a target that excludes tokens the student has is +inf, as in OPD
        assert loss.item() == INF
        return
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if lam == 1.0 and clip is None:
        ref, ref_grad = _opd_style(alpha, "teacher_full", zs, zf, batch)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert metrics["belief_shift"] == INF  # qF has mass on token 2, qP none
    assert all(not math.isnan(v) for k, v in metrics.items() if k != "residual_uptake")


# ---------------------------------------------------------------- skip, padding, chunks


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_skip_equals_a_mask_without_the_first_tokens(skip):
    zs, zf, zp = three(9)
    batch = make_batch()
    loss, metrics, grad = run(AROPD(skip=skip, alpha=0.5), zs, zf, zp, batch)
    trimmed = MASK.clone()
    for b in range(B):
        trimmed[b, :skip] = False
    ref, ref_metrics, ref_grad = run(AROPD(skip=0, alpha=0.5), zs, zf, zp, make_batch(mask=trimmed))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert metrics == pytest.approx(ref_metrics, rel=1e-6, abs=1e-7)
    assert (grad[:, :skip] == 0).all() and (grad[~MASK] == 0).all()
    assert grad[trimmed].abs().amax(-1).min() > 0


def test_sequence_shorter_than_skip_contributes_nothing():
    zs, zf, zp = three(10)
    batch = make_batch()
    loss, _, grad = run(AROPD(skip=2), zs, zf, zp, batch)
    zs2 = zs.clone()
    zs2[2] = torch.randn(N, V) * 5  # the 1-token response
    loss2, _, _ = run(AROPD(skip=2), zs2, zf, zp, batch)
    torch.testing.assert_close(loss, loss2)
    assert (grad[2] == 0).all()
    # the mean is over the two sequences that keep tokens, not three
    ref, _ = ref_aropd(zs, zf, zp, MASK, 0.8, 5.0, 0.0, skip=2)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)


def test_skip_counts_response_tokens_not_positions():
    left = torch.tensor([[False, False, True, True, True], [True, True, True, True, True],
                         [False, True, True, False, False]])
    kept = skip_mask(left, 2)
    assert kept.tolist() == [[False, False, False, False, True], [False, False, True, True, True],
                             [False, False, False, False, False]]
    zs, zf, zp = three(11)
    loss, _, grad = run(AROPD(skip=2, alpha=0.5, lam=1.4), zs, zf, zp, make_batch(mask=left))
    ref, ref_grad = ref_aropd(zs, zf, zp, left, 1.4, 5.0, 0.5, skip=2)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


def test_nan_in_padded_and_skipped_teacher_rows_is_never_read():
    zs, zf, zp = three(12)
    batch = make_batch()
    clean = run(AROPD(skip=2, alpha=0.5), zs, zf, zp, batch)
    zf2, zp2 = zf.clone(), zp.clone()
    dropped = ~skip_mask(MASK, 2)
    zf2[dropped] = float("nan")
    zp2[~MASK] = float("nan")
    zp2[0, 0] = -INF
    weird = Batch(batch.response_ids.masked_fill(~MASK, -100), MASK.clone(), [{}] * B)
    dirty = run(AROPD(skip=2, alpha=0.5), zs, zf2, zp2, weird)
    torch.testing.assert_close(clean[0], dirty[0])
    torch.testing.assert_close(clean[2], dirty[2])
    assert clean[1] == pytest.approx(dirty[1])


@pytest.mark.parametrize("mask", [torch.zeros(B, N, dtype=torch.bool), MASK], ids=["empty", "all-skipped"])
@pytest.mark.parametrize("chunk", [0, 2])
def test_empty_mask_zero_loss_and_gradient(mask, chunk):
    zs, zf, zp = three(13)
    loss, metrics, grad = run(AROPD(skip=5, chunk_size=chunk), zs, zf, zp, make_batch(mask=mask))
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(v == 0.0 for v in metrics.values())


def test_chunk_sizes_agree():
    zs, zf, zp = three(14)
    batch = make_batch()
    outs = [run(AROPD(skip=1, alpha=0.5, lam=1.4, chunk_size=c), zs, zf, zp, batch) for c in (0, 1, 3, None, 1024)]
    for loss, metrics, grad in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0])
        torch.testing.assert_close(grad, outs[0][2])
        assert metrics == pytest.approx(outs[0][1], rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("lam,clip", [(0.0, 5.0), (0.8, 5.0), (1.0, None), (1.4, None)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_identical_views_give_zero_loss_and_gradient(alpha, lam, clip):
    z = make_logits(15, shape=(B, N, V))
    loss, metrics, grad = run(AROPD(lam=lam, clip=clip, alpha=alpha, skip=1), z, z.clone(), z.clone(), make_batch())
    assert abs(loss.item()) < 1e-6
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)
    for key in ("belief_shift", "anchor_drift", "residual_uptake", "entropy_gap"):
        assert abs(metrics[key]) < 1e-5
    assert metrics["top16_overlap"] == 1.0
    assert metrics["target_entropy"] == pytest.approx(metrics["student_entropy"], rel=1e-5)


def test_teachers_never_receive_gradient_and_protocol_fields():
    m = AROPD()
    assert (m.name, m.on_policy, m.views) == ("ar_opd", True, ("student", "teacher_full", "teacher_partial"))
    assert ((m.lam, m.clip, m.alpha, m.skip, m.temperature, m.reduction, m.chunk_size)
            == (0.8, 5.0, 0.0, 3, 1.0, "seq", None))
    assert (m.jsd_scale, m.empty_sequences) == ("continuous", "exclude")
    zs, zf, zp = three(16)
    s, f, p = (x.clone().requires_grad_(True) for x in (zs, zf, zp))
    loss, _ = m.loss({"student": s, "teacher_full": f, "teacher_partial": p}, make_batch())
    loss.backward()
    assert f.grad is None and p.grad is None
    assert s.grad.abs().max() > 0


def test_bfloat16_views_agree_with_float32():
    zs, zf, zp = three(17)
    batch = make_batch()
    x = zs.to(torch.bfloat16).requires_grad_(True)
    loss, _ = AROPD(skip=1).loss({"student": x, "teacher_full": zf.bfloat16(), "teacher_partial": zp.bfloat16()}, batch)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    ref, _, _ = run(AROPD(skip=1), zs.bfloat16().float(), zf.bfloat16().float(), zp.bfloat16().float(), batch)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


# ---------------------------------------------------------------- diagnostics


def test_diagnostics_equal_brute_force():
    shape = (2, 4, 24)  # a vocabulary above 16 so the top-16 overlap is not trivially 1
    zs, zf, zp = three(18, shape=shape)
    zf = zf + zs * 0.7  # partly agreeing views: overlap strictly between 0 and 1
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    T, skip = 1.5, 1
    _, metrics, _ = run(AROPD(lam=0.8, clip=1.0, temperature=T, skip=skip), zs, zf, zp, make_batch(mask=mask))

    def kl(a, b):
        return sum(math.exp(a[v]) * (a[v] - b[v]) for v in range(len(a)))

    def ent(a):
        return -sum(math.exp(x) * x for x in a)

    def as_list(t):
        return [torch.tensor(x, dtype=torch.float64) for x in t.double().tolist()]

    kept = kept_positions(mask, skip)
    per = {k: {} for k in ("belief_shift", "anchor_drift", "residual_uptake", "top16_overlap", "entropy_gap",
                           "student_entropy", "target_entropy")}
    for b, row in enumerate(kept):
        for n in row:
            pi = [x.item() for x in ref_log_softmax(as_list(zs[b, n]))]
            qf = [x.item() for x in ref_log_softmax([x / T for x in as_list(zf[b, n])])]
            qp = [x.item() for x in ref_log_softmax([x / T for x in as_list(zp[b, n])])]
            tgt = [x.item() for x in ref_target(zf[b, n].double(), zp[b, n].double(), 0.8, 1.0, T)]

            def top(a):
                return set(sorted(range(len(a)), key=lambda v: -a[v])[:16])

            per["belief_shift"][(b, n)] = kl(qf, qp)
            per["anchor_drift"][(b, n)] = kl(qp, pi)
            per["residual_uptake"][(b, n)] = kl(qp, pi) - kl(qf, pi)
            per["top16_overlap"][(b, n)] = len(top(pi) & top(qf)) / 16
            per["entropy_gap"][(b, n)] = abs(ent(qf) - ent(pi))
            per["student_entropy"][(b, n)] = ent(pi)
            per["target_entropy"][(b, n)] = ent(tgt)
    for key, vals in per.items():
        assert metrics[key] == pytest.approx(ref_reduce(vals, kept, "seq"), rel=1e-5, abs=1e-6), key
    assert 0.0 < metrics["top16_overlap"] < 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert set(metrics) == set(per) | {"loss"}


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"skip": -1}, "skip"),
        ({"skip": 1.5}, "skip"),
        ({"temperature": 0.0}, "temperature"),
        ({"clip": "5"}, "clip"),
        ({"reduction": "batch"}, "reduction"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"jsd_scale": "trl"}, "jsd_scale"),
        ({"empty_sequences": "drop"}, "empty_sequences"),
    ],
)
def test_validates_options(kwargs, key):
    with pytest.raises(ValueError, match=key):
        AROPD(**kwargs)


def test_rejects_misaligned_views():
    zs, zf, zp = three(19)
    with pytest.raises(ValueError):
        AROPD().loss({"student": zs, "teacher_full": zf[:, :-1], "teacher_partial": zp}, make_batch())


# ---------------------------------------------------------------- the release's choices


def ref_div_unscaled(ls, lt, alpha):
    """alpha 0: KL(t||s); 1: KL(s||t); between: alpha KL(t||m) + (1-alpha) KL(s||m), m = a t + (1-a) s."""
    if alpha in (0, 1):
        return ref_div(ls, lt, alpha)
    total = ls[0].new_zeros(())
    for v in range(len(ls)):
        ps, pt = torch.exp(ls[v]), torch.exp(lt[v])
        m = alpha * pt + (1 - alpha) * ps
        total = total + alpha * pt * torch.log(pt / m) + (1 - alpha) * ps * torch.log(ps / m)
    return total


def ref_aropd_release_choices(zs, zf, zp, mask, lam, clip, alpha, skip, unscaled, zero):
    """Brute force with the release's divergence scale and/or batch mean (empty sequences as 0)."""
    s = zs.double().clone().requires_grad_(True)
    kept = kept_positions(mask, skip)
    means = []
    for b, row in enumerate(kept):
        vals = []
        for n in row:
            ls = ref_log_softmax([s[b, n, v] for v in range(s.shape[2])])
            lt = ref_target(zf[b, n].double(), zp[b, n].double(), lam, clip)
            vals.append(ref_div_unscaled(ls, lt, alpha) if unscaled else ref_div(ls, lt, alpha))
        if vals:
            means.append(sum(vals) / len(vals))
        elif zero:
            means.append(s.new_zeros(()))
    loss = sum(means) / len(means)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("zero", [False, True], ids=["exclude", "zero"])
@pytest.mark.parametrize("unscaled", [False, True], ids=["continuous", "unscaled"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_release_choices_against_brute_force(alpha, unscaled, zero):
    zs, zf, zp = three(20)
    method = AROPD(lam=0.8, clip=1.0, alpha=alpha, skip=2, jsd_scale="unscaled" if unscaled else "continuous",
                   empty_sequences="zero" if zero else "exclude")
    loss, _, grad = run(method, zs, zf, zp, make_batch())  # MASK with skip 2: the last response keeps nothing
    ref, ref_grad = ref_aropd_release_choices(zs, zf, zp, MASK, 0.8, 1.0, alpha, 2, unscaled, zero)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert ref.item() > 1e-3


def release_loss(zs, zf, zp, completion_mask, lam, clip, alpha, skip):
    """The AR-OPD release's GD-SDFT loss for one micro-batch, written out after its code
    (distil_trainer.py: _compute_gdsdft_target, _compute_distillation_kl, the loss mask that drops
    positions < num_loss_tokens_to_skip of right-padded completions, _reduce_sequence_loss with unit
    sample weights); the temperature is 1, as in its scripts."""
    F = torch.nn.functional
    ls, lf, lp = zs.log_softmax(-1), zf.log_softmax(-1), zp.log_softmax(-1)
    target = torch.log_softmax(lp + lam * (lf - lp).clamp(min=-clip, max=clip), dim=-1)
    if alpha == 0:
        per_token = F.kl_div(ls, target, reduction="none", log_target=True).sum(-1)
    elif alpha == 1:
        per_token = F.kl_div(target, ls, reduction="none", log_target=True).sum(-1)
    else:
        a = torch.tensor(alpha, dtype=ls.dtype)
        mix = torch.logsumexp(torch.stack([ls + torch.log(1 - a), target + torch.log(a)]), dim=0)
        per_token = (a * F.kl_div(mix, target, reduction="none", log_target=True)
                     + (1 - a) * F.kl_div(mix, ls, reduction="none", log_target=True)).sum(-1)
    positions = torch.arange(completion_mask.shape[1]).unsqueeze(0).expand_as(completion_mask)
    loss_mask = completion_mask.int() * (positions >= skip).int()
    sample_loss = (per_token * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)
    weights = torch.ones(completion_mask.shape[0], dtype=sample_loss.dtype)
    return (sample_loss * weights).sum() / weights.sum()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_release_settings_equal_the_release_loss(alpha):
    """configs/ar_opd_release.yaml's method options give the release's loss and gradient, a
    response shorter than skip (the third) included."""
    mask = torch.tensor([[True] * 5, [True, True, True, True, False], [True, True, False, False, False]])
    zs, zf, zp = three(21, dtype=torch.float64)
    zf = zf * 3  # residuals beyond the clip
    assert ((zf.log_softmax(-1) - zp.log_softmax(-1)).abs() > 5).any()
    options = dict(lam=0.8, clip=5.0, alpha=alpha, skip=3, temperature=1.0, reduction="seq",
                   jsd_scale="unscaled", empty_sequences="zero")
    loss, _, grad = run(AROPD(**options), zs, zf, zp, make_batch(mask=mask))
    s = zs.clone().requires_grad_(True)
    ref = release_loss(s, zf, zp, mask, 0.8, 5.0, alpha, 3)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, s.grad)


def test_empty_sequences_zero_scales_the_loss_not_the_diagnostics():
    zs, zf, zp = three(22)
    batch = make_batch()  # with skip 2, one of the three responses keeps nothing
    a, ma, ga = run(AROPD(skip=2, alpha=0.5), zs, zf, zp, batch)
    b, mb, gb = run(AROPD(skip=2, alpha=0.5, empty_sequences="zero"), zs, zf, zp, batch)
    torch.testing.assert_close(b, a * 2 / 3)
    torch.testing.assert_close(gb, ga * 2 / 3)
    assert mb.pop("loss") == pytest.approx(ma.pop("loss") * 2 / 3, rel=1e-6)
    assert mb == pytest.approx(ma, rel=1e-6, abs=1e-7)
    # nothing changes when every response keeps a token, and nothing is lost when none does
    c, _, _ = run(AROPD(skip=0, empty_sequences="zero"), zs, zf, zp, batch)
    d, _, _ = run(AROPD(skip=0), zs, zf, zp, batch)
    torch.testing.assert_close(c, d)
    e, _, ge = run(AROPD(skip=5, empty_sequences="zero"), zs, zf, zp, batch)
    assert e.item() == 0.0 and torch.equal(ge, torch.zeros_like(ge))


def test_unscaled_is_the_continuous_loss_times_alpha_one_minus_alpha_and_jumps_at_the_ends():
    zs, zf, zp = three(23, dtype=torch.float64)
    batch = make_batch()
    for alpha in (0.2, 0.5):
        a, _, ga = run(AROPD(alpha=alpha, skip=1), zs, zf, zp, batch)
        b, _, gb = run(AROPD(alpha=alpha, skip=1, jsd_scale="unscaled"), zs, zf, zp, batch)
        torch.testing.assert_close(b, alpha * (1 - alpha) * a)
        torch.testing.assert_close(gb, alpha * (1 - alpha) * ga)
    for end, near in ((0.0, 1e-6), (1.0, 1 - 1e-6)):
        at_end, _, _ = run(AROPD(alpha=end, skip=1, jsd_scale="unscaled"), zs, zf, zp, batch)
        assert at_end.item() == pytest.approx(run(AROPD(alpha=end, skip=1), zs, zf, zp, batch)[0].item())
        cont, _, _ = run(AROPD(alpha=near, skip=1), zs, zf, zp, batch)
        jump, _, _ = run(AROPD(alpha=near, skip=1, jsd_scale="unscaled"), zs, zf, zp, batch)
        assert cont.item() == pytest.approx(at_end.item(), rel=1e-4)  # continuous
        assert jump.item() < 1e-5 * at_end.item()  # the release's scale is not
