"""How rollouts decode: a static KV cache and a compiled decoding step where the model and the
device allow it; else eagerly over a dynamic cache, in mmdistill's own loop (models/token_loop.py)
where the model and settings allow it, else in transformers' `generate`.

An eager decoding step of a small model is hundreds of kernel launches that each do little work
(SmolLM2-135M at batch 64 on an H200: 25-30 ms a step, the GPU mostly waiting on the host). A
static cache gives every step the same shapes and tensor addresses, so torch.compile can fuse the
step and capture it as one CUDA graph (mode reduce-overhead) that replays for each new token.
docs/usage.md ("Fast rollouts") says what falls back and why.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import weakref
from typing import Any

import torch
from torch._dynamo.exc import TorchDynamoException
from transformers import CompileConfig, GenerationConfig, StaticCache

from mmdistill.models import token_loop
from mmdistill.models.composite import CompositeVLM
from mmdistill.models.sampling import inverse_cdf_generation, uses_inverse_cdf
from mmdistill.models.token_loop import cache_keyword, default_cache
from mmdistill.models.weights import collective

SHORTEST_CACHE = 64


def eager_reason(model: torch.nn.Module, mode: str) -> str | None:
    """Why `model`'s rollouts decode eagerly under rollout.fast=`mode`; None when they need not."""
    if mode == "off":
        return "rollout.fast=off"
    if collective(model):
        return "the model is sharded (FSDP2/ZeRO-3): each step gathers weights from every rank"
    if isinstance(model, CompositeVLM):
        return "composite VLM: its generate starts from image embeddings (inputs_embeds), not ids"
    if not hasattr(model, "get_compiled_call"):
        return f"{type(model).__name__} is not a transformers generation model"
    if getattr(model.config, "vision_config", None) is not None:
        return f"{type(model).__name__} is a vision-language model (image inputs, multimodal positions)"
    if not getattr(model, "_can_compile_fullgraph", False) or not default_cache(model):
        return f"{type(model).__name__} does not support a static KV cache"
    device = next(model.parameters()).device
    return _device_reason(device, mode)


def _device_reason(device: torch.device, mode: str) -> str | None:
    if device.type == "cpu":
        if mode == "auto":
            return ("on CPU, compiling takes seconds to minutes per batch shape, for steps 0.7-1.2x as fast as "
                    "eager ones (rollout.fast=on compiles anyway)")
        return None
    if device.type != "cuda":
        return f"compiled decoding is set up for CUDA (and CPU), not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: torch.compile cannot build CUDA kernels"
    return None


def cache_length(tokens: int) -> int:
    """Cache slots for prompt + response tokens: the next power of two, so that prompts of a
    similar width share one cache shape (one compiled graph) and the cache stays within 2x."""
    return 1 << max(tokens - 1, SHORTEST_CACHE - 1).bit_length()


