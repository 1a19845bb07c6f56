"""What every method is: the views it needs and a map from aligned log-probs to a loss."""
from __future__ import annotations

from typing import Protocol

import torch

from mmdistill.core.batch import Batch, SparseLogProbs, ViewLogits
from mmdistill.core.views import VIEWS


class Method(Protocol):
    name: str
    views: tuple[str, ...]  # views it reads; "student" is always among them
    on_policy: bool  # True: responses are student rollouts; False: oracle responses

    def loss(self, views: ViewLogits, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss (gradient flows through views["student"] only) and float metrics.

        views[name] are [B, N, V] logits; full-vocabulary terms go through
        chunked.token_loss so memory stays bounded by the chunk size."""
        ...


# A method whose loss needs statistics of the whole optimizer step (DOPD's routing thresholds)
# also has `step_statistics` (True), `statistics_views`, `token_statistics(views, batch) -> {name:
# 1-D tensor over the batch's response tokens}` and `fit(statistics | None)`: the training step
# reads every micro-batch's statistics views first, gathers their statistics over all processes
# and fits the method to them before any loss (training/step.py).


# Shared by methods: argument checks and aligned gathers.

REDUCTIONS = ("seq", "token")
TARGETS = tuple(v for v in VIEWS if v != "student")  # views a method may distill towards
TOPK_FROM = ("student", "teacher")  # whose top-K ids a top-K term renormalises over


def choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return value


def check_reduction(reduction: str) -> str:
    return choice("reduction", reduction, REDUCTIONS)


def student_logits(views: ViewLogits, batch: Batch) -> torch.Tensor:
    s = views["student"]
    if s.dim() != 3 or s.shape[:2] != batch.response_ids.shape:
        raise ValueError(
            f"student logits {tuple(s.shape)} do not align with response_ids {tuple(batch.response_ids.shape)}"
        )
    return s


def target_logits(views: ViewLogits, name: str, student: torch.Tensor) -> torch.Tensor:
    t = views[name].detach()
    if t.shape != student.shape:
        raise ValueError(f"{name} logits {tuple(t.shape)} differ from the student's {tuple(student.shape)}")
    return t


def served_target(views: ViewLogits, name: str, student: torch.Tensor) -> SparseLogProbs:
    """A served teacher's view, on the student's device and aligned with its positions."""
    t = views[name]
    if t.sampled.shape != student.shape[:2]:
        raise ValueError(f"{name} from the server covers {tuple(t.sampled.shape)} positions, "
                         f"the student {tuple(student.shape[:2])}")
    return t.to(student.device)


def weighted_means(values: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, float]:
    """Reduce per-token diagnostics with the loss's own reduction weights."""
    return {k: float((v * weight).sum()) for k, v in values.items()}


def safe_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padding may hold an id outside the vocabulary (e.g. -100); it is masked out anyway."""
    return ids.masked_fill(~mask, 0)


def check_chunk_size(chunk_size):
    """None (automatic), 0 (no chunking) or positions per chunk; see chunked.token_loss."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(f"chunk_size must be None, 0 or a positive int, got {chunk_size!r}")
    return chunk_size


def check_topk(topk) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    return topk


def gather_at(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """lp[..., ids]: the log-prob of each position's own token."""
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
