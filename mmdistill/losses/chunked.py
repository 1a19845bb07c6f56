"""Token losses over the full vocabulary in bounded memory.

A full-vocabulary divergence on [positions x vocab] logits needs several float32 temporaries
of that size (log_softmax, exp, products) for the forward and the same again for autograd.
Here the per-token function runs on chunks of response positions: the forward keeps no graph,
and the backward recomputes one chunk at a time, so the extra memory is set by `chunk_size`,
not by the sequence length. Padding positions (weight 0) are never computed.

`fn(lp_student, *lp_targets, *extras) -> [C]` receives float32 log-probs of the chunk's rows
(the logits are normalised here, in float32, whatever the model dtype) and per-position
extras (sampled ids, routing masks) indexed the same way. A method whose targets are built from
the views (AR-OPD's anchored residual) passes `prepare`: it maps the targets' rows to fn's
target arguments once per chunk, so the loss and its diagnostics share one build.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

TokenFn = Callable[..., torch.Tensor]

# Automatic chunks hold about this many logits (4 MB per float32 copy), whatever the vocab:
# 6 positions at vocab 151,936, the whole batch for small vocabularies.
AUTO_CHUNK_ELEMENTS = 1 << 20


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    """None: automatic; 0: no chunking (naive autograd); > 0: positions per chunk."""
    if chunk_size is None:
        return max(1, AUTO_CHUNK_ELEMENTS // max(1, vocab))
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be None (auto), 0 (off) or positive, got {chunk_size}")
    return chunk_size


_DIAGNOSE = contextvars.ContextVar("mmdistill_diagnose", default=True)


@contextmanager
def skip_diagnostics(skip: bool = True) -> Iterator[None]:
    """token_loss computes no diagnostics inside (a step whose metrics row is not logged: the
    entropies and KLs of a full vocabulary are a fifth of loss + backward at 49k ids on the CPU)."""
    token = _DIAGNOSE.set(not skip)
    try:
        yield
    finally:
        _DIAGNOSE.reset(token)


def diagnosing() -> bool:
    """Whether losses compute their per-token diagnostics now (see skip_diagnostics)."""
    return _DIAGNOSE.get()


# How a "seq" mean treats a sequence with no token in the mask (e.g. a response no longer than
# AR-OPD's skip): left out of the mean, or counted as a 0 (the AR-OPD release's batch mean).
EMPTY_SEQUENCES = ("exclude", "zero")


def reduction_weights(mask: torch.Tensor, reduction: str = "seq", dtype: torch.dtype = torch.float32,
                      empty: str = "exclude") -> torch.Tensor:
    """Per-token weights whose weighted sum is the masked mean.

    "seq": mean over each sequence's tokens, then over the sequences (rows): with empty="exclude"
    only those that have a token, so a batch's loss does not shrink because some responses were
    too short to keep anything; with empty="zero" over every row, each such row adding a 0, so a
    row's weight is 1/rows whatever the others hold (the AR-OPD release). "token": mean over all
    tokens of the batch (`empty` changes nothing there). An empty mask gives all-zero weights.
    """
    if empty not in EMPTY_SEQUENCES:
        raise ValueError(f"empty must be one of {list(EMPTY_SEQUENCES)}, got {empty!r}")
    m = mask.to(dtype)
    if reduction == "token":
        return m / m.sum().clamp(min=1.0)
    if reduction != "seq":
        raise ValueError(f"reduction must be 'seq' or 'token', got {reduction!r}")
    lengths = m.sum(-1, keepdim=True)
    rows = (lengths > 0).sum().clamp(min=1) if empty == "exclude" else max(1, lengths.numel())
    return m / lengths.clamp(min=1.0) / rows


def _rows(t: torch.Tensor, b: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return t[b, n]


def _normalised(rows: torch.Tensor) -> torch.Tensor:
    """log_softmax in at least float32 (bf16/fp16 logits are upcast, float64 is kept)."""
    return torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)


def _chunk_args(x: torch.Tensor, targets, extras, b: torch.Tensor, n: torch.Tensor, prepare) -> list[torch.Tensor]:
    """fn's arguments for one chunk: the student's log-probs (x = its rows), the targets' (through
    `prepare`), the extras' rows."""
    lt = [_normalised(_rows(t, b, n)) for t in targets]
    if prepare is not None:
        lt = list(prepare(*lt))
    return [_normalised(x), *lt, *[_rows(t, b, n) for t in extras]]


