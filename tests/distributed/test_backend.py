"""The Backend's optimizer: optim.implementation picks AdamW's kernel, and every kernel takes the
same step (to float32 rounding)."""
import copy

import pytest
import torch

from mmdistill.distributed.backend import Backend, adamw_kernel


def _params(dtype=torch.float32):
    return [torch.nn.Parameter(torch.zeros(3, dtype=dtype))]


@pytest.mark.parametrize("implementation, expected", [
    ("auto", {"fused": True}), ("fused", {"fused": True}), ("foreach", {"foreach": True}),
    ("for_loop", {"foreach": False}), ("default", {}),
])
def test_each_implementation_names_its_kernel(implementation, expected):
    assert adamw_kernel(implementation, _params()) == expected


def test_auto_leaves_torch_its_default_where_the_fused_kernel_does_not_apply():
    assert adamw_kernel("auto", []) == {}
    assert adamw_kernel("auto", [torch.nn.Parameter(torch.zeros(2, device="meta"))]) == {}


def test_the_plain_backend_builds_a_fused_adamw_on_the_cpu_by_default():
    opt = Backend().build_optimizer(_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    opt = Backend().build_optimizer(_params(), 1e-3, (0.9, 0.999), 0.0, implementation="for_loop")
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is False


def test_every_kernel_takes_the_same_steps():
    """Five AdamW steps with weight decay on a small model, from the same weights and gradients:
    the fused and foreach kernels end where torch's for-loop does, to float32 rounding."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    grads = [[torch.randn_like(p) for p in base.parameters()] for _ in range(5)]
    ends = {}
    for implementation in ("for_loop", "foreach", "fused"):
        model = copy.deepcopy(base)
        params = list(model.parameters())
        opt = Backend().build_optimizer(params, 1e-2, (0.9, 0.999), 0.1, implementation=implementation)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        ends[implementation] = torch.cat([p.detach().flatten() for p in params])
    assert not torch.equal(ends["for_loop"], torch.cat([p.detach().flatten() for p in base.parameters()]))
    for implementation in ("foreach", "fused"):
        torch.testing.assert_close(ends[implementation], ends["for_loop"], rtol=1e-6, atol=1e-7)
