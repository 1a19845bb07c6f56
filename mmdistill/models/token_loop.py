"""mmdistill's own decoding loop for plain causal LMs: transformers' eager `generate` for the
settings a rollout uses, without the per-token work over the vocabulary a rollout does not need.

At a large vocabulary a small model's eager decoding step is mostly that work (16 rows,
vocabulary 49,152, a 2-layer model on this CPU: generate 0.53 s for 32 tokens, this loop 0.33 s):
each logits processor that bans ids (EOS before min_new_tokens, suppressed ids) builds a boolean
mask over the whole vocabulary with `isin` and a `where` every step, and the inverse-CDF draw,
which transformers can only host as a processor of a greedy generate, writes a full -inf score
tensor for generate's argmax to read back. Here banned ids are filled by index and the draw hands
back its ids.

The loop implements greedy and sampled decoding with temperature, top-p (transformers' own
warpers), min_new_tokens, suppress_tokens, EOS and padding of finished rows, and gives
transformers' tokens for them from the same random state (tests/models/test_token_loop.py,
token for token). The settings are read from the generation config transformers would use, the
model's own `generation_config` merged in; anything else in it (a repetition penalty, top-k, a
stop string ...), an input besides ids and mask, or a model that is not a plain decoder-only LM
takes `generate`, which says so in one line when it is a setting.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from mmdistill.models.composite import CompositeVLM
from mmdistill.models.sampling import inverse_cdf_draw, uses_inverse_cdf
from mmdistill.models.weights import collective

LOOPS = ("auto", "transformers")

# Settings the loop carries out (below); settings that change nothing it does (an assistant's,
# compilation's: it runs eagerly); settings that change nothing at these values.
CARRIED = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "suppress_tokens",
           "pad_token_id", "eos_token_id"}
NO_EFFECT = {"transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id", "max_length",
             "compile_config", "disable_compile", "low_memory", "continuous_batching_config", "num_assistant_tokens",
             "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
             "target_lookbehind", "max_matching_ngram_size", "assistant_ensemble_weight"}
INERT = {"use_cache": (True,), "min_length": (0,), "early_stopping": (False,), "num_beams": (1,),
         "num_beam_groups": (1,), "num_return_sequences": (1,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,),
         "eta_cutoff": (0.0,), "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,),
         "length_penalty": (1.0,), "no_repeat_ngram_size": (0,), "encoder_no_repeat_ngram_size": (0,),
         "diversity_penalty": (0.0,), "remove_invalid_values": (False,), "renormalize_logits": (False,),
         "token_healing": (False,), "output_attentions": (False,), "output_hidden_states": (False,),
         "output_scores": (False,), "output_logits": (False,), "return_dict_in_generate": (False,),
         "is_assistant": (False,), "use_mtp": (False,), "guidance_scale": (1.0,)}


@dataclass(frozen=True)
class Plan:
    """What one rollout's loop does at each new token."""

    max_new_tokens: int
    min_new_tokens: int
    eos: tuple[int, ...]
    pad: int
    suppress: tuple[int, ...]
    warpers: LogitsProcessorList  # transformers' temperature and top-p warpers, in its order; empty when greedy
    draw: Callable[[torch.Tensor], torch.Tensor]  # float32 scores [B, V] -> ids [B]