def _chunks(weight: torch.Tensor, chunk_size: int):
    b, n = weight.nonzero(as_tuple=True)
    step = chunk_size if chunk_size > 0 else max(1, b.numel())
    for s in range(0, b.numel(), step):
        yield b[s : s + step], n[s : s + step]


def _record(out: dict[str, torch.Tensor], shape: torch.Size, b: torch.Tensor, n: torch.Tensor,
            values: dict[str, torch.Tensor]) -> None:
    """Scatter one chunk's per-position diagnostics into [B, N] float32 maps (0 elsewhere)."""
    for k, v in values.items():
        if k not in out:
            out[k] = torch.zeros(shape, dtype=torch.float32, device=v.device)
        out[k][b, n] = v.detach().to(torch.float32)


STUDENT = 9  # the student's logits among _ChunkedTokenLoss.forward's inputs


class _ChunkedTokenLoss(torch.autograd.Function):
    """The gradient of each chunk is taken in the forward, while its log-probs are at hand, and
    kept for backward (one buffer the size of the student's logits, which backward would allocate
    anyway): no chunk is computed twice. A second backward through the same graph
    (retain_graph=True) finds the buffer handed out and recomputes chunk by chunk instead."""

    @staticmethod
    def forward(ctx, fn, closed_form, prepare, chunk_size, n_targets, values_out, diagnostics, diag_out, weight,
                student, *tensors):
        ctx.fn, ctx.prepare, ctx.chunk_size, ctx.n_targets = fn, prepare, chunk_size, n_targets
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(weight, student, *tensors)
        ctx.grad = torch.zeros_like(student) if ctx.needs_input_grad[STUDENT] else None
        total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
        closed = closed_form if ctx.grad is not None else None  # without a gradient to take, fn alone
        autograd = ctx.grad is not None and closed is None
        for b, n in _chunks(weight, chunk_size):
            x = _rows(student, b, n)
            if autograd:
                x = x.detach().requires_grad_(True)
            with torch.enable_grad() if autograd else torch.no_grad():
                args = _chunk_args(x, tensors[:n_targets], tensors[n_targets:], b, n, prepare)
                values, g = closed(*args) if closed is not None else (fn(*args), None)
                value = (weight[b, n] * values).sum()
            if autograd:
                (g,) = torch.autograd.grad(value, x)
            elif closed is not None:
                g = weight[b, n].unsqueeze(-1) * g
            if g is not None:
                ctx.grad[b, n] = g.to(ctx.grad.dtype)
            if values_out is not None:
                values_out[b, n] = values.detach().to(values_out.dtype)
            if diagnostics is not None:
                with torch.no_grad():
                    _record(diag_out, weight.shape, b, n, diagnostics(*[a.detach() for a in args]))
            total += value.detach()
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is not None:
            return (None,) * STUDENT + (grad.mul_(grad_out), *([None] * ctx.n_tensors))
        weight, student, *tensors = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for b, n in _chunks(weight, ctx.chunk_size):
            x = _rows(student, b, n).detach().requires_grad_(True)
            with torch.enable_grad():
                args = _chunk_args(x, tensors[: ctx.n_targets], tensors[ctx.n_targets :], b, n, ctx.prepare)
                value = (weight[b, n] * ctx.fn(*args)).sum()
            (g,) = torch.autograd.grad(value, x)
            grad[b, n] = (g * grad_out).to(grad.dtype)
        return (None,) * STUDENT + (grad, *([None] * len(tensors)))