def compile_config(device: torch.device) -> CompileConfig:
    """CUDA graphs on CUDA. dynamic=False: each shape gets its own static kernels, whichever shape
    a run compiled first, so a resumed run decodes with the same kernels as the run it continues."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)
    config._compile_all_devices = True  # else transformers compiles on accelerators only (rollout.fast=on on CPU)
    return config


def main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class Decoder:
    """Runs one adapter's `generate` calls on the fast path or the eager one, and says once why
    a model decodes eagerly. The static cache is kept from one rollout to the next: CUDA graphs
    replay on the tensor addresses they were recorded with, and a new cache per call would make
    them record again.

    A failure of the fast path falls back to eager decoding, redone from the same random state,
    when it is a compile error, or any error before the model's first fast rollout succeeded (a
    transformers version or model class the fast path does not fit). Later errors are raised."""

    def __init__(self):
        self.told: set[str] = set()
        self.failed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why its fast path failed
        self.proven: weakref.WeakSet = weakref.WeakSet()  # models with a fast rollout done
        self.cache: tuple[Any, tuple, StaticCache] | None = None  # (model ref, shape key, cache)

    def generate(self, model: torch.nn.Module, mode: str, ids: torch.Tensor, attn: torch.Tensor,
                 gen: GenerationConfig, sampler: str = "auto", loop: str = "auto", **kwargs: Any) -> torch.Tensor:
        reason = self.failed.get(model) or eager_reason(model, mode)
        if reason is None:
            try:
                out = self._fast(model, ids, attn, gen, sampler, **kwargs)
            except Exception as exc:
                if model in self.proven and not isinstance(exc, TorchDynamoException):
                    raise
                reason = f"the compiled decoding failed ({_root_cause(exc)})"
                self.failed[model] = reason
                self.cache = None
            else:
                self.proven.add(model)
                return out
        if mode != "off":
            self.tell(f"rollouts decode eagerly: {reason}")
        if loop == "auto" and token_loop.unfit_model(model, kwargs) is None:
            steps = token_loop.plan(model, gen, sampler)
            if isinstance(steps, token_loop.Plan):
                return token_loop.decode(model, ids, attn, steps)
            self.tell(f"rollouts decode in transformers' generate: {steps}")
        gen, kwargs = _with_sampler(gen, sampler, ids.device, kwargs)
        return model.generate(input_ids=ids, attention_mask=attn, generation_config=gen, **kwargs)

    def _fast(self, model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, gen: GenerationConfig,
              sampler: str, **kwargs: Any) -> torch.Tensor:
        device = ids.device
        gen, kwargs = _with_sampler(gen, sampler, device, kwargs)
        fast = copy.copy(gen)
        fast.compile_config = compile_config(device)
        cache = self.static_cache(model, ids.shape[0], cache_length(ids.shape[1] + gen.max_new_tokens))
        rng = _rng_state(device)
        try:
            return model.generate(input_ids=ids, attention_mask=attn, generation_config=fast,
                                  **{cache_keyword(model): cache}, **kwargs)
        except Exception:
            _set_rng_state(device, rng)  # an eager retry samples what this call would have
            raise

    def static_cache(self, model: torch.nn.Module, batch: int, length: int) -> StaticCache:
        """This model's cache for this shape, emptied; a new one when the model or shape changed."""
        key = (batch, length)
        if self.cache is None or self.cache[0]() is not model or self.cache[1] != key:
            self.cache = None  # the old cache's memory goes before the new one is allocated
            self.cache = (weakref.ref(model), key, _StaticCache(config=model.config, max_cache_len=length))
        cache = self.cache[2]
        cache.reset()
        return cache

    def tell(self, line: str) -> None:
        if line not in self.told:
            self.told.add(line)
            if main_process():
                print(f"mmdistill: {line}", file=sys.stderr)


def _with_sampler(gen: GenerationConfig, sampler: str, device: torch.device,
                  kwargs: dict[str, Any]) -> tuple[GenerationConfig, dict[str, Any]]:
    """generate's config and keywords for rollout.sampler: the inverse CDF as the last processor
    of a greedy generate (models/sampling.py)."""
    if gen.do_sample and uses_inverse_cdf(sampler, device):
        gen, processors = inverse_cdf_generation(gen)
        kwargs = {**kwargs, "logits_processor": processors}
    return gen, kwargs


class _StaticCache(StaticCache):
    """Keys and values stored in one dtype per layer, chosen at its first write as the wider of the
    two. Under bf16 autocast a Llama writes float32 keys (rotary embeddings computed in float32)
    and bf16 values; transformers 5.17's static layer allocates both in the keys' dtype and then
    refuses the bf16 values (measured on an H200: every fast rollout fell back to eager), and the
    decoding steps write bf16 keys. bf16 to float32 is exact, so nothing stored changes value."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        stored = layer.keys if layer.is_initialized and layer.keys is not None else None
        dtype = stored.dtype if stored is not None else torch.promote_types(key_states.dtype, value_states.dtype)
        return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)


def _root_cause(exc: BaseException) -> str:
    """The error under dynamo's wrappers (a compiler's own), on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split("Set TORCHDYNAMO_VERBOSE")[0].split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
