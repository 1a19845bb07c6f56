"""How a sampled rollout draws each token: torch's multinomial, or one uniform per row through
the cumulative distribution (inverse CDF).

torch.multinomial draws one sample per row by an exponential race: a random number for every
vocabulary entry. On a CPU that is most of a small model's decoding step at a large vocabulary
(SmolLM2's 49,152 ids, 16 rows: 30 ms of a 45 ms step, the race's random numbers alone 28 ms).
The inverse CDF draws the same distribution from one uniform per row: a cumulative sum in float64
and a binary search. transformers' generate has no hook for its sampler, so the draw runs as the
last logits processor of a greedy generate: it applies the warpers generate would have applied
when sampling (temperature, top-p), draws, and leaves only the drawn id finite, which greedy
decoding then takes.
"""
from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

SAMPLERS = ("auto", "multinomial", "inverse_cdf")


def inverse_cdf_draw(scores: torch.Tensor) -> torch.Tensor:
    """One id per row [B], drawn from softmax(scores) with one uniform per row."""
    probs = torch.softmax(scores.float(), dim=-1)
    cdf = probs.double().cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    # u rounding up to the total (odds ~2**-53) would land past the last id with mass
    return torch.where(probs.gather(-1, drawn) > 0, drawn, probs.argmax(-1, keepdim=True)).squeeze(1)


class InverseCDFSampler(LogitsProcessor):
    """Scores of one drawn id per row (0 there, -inf elsewhere), drawn from softmax(scores)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        drawn = inverse_cdf_draw(scores)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn.unsqueeze(-1), 0.0)


def uses_inverse_cdf(sampler: str, device: torch.device) -> bool:
    """auto: on the CPU, where the race's random numbers cost most; torch's multinomial elsewhere."""
    return sampler == "inverse_cdf" or (sampler == "auto" and device.type == "cpu")


def inverse_cdf_generation(gen: GenerationConfig) -> tuple[GenerationConfig, LogitsProcessorList]:
    """A sampling config as a greedy one plus the processors that sample: the warpers transformers
    would add for it, in its order, then the draw. Only temperature and top-p are carried over:
    rollouts set no other warper (a config with one is refused rather than changed)."""
    if gen.top_k or getattr(gen, "min_p", None) or getattr(gen, "typical_p", 1.0) not in (None, 1.0):
        raise ValueError("the inverse-CDF sampler carries temperature and top_p only; use rollout.sampler=multinomial")
    processors = LogitsProcessorList()
    if gen.temperature is not None and gen.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_p is not None and gen.top_p < 1.0:
        processors.append(TopPLogitsWarper(gen.top_p))
    processors.append(InverseCDFSampler())
    greedy = copy.copy(gen)
    greedy.do_sample, greedy.temperature, greedy.top_p, greedy.top_k = False, None, None, None
    return greedy, processors
