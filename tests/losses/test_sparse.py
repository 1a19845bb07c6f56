"""A served teacher's top-k against the full vocabulary, by brute force on small tensors: what is
exact (the sampled token, a top-K over the teacher's own ids, DOPD's routing) equals the local
teacher's computation, and the tail-bucket approximation of full-vocabulary terms equals the full
computation with the teacher's unknown tail filled in proportion to the student's, and bounds the
true value from below."""
from __future__ import annotations

import pytest
import torch

from mmdistill.core.batch import SparseLogProbs
from mmdistill.losses.divergences import generalized_jsd, js, reverse_kl, topk_reverse_kl
from mmdistill.losses.sparse import TAIL_FLOOR, tail_buckets, teacher_topk
from mmdistill.methods.dopd import DOPD
from mmdistill.methods.gkd import GKD
from mmdistill.methods.opd import OPD
from tests.helpers import run_loss

C, V, K = 6, 11, 4


def logprobs(seed: int, shape=(C, V), scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1)


def sparse_of(lt: torch.Tensor, y: torch.Tensor, k: int):
    """What a server returns for log-probs lt: the top-k and the sampled token's log-prob."""
    top = lt.topk(k, dim=-1)
    return top.indices, top.values, lt.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def filled(ls: torch.Tensor, lt: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The brute-force reference: the teacher, exact on its top-k and on y, its remaining mass spread
    over the other ids in proportion to the student's probabilities there."""
    known = torch.zeros_like(lt, dtype=torch.bool).scatter(-1, lt.topk(k, dim=-1).indices, True)
    known.scatter_(-1, y.unsqueeze(-1), True)
    rest_t = 1 - lt.exp().masked_fill(~known, 0).sum(-1, keepdim=True)
    ps = ls.exp().masked_fill(known, 0)
    return torch.where(known, lt, torch.log(rest_t * ps / ps.sum(-1, keepdim=True)))


def ids_outside_and_inside(lt: torch.Tensor, k: int) -> torch.Tensor:
    """Sampled ids: half of the rows outside the teacher's top-k, half inside."""
    order = lt.argsort(-1, descending=True)
    return torch.where(torch.arange(C) % 2 == 0, order[:, -1], order[:, 1])


def test_the_buckets_hold_the_sampled_token_exactly_and_partition_the_student():
    ls, lt = logprobs(0), logprobs(1)
    y = ids_outside_and_inside(lt, K)
    ls_b, lt_b, y_b = tail_buckets(ls, *sparse_of(lt, y, K), y)
    assert torch.equal(ls_b.gather(-1, y_b[:, None])[:, 0], ls.gather(-1, y[:, None])[:, 0])
    assert torch.equal(lt_b.gather(-1, y_b[:, None])[:, 0], lt.gather(-1, y[:, None])[:, 0])
    torch.testing.assert_close(ls_b.exp().sum(-1), torch.ones(C, dtype=torch.float64))
    torch.testing.assert_close(lt_b.exp().sum(-1), torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("name,fn", [("reverse_kl", reverse_kl), ("js", js),
                                     ("gjsd", lambda a, b: generalized_jsd(a, b, 0.3)),
                                     ("forward_kl", lambda a, b: generalized_jsd(a, b, 0.0))])
def test_the_tail_approximation_is_the_full_divergence_with_a_proportional_tail_and_a_lower_bound(name, fn):
    ls, lt = logprobs(2), logprobs(3)
    y = ids_outside_and_inside(lt, K)
    leaf = ls.clone().requires_grad_(True)
    ls_b, lt_b, _ = tail_buckets(leaf, *sparse_of(lt, y, K), y)
    approx = fn(ls_b, lt_b)
    (g_approx,) = torch.autograd.grad(approx.sum(), leaf)
    leaf2 = ls.clone().requires_grad_(True)
    ref = fn(leaf2, filled(ls, lt, y, K))
    (g_ref,) = torch.autograd.grad(ref.sum(), leaf2)
    torch.testing.assert_close(approx, ref)
    torch.testing.assert_close(g_approx, g_ref)
    assert bool((approx <= fn(ls, lt) + 1e-12).all())  # coarse-graining never adds divergence
    # with every id known it is the full divergence itself, but for the floor on the teacher's empty tail
    full_b = tail_buckets(ls, *sparse_of(lt, y, V), y)
    torch.testing.assert_close(fn(full_b[0], full_b[1]), fn(ls, lt), atol=10 * TAIL_FLOOR, rtol=0)


def test_a_top_k_over_the_teachers_ids_is_exact():
    ls, lt = logprobs(4), logprobs(5)
    y = ids_outside_and_inside(lt, K)
    ls_b, lt_b, _ = tail_buckets(ls, *sparse_of(lt, y, K), y)
    for k in range(1, K + 1):
        torch.testing.assert_close(topk_reverse_kl(*teacher_topk(ls_b, lt_b, k), k, index_from="teacher"),
                                   topk_reverse_kl(ls, lt, k, index_from="teacher"))
    with pytest.raises(ValueError, match="top-K of 5 ids"):
        teacher_topk(ls_b, lt_b, K + 1)


def test_unnamed_ids_go_to_the_tail():
    """llama-cpp-python names its top-k by text; an id no text identifies (-1) is tail mass."""
    ls, lt = logprobs(6), logprobs(7)
    y = lt.argsort(-1)[:, 0]  # the least likely: never in the top-k
    ids, lps, sampled = sparse_of(lt, y, K)
    ids = ids.clone()
    ids[:, 1] = -1
    ls_b, lt_b, _ = tail_buckets(ls, ids, lps, sampled, y)
    assert bool((lt_b[:, 1] == float("-inf")).all()) and bool((ls_b[:, 1] == float("-inf")).all())
    torch.testing.assert_close(lt_b.exp().sum(-1), torch.ones(C, dtype=torch.float64))
    torch.testing.assert_close(ls_b.exp().sum(-1), torch.ones(C, dtype=torch.float64))


# ---------------------------------------------------------------- the methods on a served teacher

B, N = 2, 5
MASK = torch.tensor([[True] * 5, [True, True, True, False, False]])
TOPK = 6


def case(seed: int = 0, vocab: int = 13, t_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, vocab, generator=g, dtype=torch.float64) * 0.5  # a flat student: see filled()
    t = torch.randn(B, N, vocab, generator=g, dtype=torch.float64) * t_scale
    p = torch.randn(B, N, vocab, generator=g, dtype=torch.float64) * 2.0
    ids = torch.randint(0, vocab, (B, N), generator=g).masked_fill(~MASK, 0)
    from mmdistill.core.batch import Batch
    batch = Batch(response_ids=ids, response_mask=MASK.clone(), samples=[{}] * B)
    lt = torch.log_softmax(t, -1)
    top = lt.topk(TOPK, dim=-1)
    served = SparseLogProbs(lt.gather(-1, ids[..., None])[..., 0], top.indices, top.values)
    ref_t = filled(torch.log_softmax(s, -1).reshape(-1, vocab), lt.reshape(-1, vocab), ids.reshape(-1),
                   TOPK).reshape(B, N, vocab)
    return s, t, p, ref_t, served, batch


@pytest.mark.parametrize("estimator,exact", [("sampled", True), ("topk", True), ("full", False)])
def test_opd_on_a_served_teacher(estimator, exact):
    s, t, _, ref_t, served, batch = case()
    method = OPD(estimator=estimator, topk=4, topk_from="teacher", target="teacher_full", chunk_size=0)
    loss, metrics, grad = run_loss(method, {"student": s, "teacher_full": served}, batch)
    ref_loss, ref_metrics, ref_grad = run_loss(method, {"student": s, "teacher_full": t if exact else ref_t}, batch)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert metrics["sampled_reverse_kl"] == pytest.approx(ref_metrics["sampled_reverse_kl"])
    assert metrics["reverse_kl"] <= run_loss(method, {"student": s, "teacher_full": t}, batch)[1]["reverse_kl"] + 1e-9


def test_a_top_k_ignores_the_tail_bucket_even_when_it_outweighs_the_named_ids():
    """A flat teacher over many ids: its tail holds more than any id it named."""
    s, t, p, _, served, batch = case(3, vocab=60, t_scale=0.3)
    assert bool((1 - served.logprobs.exp().sum(-1) > served.logprobs[..., 0].exp()).all())
    for method in (OPD(estimator="topk", topk=4, topk_from="teacher", target="teacher_full", chunk_size=0),
                   DOPD(topk=4, topk_from="teacher", trim=0.0, regimes=["lh"], chunk_size=0)):
        views = {"student": s, "student_priv": p}
        loss, _, grad = run_loss(method, {**views, "teacher_full": served}, batch)
        ref_loss, _, ref_grad = run_loss(method, {**views, "teacher_full": t}, batch)
        assert loss.item() > 0
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gkd_on_a_served_teacher_is_its_tail_approximation(beta):
    s, _, _, ref_t, served, batch = case(1)
    method = GKD(beta=beta, lam=1.0, target="teacher_full", chunk_size=0)
    loss, _, grad = run_loss(method, {"student": s, "teacher_full": served}, batch)
    ref_loss, _, ref_grad = run_loss(method, {"student": s, "teacher_full": ref_t}, batch)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("ht_divergence", ["js", "reverse_kl"])
def test_dopd_on_a_served_teacher_routes_exactly_and_approximates_only_ht(ht_divergence):
    """Routing reads q_T of the sampled token (exact); LH is a top-K over the teacher's ids (exact);
    HT runs on the tail buckets, i.e. against the teacher with a proportional tail. The reference
    is DOPD on that filled teacher, whose top-K ids are the true teacher's (checked)."""
    s, _, p, ref_t, served, batch = case(2)
    assert torch.equal(ref_t.topk(4, dim=-1).indices.sort(-1).values,
                       served.ids[..., :4].sort(-1).values)
    method = DOPD(topk=4, topk_from="teacher", trim=0.0, ht_divergence=ht_divergence, chunk_size=0)
    views = {"student": s, "student_priv": p}
    loss, metrics, grad = run_loss(method, {**views, "teacher_full": served}, batch)
    ref_loss, ref_metrics, ref_grad = run_loss(method, {**views, "teacher_full": ref_t}, batch)
    for r in ("ht", "lh", "hs", "ll"):
        assert metrics[f"share_{r}"] == ref_metrics[f"share_{r}"]
    assert metrics["share_ht"] > 0 and metrics["share_lh"] > 0
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    stats = method.token_statistics({**views, "teacher_full": served}, batch)
    ref_stats = method.token_statistics({**views, "teacher_full": ref_t}, batch)
    torch.testing.assert_close(stats["log_qt"], ref_stats["log_qt"].float())


def test_dopd_on_a_served_teacher_skips_its_diagnostics_on_a_step_nobody_logs(monkeypatch):
    import mmdistill.methods.dopd as D
    from mmdistill.losses.chunked import skip_diagnostics

    s, _, p, _, served, batch = case(2)
    method = DOPD(topk=4, topk_from="teacher", trim=0.0, chunk_size=0)
    views = {"student": s, "student_priv": p, "teacher_full": served}
    loss, metrics, grad = run_loss(method, views, batch)
    monkeypatch.setattr(D.DOPD, "_first_pass_sparse", lambda *a: pytest.fail("diagnostics computed"))
    with skip_diagnostics():
        loss_s, metrics_s, grad_s = run_loss(method, views, batch)
    assert torch.equal(loss, loss_s) and torch.equal(grad, grad_s)
    assert set(metrics) - set(metrics_s) == set(D.DIAGNOSTICS)
    assert all(metrics[k] == metrics_s[k] for k in metrics_s)