def unfit_model(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why this model's rollouts are not the loop's to decode (None: they are): a VLM, an
    encoder-decoder, a sharded model, inputs besides ids and mask."""
    if kwargs:
        return f"the rollout passes {', '.join(sorted(kwargs))} to generate"
    config = getattr(model, "config", None)
    if isinstance(model, CompositeVLM) or getattr(config, "vision_config", None) is not None:
        return f"{type(model).__name__} is a vision-language model"
    if config is None or config.is_encoder_decoder or not hasattr(model, "_prepare_generation_config"):
        return f"{type(model).__name__} is not a decoder-only transformers model"
    if collective(model):
        return "the model is sharded (FSDP2/ZeRO-3): ranks decode in lockstep (synced_gpus)"
    if not default_cache(model):
        return f"{type(model).__name__} keeps its own kind of cache"
    return None


def default_cache(model: torch.nn.Module) -> bool:
    """Whether generate builds the model a standard cache (models with their own, like RWKV, do not)."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return supports is None or supports()


def cache_keyword(model: torch.nn.Module) -> str:
    """Newer transformers call generate's `past_key_values` `cache` (the old name warns); the
    model's forward says which this version takes."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def plan(model: torch.nn.Module, gen: GenerationConfig, sampler: str) -> Plan | str:
    """This call's Plan for a model `unfit_model` passes, or the generation setting the loop
    does not carry out."""
    try:
        eff, _ = model._prepare_generation_config(gen)  # transformers' own merge with model.generation_config
    except (AttributeError, TypeError, ValueError) as exc:
        return f"transformers' generation config could not be read ({type(exc).__name__})"
    why = _settings_reason(eff)
    if why is not None:
        return why
    eos = _ids(eff.eos_token_id)
    if not eos or eff.pad_token_id is None:
        return "the generation config names no EOS or pad token"
    warpers = LogitsProcessorList()
    if eff.do_sample:
        if eff.temperature is not None and eff.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(eff.temperature))
        if eff.top_p is not None and eff.top_p < 1.0:
            warpers.append(TopPLogitsWarper(eff.top_p))
    device = next(model.parameters()).device
    draw = _greedy if not eff.do_sample else inverse_cdf_draw if uses_inverse_cdf(sampler, device) else _multinomial
    return Plan(eff.max_new_tokens, eff.min_new_tokens or 0, eos, int(eff.pad_token_id),
                _ids(eff.suppress_tokens), warpers, draw)


def _settings_reason(eff: GenerationConfig) -> str | None:
    for key, value in eff.to_dict().items():
        if key in CARRIED or key in NO_EFFECT or value is None or value in INERT.get(key, ()):
            continue
        return f"generation setting {key}={value!r}"
    if eff.max_new_tokens is None:
        return "no max_new_tokens"
    if eff.do_sample and eff.top_k:
        return f"generation setting top_k={eff.top_k}"
    if eff.do_sample and (eff.temperature is not None and eff.temperature <= 0):
        return f"generation setting temperature={eff.temperature}"
    return None


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _greedy(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(-1)


def _multinomial(scores: torch.Tensor) -> torch.Tensor:
    """transformers' draw: softmax, then torch.multinomial."""
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


@torch.no_grad()
def decode(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, plan: Plan) -> torch.Tensor:
    """[B, prompt + new] ids: the prompt, then each row's tokens, padding after its EOS; stops
    when every row has ended or at max_new_tokens, as generate does."""
    rows, device = ids.shape[0], ids.device
    cache_key = cache_keyword(model)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers before the config argument
        cache = DynamicCache()
    positions = attn.long().cumsum(-1) - 1
    positions.masked_fill_(attn == 0, 1)
    first = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                   **{cache_key: cache}, **first).logits
    eos = torch.tensor(plan.eos, device=device)
    suppress = torch.tensor(plan.suppress, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    position = positions[:, -1:]
    tokens = []
    for step in range(plan.max_new_tokens):
        scores = logits[:, -1].float()  # float32 like generate's scores; written in place, logits is not read again
        if suppress.numel():
            scores.index_fill_(-1, suppress, float("-inf"))
        if step < plan.min_new_tokens:
            scores.index_fill_(-1, eos, float("-inf"))
        for warper in plan.warpers:
            scores = warper(None, scores)
        token = torch.where(unfinished, plan.draw(scores), plan.pad)
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step + 1 == plan.max_new_tokens or not bool(unfinished.any()):
            break
        attn = torch.cat([attn, attn.new_ones(rows, 1)], dim=-1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=attn, position_ids=position, use_cache=True,
                       **{cache_key: cache}).logits
    return torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