def token_loss(
    fn: TokenFn,
    student: torch.Tensor,
    targets: Sequence[torch.Tensor],
    weight: torch.Tensor,
    extras: Sequence[torch.Tensor] = (),
    chunk_size: int | None = None,
    values_out: torch.Tensor | None = None,
    diagnostics: Callable[..., dict[str, torch.Tensor]] | None = None,
    diag_out: dict[str, torch.Tensor] | None = None,
    prepare: Callable[..., Sequence[torch.Tensor]] | None = None,
    closed_form: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """sum over positions of weight * fn(...), differentiable in `student` only.

    student, targets: [B, N, V] logits; weight: [B, N] (see reduction_weights); extras:
    [B, N, ...]. Targets are treated as constants. chunk_size: None sizes chunks automatically
    (AUTO_CHUNK_ELEMENTS logits each; when the whole loss fits in one, it takes the naive path,
    whose memory is then bounded the same way and whose backward does not recompute); 0
    computes everything at once with ordinary autograd (the naive path, kept for testing and
    benchmarks); > 0 is positions per chunk. values_out: an
    optional [B, N] tensor that receives fn's per-token values (no grad) where weight != 0, so
    a method can split its loss for metrics without a second pass. diagnostics: an optional
    function of the same arguments as fn, returning per-position values without gradient; they
    are computed on the loss's own forward chunks (no second pass over the vocabulary) and
    written into `diag_out` as [B, N] float32 maps, 0 where weight is 0 (see token_values).
    prepare: an optional function of the targets' log-prob rows (no gradient) returning fn's
    target arguments (any number), built once per chunk for fn and diagnostics alike.
    closed_form: an optional function of fn's arguments returning (fn's values, their gradient in
    the student's logits rows), used by the chunked path instead of autograd (a second backward
    through a retained graph still recomputes with fn).
    """
    if (diagnostics is None) != (diag_out is None):
        raise ValueError("diagnostics and diag_out go together")
    if not diagnosing():
        diagnostics = diag_out = None
    targets = [t.detach() for t in targets]
    auto = chunk_size is None
    chunk_size = resolve_chunk_size(chunk_size, student.shape[-1])
    if auto and int(torch.count_nonzero(weight)) <= chunk_size:
        chunk_size = 0  # one chunk holds it all: keep its graph rather than recompute it in backward
    if chunk_size == 0:
        b, n = weight.nonzero(as_tuple=True)
        if not b.numel():
            return student.sum() * 0.0
        args = _chunk_args(_rows(student, b, n), targets, extras, b, n, prepare)
        values = fn(*args)
        if values_out is not None:
            values_out[b, n] = values.detach().to(values_out.dtype)
        if diagnostics is not None:
            with torch.no_grad():
                _record(diag_out, weight.shape, b, n, diagnostics(*[a.detach() for a in args]))
        return (weight[b, n] * values).sum()
    return _ChunkedTokenLoss.apply(fn, closed_form, prepare, chunk_size, len(targets), values_out, diagnostics,
                                   diag_out, weight.detach(), student, *targets, *extras)


@torch.no_grad()
def token_values(
    fn: Callable[..., dict[str, torch.Tensor]],
    student: torch.Tensor,
    targets: Sequence[torch.Tensor],
    mask: torch.Tensor,
    extras: Sequence[torch.Tensor] = (),
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position diagnostics [B, N] (0 where masked), computed chunk by chunk without grad."""
    chunk_size = resolve_chunk_size(chunk_size, student.shape[-1])
    out: dict[str, torch.Tensor] = {}
    for b, n in _chunks(mask.to(torch.float32), chunk_size):
        args = _chunk_args(_rows(student, b, n), targets, extras, b, n, None)
        _record(out, mask.shape, b, n, fn(*args))
    return out
