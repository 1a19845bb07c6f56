import pytest
import torch

from mmdistill.losses.chunked import reduction_weights, token_loss, token_values
from mmdistill.losses.divergences import forward_kl, reverse_kl, reverse_kl_and_grad
from tests.helpers import ref_reduce


def data(seed=0, B=3, N=5, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, V, generator=g, dtype=dtype) * 2
    t = torch.randn(B, N, V, generator=g, dtype=dtype) * 2
    mask = torch.rand(B, N, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    mask[0, 0] = True
    t[~mask] = float("nan")  # padded target rows must never be read
    return s, t, mask


@pytest.mark.parametrize("reduction", ["seq", "token"])
@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 1000])
@pytest.mark.parametrize("fn", [reverse_kl, forward_kl], ids=["reverse", "forward"])
def test_chunked_equals_brute_force(reduction, chunk, fn):
    s, t, mask = data()
    s1 = s.clone().requires_grad_(True)
    loss = token_loss(fn, s1, [t], reduction_weights(mask, reduction), chunk_size=chunk)
    loss.backward()
    s2 = s.clone().requires_grad_(True)
    lp_t = torch.where(mask[..., None], t, torch.zeros_like(t)).log_softmax(-1)
    ref = ref_reduce(fn(s2.log_softmax(-1), lp_t), mask, reduction)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-10)
    assert (s1.grad[~mask] == 0).all()


def test_extras_and_scaled_upstream_gradient():
    s, t, mask = data(1)
    ids = torch.randint(0, s.shape[-1], mask.shape)

    def nll(ls, lt, y):
        return -ls.gather(-1, y[:, None]).squeeze(-1)

    w = reduction_weights(mask)
    a = s.clone().requires_grad_(True)
    (3.0 * token_loss(nll, a, [t], w, extras=[ids], chunk_size=2)).backward()
    b = s.clone().requires_grad_(True)
    (3.0 * token_loss(nll, b, [t], w, extras=[ids], chunk_size=0)).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_empty_mask_gives_zero_loss_and_grad():
    s, t, mask = data(2)
    mask[:] = False
    for chunk in (0, 2):
        x = s.clone().requires_grad_(True)
        loss = token_loss(reverse_kl, x, [t], reduction_weights(mask), chunk_size=chunk)
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all()


def test_bfloat16_logits_keep_their_dtype_and_agree():
    s, t, mask = data(3, dtype=torch.float32)
    t = torch.nan_to_num(t)
    x = s.to(torch.bfloat16).requires_grad_(True)
    loss = token_loss(reverse_kl, x, [t.to(torch.bfloat16)], reduction_weights(mask), chunk_size=2)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    ref = token_loss(reverse_kl, x.detach().float(), [t.to(torch.bfloat16).float()], reduction_weights(mask),
                     chunk_size=0)
    assert torch.allclose(loss, ref, atol=1e-5)


def test_token_values_fills_masked_positions_with_zero():
    s, t, mask = data(4)
    vals = token_values(lambda ls, lt: {"kl": reverse_kl(ls, lt)}, s, [t], mask, chunk_size=2)
    ref = reverse_kl(s.log_softmax(-1), torch.nan_to_num(t).log_softmax(-1))
    assert torch.allclose(vals["kl"][mask], ref[mask].float())
    assert (vals["kl"][~mask] == 0).all()


@pytest.mark.parametrize("chunk", [0, 2])
def test_values_out_receives_each_tokens_value(chunk):
    s, t, mask = data(5)
    out = torch.full(mask.shape, -7.0, dtype=torch.float64)
    token_loss(reverse_kl, s.clone().requires_grad_(True), [t], reduction_weights(mask), chunk_size=chunk,
               values_out=out)
    ref = reverse_kl(s.log_softmax(-1), torch.nan_to_num(t).log_softmax(-1))
    assert torch.allclose(out[mask], ref[mask])
    assert (out[~mask] == -7.0).all()  # positions with weight 0 are left untouched


def test_automatic_chunks_keep_the_graph_only_when_one_chunk_holds_everything(monkeypatch):
    """chunk_size=None: a loss that fits one automatic chunk backpropagates through its own graph
    (no recompute); a larger one goes through the chunked recompute. Both equal the brute force."""
    import mmdistill.losses.chunked as chunked

    s, t, mask = data()
    w = reduction_weights(mask)
    positions = int(mask.sum())
    results = {}
    for elements, kind in ((positions * 11, "graph"), (positions * 11 - 1, "chunked")):
        monkeypatch.setattr(chunked, "AUTO_CHUNK_ELEMENTS", elements)
        x = s.clone().requires_grad_(True)
        loss = token_loss(reverse_kl, x, [t], w)
        assert ("_ChunkedTokenLoss" in type(loss.grad_fn).__name__) == (kind == "chunked")
        loss.backward()
        results[kind] = (loss.detach(), x.grad)
    x = s.clone().requires_grad_(True)
    lp_t = torch.where(mask[..., None], t, torch.zeros_like(t)).log_softmax(-1)
    ref = ref_reduce(reverse_kl(x.log_softmax(-1), lp_t), mask, "seq")
    ref.backward()
    for loss, grad in results.values():
        assert torch.allclose(loss, ref, atol=1e-10) and torch.allclose(grad, x.grad, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 0, 1, 3])
