"""The token-level contract between adapters and methods.

Every view scores the SAME response token ids; methods only ever see tensors aligned to
those ids, so no objective needs to know whether privileged information was text or an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass
class Batch:
    """Responses to score: student rollouts (on-policy) or oracle responses (SFT).

    response_ids: [B, N] long, right-padded with the pad id.
    response_mask: [B, N] bool, True on real response tokens (EOS included).
    samples: the records the responses answer (prompt, hint, reasoning, answer...).
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    samples: list[dict[str, Any]]
    on_policy: bool = True

    def __post_init__(self):
        if self.response_ids.shape != self.response_mask.shape:
            raise ValueError(
                f"response_ids {tuple(self.response_ids.shape)} and response_mask "
                f"{tuple(self.response_mask.shape)} differ in shape"
            )
        if len(self.samples) != self.response_ids.shape[0]:
            raise ValueError(f"{len(self.samples)} samples for {self.response_ids.shape[0]} responses")

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


# A method reads views["teacher_full"] etc.: a [B, N, V] tensor of next-token logits over the
# vocabulary (unnormalised log-probs, in the model's dtype), aligned with Batch.response_ids.
# Only views["student"] carries gradient. Methods normalise per chunk (mmdistill/losses/chunked.py).
ViewLogits = Mapping[str, torch.Tensor]


@dataclass
class SparseLogProbs:
    """What a served teacher returns for a view: per response position the log-prob of the
    sampled token and the server's top-k (ids, log-probs), sorted by log-prob, best first.

    A served teacher sends no [B, N, V] logits: full-vocabulary terms need an approximation
    (mmdistill/losses/sparse.py). ids holds -1 (log-prob -inf) where the server named fewer
    than k tokens or named one by a text that no single id has (llama-cpp-python keys its
    top-k by text)."""

    sampled: torch.Tensor  # [B, N] float32, log q(y_n)
    ids: torch.Tensor  # [B, N, k] long
    logprobs: torch.Tensor  # [B, N, k] float32

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device) -> "SparseLogProbs":
        return SparseLogProbs(self.sampled.to(device), self.ids.to(device), self.logprobs.to(device))
