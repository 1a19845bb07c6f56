"""Score several views of one model over the prompt prefix they share, computed once.

The plain, partial and full prompts of a sample differ only from where p is spliced in, so the
chat header, system prompt and question before it (and, for partial p, a prefix of p itself) are
the same tokens; and the rollouts of one prompt (rollout.num_rollouts) share all of it. Each
distinct prefix runs once per model; each view then runs only its own tail and the response on
a copy of that KV cache. Logits equal the one-view-at-a-time path's (up to float
rounding): a token's keys and values depend on the tokens before it only.

A VLM's images run with the prefix when every view shows a sample the same images, all of
their tokens before the cut (images come before the question, p after it), and the model reads
only `pixel_values`, one row per image (composite students, LLaVA): the boxes given as text.
Views that see other images (boxes drawn on) or models with other pixel layouts or multimodal
positions (SmolVLM, Qwen-VL) are scored one by one.

Layout of a view's sequence, every row: [left pad | shared prefix | left pad | own tail | response].
Positions count real tokens, so the padding inside the row shifts nothing.
"""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmdistill.adapters.text import left_pad, model_inputs, positions, unwrap, uses_model_positions
from mmdistill.core.batch import Batch
from mmdistill.models.composite import CompositeVLM
from mmdistill.models.weights import collective

# transformers renamed `past_key_values` to `cache` (5.x); both names are served.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def shared_lengths(prompts: list[list[list[int]]]) -> list[int]:
    """Per sample, the longest prefix common to all views' prompt ids, leaving every view at
    least one token of its own (the position that predicts the first response token)."""
    out = []
    for rows in zip(*prompts):
        limit = min(len(r) for r in rows) - 1
        n = 0
        while n < limit and all(r[n] == rows[0][n] for r in rows[1:]):
            n += 1
        out.append(max(n, 0))
    return out


def can_share(model: torch.nn.Module, grad: bool) -> bool:
    """A shared cache needs a HF model (or a composite VLM around one) that takes a KV cache and
    1-D positions. Not a sharded (FSDP, ZeRO-3) model: its forward is a collective, so every rank must
    make the same calls, and whether a batch shares depends on its data (a sharded student
    with gradient is also only called through its wrapper, one call per backward)."""
    inner = unwrap(model)
    if isinstance(inner, CompositeVLM):
        inner = inner.lm
    if not isinstance(inner, PreTrainedModel) or uses_model_positions(model) or collective(inner):
        return False
    checkpointing = getattr(inner, "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing")
                            else "is_gradient_checkpointing", False)
    if grad and inner.training and checkpointing:
        return False  # HF turns the cache off under gradient checkpointing
    return True


def _copy(cache: DynamicCache, rows: torch.Tensor, detach: bool) -> DynamicCache:
    """The prefix cache with one row per sample (rows[b] = its prefix's row), for one view."""
    def pick(x: torch.Tensor) -> torch.Tensor:
        return (x.detach() if detach else x).index_select(0, rows)
    return DynamicCache(ddp_cache_data=[(pick(layer.keys), pick(layer.values)) for layer in cache.layers])


def _same_images(adapter, samples: list[dict], levels: list[str | None]) -> bool:
    """Every view shows each sample the same image objects (checked before any prompt is encoded)."""
    shown = [[adapter.images(s, level) for s in samples] for level in levels]
    return all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
               for view in shown[1:] for a, b in zip(view, shown[0]))


def _prefix_pixels(adapter, samples: list[dict], levels: list[str | None], encoded: list,
                   prompts: list[list[list[int]]], cut: list[int]) -> list[torch.Tensor] | None:
    """Per sample, the pixel rows of its images, when they can run with the shared prefix (every
    view shows the same images, see _same_images): their tokens all lie before the cut, and the
    model reads nothing but `pixel_values`, one row per image. None otherwise."""
    image_ids = set(adapter.never_sample)
    if not image_ids or any(set(p.extras) != {"pixel_values"} for p in encoded):
        return None
    counts = [len(adapter.images(s, levels[0])) for s in samples]
    if any(p.extras["pixel_values"].shape[0] != sum(counts) for p in encoded):
        return None
    if any(t in image_ids for view in prompts for row, c in zip(view, cut) for t in row[c:]):
        return None
    return list(encoded[0].extras["pixel_values"].split(counts))