def test_diagnostics_ride_on_the_loss_pass_and_equal_a_separate_pass(chunk):
    """Diagnostics computed on the loss's own chunks equal token_values' separate pass, are 0 on
    padding, carry no gradient, and leave the loss and its gradient unchanged."""
    s, t, mask = data()
    w = reduction_weights(mask)

    def diag_fn(ls, lt):
        return {"rkl": reverse_kl(ls, lt), "fkl": forward_kl(lt, ls)}

    x = s.clone().requires_grad_(True)
    diag = {}
    loss = token_loss(reverse_kl, x, [t], w, chunk_size=chunk, diagnostics=diag_fn, diag_out=diag)
    loss.backward()
    y = s.clone().requires_grad_(True)
    plain = token_loss(reverse_kl, y, [t], w, chunk_size=chunk)
    plain.backward()
    assert torch.equal(loss.detach(), plain.detach()) and torch.equal(x.grad, y.grad)
    ref = token_values(diag_fn, s, [t], mask, chunk_size=chunk)
    assert diag.keys() == ref.keys() == {"rkl", "fkl"}
    for k in diag:
        assert not diag[k].requires_grad and diag[k].dtype == torch.float32
        torch.testing.assert_close(diag[k], ref[k])
        assert (diag[k][~mask] == 0).all() and (diag[k][mask] != 0).all()


def test_diagnostics_need_somewhere_to_go():
    s, t, mask = data()
    with pytest.raises(ValueError, match="diagnostics and diag_out go together"):
        token_loss(reverse_kl, s, [t], reduction_weights(mask), diagnostics=lambda ls, lt: {})


@pytest.mark.parametrize("chunk", [None, 0, 1, 3])
def test_prepared_targets_are_built_once_per_chunk_for_loss_and_diagnostics(chunk):
    """`prepare` turns the targets' rows into fn's target arguments: the loss and gradient equal
    a brute force on the prepared targets, and the forward builds them once per chunk (the
    diagnostics reuse the loss's), and backward never rebuilds them (the gradient is taken in the
    forward)."""
    s, t, mask = data()
    u = torch.randn_like(t).masked_fill(~mask[..., None], float("nan"))
    w = reduction_weights(mask)
    calls = []

    def prepare(la, lb):
        calls.append(la.shape[0])
        return ((la + lb).log_softmax(-1), la)  # a built target, and one of the views as is

    def fn(ls, lt, la):
        return reverse_kl(ls, lt) + 0.5 * forward_kl(la, ls)

    def diag_fn(ls, lt, la):
        return {"target_entropy": -(lt.exp() * lt).sum(-1)}

    x = s.clone().requires_grad_(True)
    diag = {}
    loss = token_loss(fn, x, [t, u], w, chunk_size=chunk, diagnostics=diag_fn, diag_out=diag, prepare=prepare)
    n_forward = len(calls)
    loss.backward()
    tokens = int(mask.sum())
    # chunk None here fits one automatic chunk: the graph is kept
    expected = 1 if chunk in (None, 0) else -(-tokens // chunk)
    assert n_forward == expected and sum(calls[:n_forward]) == tokens
    assert len(calls) == n_forward

    y = s.clone().requires_grad_(True)

    def zero(v):
        return torch.where(mask[..., None], v, torch.zeros_like(v))

    la, lb = zero(t).log_softmax(-1), zero(u).log_softmax(-1)
    lt = (la + lb).log_softmax(-1)
    ls = y.log_softmax(-1)
    ref = ref_reduce(reverse_kl(ls, lt) + 0.5 * forward_kl(la, ls), mask, "seq")
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-6)  # float32 reduction weights
    torch.testing.assert_close(x.grad, y.grad, atol=1e-10, rtol=1e-6)
    h = -(lt.exp() * lt).sum(-1)
    torch.testing.assert_close(diag["target_entropy"][mask], h[mask].float())
    assert (diag["target_entropy"][~mask] == 0).all()


def _recomputed(fn, student, targets, weight, chunk_size, extras=()):
    """The chunked loss as it was before the gradient moved into the forward: the forward keeps
    no graph and backward recomputes each chunk (the path a second backward still takes)."""
    import mmdistill.losses.chunked as chunked

    class Recompute(chunked._ChunkedTokenLoss):
        @staticmethod
        def forward(ctx, *args):
            with torch.no_grad():
                total = chunked._ChunkedTokenLoss.forward(ctx, *args)
            ctx.grad = None
            return total

    return Recompute.apply(fn, None, None, chunk_size, len(targets), None, None, None, weight, student, *targets,
                           *extras)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3])
