"""What every method is: the views it needs and a map from aligned log-probs to a loss."""
from __future__ import annotations

from typing import Protocol

import torch

from mmdistill.batch import Batch, ViewLogprobs


class Method(Protocol):
    name: str
    views: tuple[str, ...]  # views it reads; "student" is always among them
    on_policy: bool  # True: responses are student rollouts; False: oracle responses

    def loss(self, views: ViewLogprobs, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss (gradient flows through views["student"] only) and float metrics."""
        ...


# Shared by methods: argument checks and aligned gathers.

REDUCTIONS = ("seq", "token")


def choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return value


def check_reduction(reduction: str) -> str:
    return choice("reduction", reduction, REDUCTIONS)


def student_logprobs(views: ViewLogprobs, batch: Batch) -> torch.Tensor:
    lp_s = views["student"]
    if lp_s.dim() != 3 or lp_s.shape[:2] != batch.response_ids.shape:
        raise ValueError(
            f"student log-probs {tuple(lp_s.shape)} do not align with response_ids "
            f"{tuple(batch.response_ids.shape)}"
        )
    return lp_s


def safe_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padding may hold an id outside the vocabulary (e.g. -100); it is masked out anyway."""
    return ids.masked_fill(~mask, 0)


def gather_ids(lp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return lp.gather(-1, safe_ids(ids, mask).unsqueeze(-1)).squeeze(-1)