def score_views(adapter, model: torch.nn.Module, batch: Batch, levels: list[str | None], grads: list[bool],
                policy: str) -> tuple[list[torch.Tensor] | None, dict[str, float]]:
    """[B, N, V] logits of each view (levels[v], with gradient where grads[v]) of one model, or
    None where its cache cannot be shared: then the caller scores the views one by one.
    Also returns the seconds spent: "prefix" (building the prompts and running their shared
    prefix) and one entry per view index."""
    repeated = len({id(s) for s in batch.samples}) < len(batch.samples)  # rollouts of one prompt
    if not (len(levels) > 1 or repeated) or not can_share(model, any(grads)):
        return None, {}
    if adapter.has_images(batch.samples) and not _same_images(adapter, batch.samples, levels):
        return None, {}
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    encoded = [adapter.encode(batch.samples, level, policy, device) for level in levels]
    n = batch.response_ids.shape[1]
    for p in encoded:
        adapter.check_fits(batch.samples, p, n, "scored")
    prompts = [p.unpadded() for p in encoded]
    cut = shared_lengths(prompts)
    pixels = None
    if any(p.extras for p in encoded):  # a VLM's images: they run once, with the prefix, or nothing is shared
        pixels = _prefix_pixels(adapter, batch.samples, levels, encoded, prompts, cut)
        if pixels is None:
            return None, {}
    resp, resp_mask = batch.response_ids.to(device), batch.response_mask.to(device)
    seconds: dict[str, float] = {}
    unique: dict[tuple, int] = {}  # a prefix: its tokens and, for a VLM, which images fill its image tokens
    first: list[int] = []  # the first sample of each distinct prefix
    rows = []
    for i, (p, c) in enumerate(zip(prompts[0], cut)):
        key = (tuple(p[:c]), tuple(map(id, adapter.images(batch.samples[i], levels[0]))) if pixels is not None else ())
        if key not in unique:
            unique[key] = len(unique)
            first.append(i)
        rows.append(unique[key])
    rows = torch.tensor(rows, device=device)
    pre_ids, pre_attn = left_pad([list(k[0]) for k in unique], adapter.pad_id, device)
    extras = {} if pixels is None else model_inputs(model, {"pixel_values": torch.cat([pixels[i] for i in first])})
    with torch.set_grad_enabled(any(grads)):
        # The prefix runs on the unwrapped model: DDP expects one wrapped forward per backward.
        out = unwrap(model)(input_ids=pre_ids, attention_mask=pre_attn, position_ids=positions(model, pre_attn),
                            use_cache=True, logits_to_keep=1, **extras)
    cache = getattr(out, CACHE, None)
    if not isinstance(cache, DynamicCache) or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None, {}
    pre_attn = pre_attn.long()[rows]
    seconds["prefix"] = time.perf_counter() - t0
    logits = []
    for v, (view, grad) in enumerate(zip(prompts, grads)):
        t0 = time.perf_counter()
        tail_ids, tail_attn = left_pad([p[c:] for p, c in zip(view, cut)], adapter.pad_id, device)
        attn = torch.cat([pre_attn, tail_attn.long(), resp_mask.long()], dim=1)
        with torch.set_grad_enabled(grad):
            out = model(input_ids=torch.cat([tail_ids, resp], dim=1), attention_mask=attn,
                        position_ids=positions(model, attn)[:, pre_ids.shape[1]:],
                        use_cache=True, **{CACHE: _copy(cache, rows, detach=not grad)}, logits_to_keep=n + 1)
            logits.append(adapter.vocab_logits(out.logits[:, :-1]))
        seconds[str(v)] = time.perf_counter() - t0
    return logits, seconds
