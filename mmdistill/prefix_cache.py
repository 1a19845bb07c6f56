"""Score several views of one model over the prompt prefix they share, computed once.

The plain, partial and full prompts of a sample differ only from where p is spliced in, so the
chat header, system prompt and question before it (and, for partial p, a prefix of p itself) are
the same tokens; and the rollouts of one prompt (rollout.num_rollouts) share all of it. Each
distinct prefix runs once per model; each view then runs only its own tail and the response on
a copy of that KV cache. Logits equal the one-view-at-a-time path's (up to float
rounding): a token's keys and values depend on the tokens before it only.

Layout of a view's sequence, every row: [left pad | shared prefix | left pad | own tail | response].
Positions count real tokens, so the padding inside the row shifts nothing.
"""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmdistill.adapters.text import left_pad, positions, unwrap, uses_model_positions
from mmdistill.batch import Batch
from mmdistill.sharding import is_sharded


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
    """A shared cache needs a HF model that takes a KV cache and 1-D positions; a sharded
    (FSDP) model with gradient is only called through its wrapper, as one call per backward."""
    inner = unwrap(model)
    if not isinstance(inner, PreTrainedModel) or uses_model_positions(model):
        return False
    if grad and is_sharded(inner):
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
    return DynamicCache(ddp_cache_data=[(pick(l.keys), pick(l.values)) for l in cache.layers])


def score_views(adapter, model: torch.nn.Module, batch: Batch, levels: list[str | None], grads: list[bool],
                policy: str) -> tuple[list[torch.Tensor] | None, dict[str, float]]:
    """[B, N, V] logits of each view (levels[v], with gradient where grads[v]) of one model, or
    None where its cache cannot be shared: then the caller scores the views one by one.
    Also returns the seconds spent: "prefix" (building the prompts and running their shared
    prefix) and one entry per view index."""
    repeated = len({id(s) for s in batch.samples}) < len(batch.samples)  # rollouts of one prompt
    if not (len(levels) > 1 or repeated) or not can_share(model, any(grads)):
        return None, {}
    if adapter.has_images(batch.samples):  # a VLM's image features sit inside the prompt
        return None, {}
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    encoded = [adapter.encode(batch.samples, level, policy, device) for level in levels]
    if any(p.extras for p in encoded):
        return None, {}
    n = batch.response_ids.shape[1]
    for p in encoded:
        adapter.check_fits(batch.samples, p, n, "scored")
    prompts = [p.unpadded() for p in encoded]
    cut = shared_lengths(prompts)
    resp, resp_mask = batch.response_ids.to(device), batch.response_mask.to(device)
    seconds: dict[str, float] = {}
    unique: dict[tuple[int, ...], int] = {}
    rows = torch.tensor([unique.setdefault(tuple(p[:c]), len(unique)) for p, c in zip(prompts[0], cut)], device=device)
    pre_ids, pre_attn = left_pad([list(p) for p in unique], adapter.pad_id, device)
    with torch.set_grad_enabled(any(grads)):
        # The prefix runs on the unwrapped model: DDP expects one wrapped forward per backward.
        out = unwrap(model)(input_ids=pre_ids, attention_mask=pre_attn, position_ids=positions(model, pre_attn),
                            use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE, None)
    if not isinstance(cache, DynamicCache) or not all(type(l) is DynamicLayer for l in cache.layers):
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
