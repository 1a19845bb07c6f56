"""LoRA students through peft (`student.lora`).

peft injects its adapter layers into the student in place, so the student stays the model
class the rest of mmdistill knows (a transformers model, a composite VLM): rollouts, the shared
prefix cache, DDP and saving see no wrapper. The PeftModel peft returns is kept beside the
model, not as a submodule (it holds the model), for what only it does: switching the adapters
off or over to another adapter, and saving them. With the adapters off the student is exactly
the model it was loaded as, which is why the frozen self-teacher and the initial student need
no copy of the weights, and an EMA teacher only a second adapter.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from mmdistill.models.composite import CompositeVLM

ADAPTER = "default"  # the trained adapter (peft's default name, what PeftModel.from_pretrained loads)
EMA = "ema"  # the EMA self-teacher's adapter
_HANDLE = "_mmdistill_peft"


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder the text comes from: a composite's LM's, a transformers VLM's text decoder,
    a causal LM's body."""
    if isinstance(model, CompositeVLM):
        model = model.lm
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def target_names(model: torch.nn.Module, cfg) -> list[str]:
    """Full names of the linear layers that get adapters: in the language model those whose
    name ends in one of `cfg.target_modules`; with `cfg.vision`, outside it (tower, projector)
    those ending in `cfg.vision_target_modules`. The output head is never adapted, nor a linear
    layer inside nn.MultiheadAttention, whose forward reads its weight directly (an adapter
    there would be silently skipped)."""
    decoder = language_model(model)
    inside = {id(m) for m in decoder.modules()}
    skip = {id(c) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) for c in m.modules()}
    skip |= {id(m) for m in (model.get_output_embeddings(),) if m is not None} if hasattr(
        model, "get_output_embeddings") else set()
    text, vision = set(cfg.target_modules), set(cfg.vision_target_modules) if cfg.vision else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or id(module) in skip:
            continue
        wanted = text if id(module) in inside else vision
        if name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    return names


def add_lora(model: torch.nn.Module, cfg) -> PeftModel:
    """Adapters on `model` in place (its base weights frozen); returns peft's handle, which
    `handle(model)` gives back later. `cfg`: student.lora. A text model's adapter directory is
    a causal LM's (AutoPeftModelForCausalLM loads it); a VLM's a plain PeftModel's."""
    vlm = isinstance(model, CompositeVLM) or hasattr(getattr(model, "config", None), "vision_config")
    task_type = None if vlm else "CAUSAL_LM"
    targets = target_names(model, cfg)
    if not targets:
        raise ValueError(f"student.lora.target_modules={list(cfg.target_modules)}: no linear layer of the "
                         f"{type(model).__name__}'s language model has such a name")
    config = LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                        target_modules=targets, task_type=task_type, bias="none")
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated name; nothing for a user to change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        peft = get_peft_model(model, config, adapter_name=ADAPTER)
    model.__dict__[_HANDLE] = peft  # not a submodule: peft holds the model
    return peft


def handle(model: torch.nn.Module) -> PeftModel | None:
    return getattr(model, "__dict__", {}).get(_HANDLE)


def has_lora(model: torch.nn.Module) -> bool:
    return handle(model) is not None


def adapter_parameters(model: torch.nn.Module, name: str = ADAPTER) -> dict[str, torch.nn.Parameter]:
    """The adapter `name`'s parameters under their names in the model's state dict."""
    pattern = re.compile(rf"\.lora_\w+\.{re.escape(name)}(\.|$)")
    return {n: p for n, p in model.named_parameters() if pattern.search(n)}


@contextlib.contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode while a frozen view is scored (no dropout: the frozen copy it replaces was in
    eval mode), each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The model as loaded, before any adapter: the frozen self-teacher and the initial student."""
    with _frozen_eval(model), handle(model).disable_adapter():
        yield


@contextlib.contextmanager
def adapter_on(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Adapter `name` in place of the trained one (the EMA teacher's), frozen; the trained one
    active and trainable again after."""
    peft = handle(model)
    before = peft.active_adapter
    with _frozen_eval(model):
        peft.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            peft.set_adapter(before)


def add_ema_adapter(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """A second adapter starting equal to the trained one, never trained: the EMA teacher's.
    Returns {trained name: (ema parameter, trained parameter)}."""
    peft = handle(model)
    peft.add_adapter(EMA, peft.peft_config[ADAPTER])
    ema = adapter_parameters(model, EMA)
    pairs = {}
    with torch.no_grad():
        for n, p in adapter_parameters(model, ADAPTER).items():
            twin = ema[n.replace(f".{ADAPTER}", f".{EMA}", 1)]
            twin.copy_(p)
            twin.requires_grad_(False)
            pairs[n] = (twin, p)
    return pairs


def copies(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def load_into(params: dict[str, torch.Tensor], file: Path) -> None:
    """A checkpoint's adapter weights into the model's own tensors; the names must match."""
    state = load_file(str(file))
    if state.keys() != params.keys():
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise ValueError(f"checkpoint {file}: adapter weights do not match the LoRA student "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); same student.lora settings?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the plain model the trained adapter folds into, under the base model's
    names, as CPU copies; the live student is left as it is (peft's merge_and_unload would fold
    it in place). Each adapted weight is peft's own merge: base + get_delta_weight."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    out = {}
    for key, t in model.state_dict().items():
        if re.search(r"\.lora_\w+\.", key):
            continue
        owner, _, leaf = key.rpartition(".base_layer.")
        if owner and owner in layers and leaf == "weight":
            delta = layers[owner].get_delta_weight(ADAPTER)
            t = t + delta.to(t.dtype)
        out[key.replace(".base_layer.", ".") if owner in layers else key] = t.detach().to("cpu", copy=True)
    return out
