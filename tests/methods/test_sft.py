"""SFT on hand-built batches, against a float64 loop reference."""
from __future__ import annotations

import pytest
import torch

from mmdistill.core.batch import Batch
from mmdistill.methods.sft import SFT
from tests.helpers import MASK, B, N, V, make_batch, make_logits, ref_reduce  # the SFT/OPD/GKD case


@pytest.mark.parametrize("reduction", ["seq", "token"])
def test_sft_equals_reference_nll(reduction):
    batch = make_batch(seed=1)
    zs = make_logits(1)
    s = zs.clone().requires_grad_()
    method = SFT(reduction=reduction)
    loss, metrics = method.loss({"student": torch.log_softmax(s, -1)}, batch)
    loss.backward()

    s64 = zs.double().requires_grad_()
    lp = torch.log_softmax(s64, -1)
    nll = [[-lp[b, n, batch.response_ids[b, n]] for n in range(N)] for b in range(B)]
    ref = ref_reduce(nll, MASK, reduction)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach())
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-6, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["nll"] == pytest.approx(ref.item(), rel=1e-5)
    ent = [[-(lp[b, n].exp() * lp[b, n]).sum() for n in range(N)] for b in range(B)]
    assert metrics["student_entropy"] == pytest.approx(ref_reduce(ent, MASK, reduction).item(), rel=1e-5)
    assert all(isinstance(v, float) for v in metrics.values())


def test_sft_protocol_fields_and_padding_ids_outside_vocab():
    method = SFT()
    assert (method.name, method.views, method.on_policy) == ("sft", ("student",), False)
    batch = make_batch(seed=2)
    zs = make_logits(2)
    loss, _ = method.loss({"student": torch.log_softmax(zs, -1)}, batch)
    weird = Batch(batch.response_ids.masked_fill(~MASK, -100), MASK.clone(), [{}] * B)
    loss2, _ = method.loss({"student": torch.log_softmax(zs, -1)}, weird)
    torch.testing.assert_close(loss, loss2)


def test_sft_rejects_misaligned_views():
    batch = make_batch(seed=0)
    with pytest.raises(ValueError):
        SFT().loss({"student": torch.zeros(B, N + 1, V)}, batch)


def test_sft_validates_reduction():
    with pytest.raises(ValueError, match="reduction"):
        SFT(reduction="mean")