def test_gradient_taken_in_the_forward_is_bit_identical_to_the_recomputed_one(chunk, dtype):
    """Same loss, same gradient bits as recomputing each chunk in backward, under a scaled
    upstream gradient (gradient accumulation divides the loss) in fp32 and bf16."""
    s, t, mask = data(6, dtype=torch.float32)
    t = torch.nan_to_num(t)
    w = reduction_weights(mask)
    x = s.to(dtype).requires_grad_(True)
    loss = token_loss(reverse_kl, x, [t.to(dtype)], w, chunk_size=chunk)
    (loss / 3).backward()
    y = s.to(dtype).requires_grad_(True)
    ref = _recomputed(reverse_kl, y, [t.to(dtype)], w, chunk)
    (ref / 3).backward()
    assert torch.equal(loss.detach(), ref.detach())
    assert torch.equal(x.grad, y.grad) and x.grad.dtype == dtype


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_closed_form_gradient_replaces_autograd_and_agrees(chunk, monkeypatch):
    """closed_form: the chunked loss takes (values, gradient) from it, never calls autograd, and
    equals the autograd path (values to the bit here, gradients to float64 rounding)."""
    s, t, mask = data(9)
    w = reduction_weights(mask)
    x = s.clone().requires_grad_(True)
    plain = token_loss(reverse_kl, x, [t], w, chunk_size=chunk)
    (2.5 * plain).backward()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = s.clone().requires_grad_(True)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    closed = token_loss(reverse_kl, y, [t], w, chunk_size=chunk, values_out=out, closed_form=reverse_kl_and_grad)
    (2.5 * closed).backward()
    assert not calls
    assert torch.equal(closed.detach(), plain.detach())
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-10, atol=1e-14)
    assert (y.grad[~mask] == 0).all() and (out[mask] != 0).all()


def test_a_second_backward_through_a_retained_graph_recomputes_and_agrees():
    s, t, mask = data(7)
    x = s.clone().requires_grad_(True)
    loss = token_loss(reverse_kl, x, [t], reduction_weights(mask), chunk_size=2)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=1e-12)


def test_a_student_without_gradient_gets_no_gradient_buffer(monkeypatch):
    """Scoring without grad (evaluation) takes no gradient in the forward: no buffer, no autograd."""
    s, t, mask = data(8)
    seen = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: seen.append(1) or real(*a, **k))
    with_grad = token_loss(reverse_kl, s.clone().requires_grad_(True), [t], reduction_weights(mask), chunk_size=2)
    assert seen
    seen.clear()
    without = token_loss(reverse_kl, s, [t], reduction_weights(mask), chunk_size=2)
    assert not seen and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


@pytest.mark.parametrize("empty", ["exclude", "zero"])
@pytest.mark.parametrize("reduction", ["seq", "token"])
def test_reduction_weights_empty_sequences_against_brute_force(reduction, empty):
    """'zero': a sequence without tokens is a 0 in the mean over all rows (the AR-OPD release)."""
    _, _, mask = data(1)
    assert not mask[1].any() and mask.any(-1).sum() == 2
    x = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = (reduction_weights(mask, reduction, dtype=torch.float64, empty=empty) * x).sum()
    if reduction == "seq" and empty == "zero":
        per_seq = []
        for b in range(mask.shape[0]):
            vals = [x[b, n] for n in range(mask.shape[1]) if mask[b, n]]
            per_seq.append(sum(vals) / len(vals) if vals else x.new_zeros(()))
        ref = sum(per_seq) / len(per_seq)
    else:
        ref = ref_reduce(x, mask, reduction)
    torch.testing.assert_close(got, ref)
    if reduction == "seq":
        other = "zero" if empty == "exclude" else "exclude"
        assert abs(got - (reduction_weights(mask, reduction, dtype=torch.float64, empty=other) * x).sum()) > 1e-3


@pytest.mark.parametrize("empty", ["exclude", "zero"])
def test_reduction_weights_all_empty_is_all_zero(empty):
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(reduction_weights(mask, "seq", empty=empty), torch.zeros(3, 4))


def test_reduction_weights_validates_empty():
    with pytest.raises(ValueError, match="empty"):
        reduction_weights(torch.ones(2, 2, dtype=torch.bool), "seq", empty="drop")


@pytest.mark.parametrize("chunk", [0, 2])
def test_skip_diagnostics_leaves_them_out_and_the_loss_as_it_was(chunk):
    from mmdistill.losses.chunked import skip_diagnostics

    s, t, mask = data()
    w = reduction_weights(mask)
    results = []
    for skip in (False, True):
        x = s.clone().requires_grad_(True)
        diag = {}
        with skip_diagnostics(skip):
            loss = token_loss(reverse_kl, x, [t], w, chunk_size=chunk, diagnostics=lambda ls, lt: {"h": ls[:, 0]},
                              diag_out=diag)
        loss.backward()
        results.append((loss.detach(), x.grad, diag))
    assert set(results[0][2]) == {"h"} and results[1][2] == {}
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with skip_diagnostics(True):
        pass
    diag = {}
    token_loss(reverse_kl, s, [t], w, chunk_size=chunk, diagnostics=lambda ls, lt: {"h": ls[:, 0]}, diag_out=diag)
    assert set(diag) == {"h"}  # the context restores what it found
