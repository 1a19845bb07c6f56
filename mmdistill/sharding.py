"""FSDP2 students (`train.fsdp`): parameters sharded across the processes, gathered whole
wherever mmdistill reads or writes all of them (checkpoints, the EMA teacher, the final save).

mmdistill applies torch's `fully_shard` itself, after building any self-teacher from the whole
student, so the same code runs on GPUs (NCCL) and in the CPU tests (gloo). Every function here
that gathers is a collective: all ranks call it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from mmdistill.zero import one_by_one, partitioned, state_items

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def collective(model: torch.nn.Module) -> bool:
    """Whether the model's forward is a collective every rank must join: FSDP2 or DeepSpeed
    ZeRO-3 gather each block's weights from all ranks while it runs."""
    return is_sharded(model) or partitioned(model)


def synced_generation(model: torch.nn.Module) -> bool:
    """A sharded model's forward is a collective: every rank must keep stepping `generate`
    until all ranks are done (HF's synced_gpus), however long its own responses are."""
    return collective(model) and dist.is_initialized() and dist.get_world_size() > 1


# FSDP1's sharding strategies, in the order of their enum numbers (1-5), which configs may use instead.
STRATEGY_NAMES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
# accelerate's fsdp_reshard_after_forward (FSDP2) or strategy name (FSDP1) -> FSDP2's reshard_after_forward.
RESHARD = {"TRUE": True, "FALSE": False, "FULL_SHARD": True, "SHARD_GRAD_OP": False}
REFUSED = {"NO_SHARD": "nothing is sharded: use configs/accelerate/ddp.yaml",
           "HYBRID_SHARD": "hybrid (per-node) sharding is not supported",
           "HYBRID_SHARD_ZERO2": "hybrid (per-node) sharding is not supported"}


def _flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "false").strip().lower() in ("1", "true", "yes")


def launcher_fsdp(environ: Mapping[str, str]) -> dict | None:
    """The FSDP settings `accelerate launch` passes down from an accelerate config file
    (`distributed_type: FSDP`), as mmdistill's own: {"reshard_after_forward", "gradient_checkpointing"};
    None when the launch was not FSDP.

    accelerate's plugin cannot be used for this: on a CPU-only machine it silently falls back to
    unsharded data-parallel, and its FSDP1 form needs a GPU to exist. mmdistill shards with FSDP2
    whichever `fsdp_version` the file names: FULL_SHARD is reshard_after_forward=true,
    SHARD_GRAD_OP is false. What it cannot honour (parameter offload, NO_SHARD, hybrid sharding)
    is refused rather than ignored. (DeepSpeed launches are zero.py's.)
    """
    if not _flag(environ, "ACCELERATE_USE_FSDP"):
        return None
    version = environ.get("FSDP_VERSION", "1").strip()
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().upper()
    if version == "1" and reshard in ("TRUE", "FALSE"):  # FSDP1 configs name a strategy; the older key wins when the new one holds none
        reshard = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if reshard.isdigit() and 1 <= int(reshard) <= len(STRATEGY_NAMES):
        reshard = STRATEGY_NAMES[int(reshard) - 1]
    if reshard in REFUSED:
        raise ValueError(f"accelerate config fsdp_reshard_after_forward/fsdp_sharding_strategy={reshard}: {REFUSED[reshard]}")
    if reshard not in RESHARD:
        raise ValueError(f"accelerate config fsdp_reshard_after_forward={reshard!r}: expected true, false, FULL_SHARD or SHARD_GRAD_OP")
    after_forward = RESHARD[reshard]
    if _flag(environ, "FSDP_OFFLOAD_PARAMS"):
        raise ValueError("accelerate config fsdp_offload_params=true: CPU offload is not supported; set it to false")
    return {"reshard_after_forward": after_forward, "gradient_checkpointing": _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING")}


def shard(model: torch.nn.Module, mixed_precision: str = "no", reshard_after_forward: bool = True) -> torch.nn.Module:
    """Each transformer block is its own FSDP unit (HF's `_no_split_modules`), then the root.
    reshard_after_forward=False keeps the gathered weights from forward to backward (ZeRO-2 style:
    more memory, one all-gather less per step)."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"train.fsdp: a {type(model).__name__} student cannot be sharded (its generate reads weights "
            "outside forward); FSDP supports Hugging Face models: use data-parallel for composite VLMs"
        )
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32) \
        if mixed_precision in DTYPES else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


@contextlib.contextmanager
def no_sync(accelerator, model: torch.nn.Module):
    """Gradient accumulation without syncing: FSDP2 keeps this micro-batch's gradients unsharded
    and local (reduce-scattered with the last one); anything else goes through accelerate."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (of rank 0 only, for an FSDP model)."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in state_items(model)}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in state.items()}


def whole_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of the model's state dict, one entry gathered at a time for a sharded
    model (FSDP, ZeRO-3), on every rank: a collective walk that never holds the whole model."""
    for name, t in state_items(model):
        yield name, t.full_tensor() if isinstance(t, DTensor) else t


def tied_names(model: torch.nn.Module) -> set[str]:
    """The second and later names of each tied weight (an LM head tied to the embedding)."""
    first: dict[int, str] = {}
    return {n for n, t in model.state_dict(keep_vars=True).items() if first.setdefault(id(t), n) != n}


def untied_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Each weight once, under its first name, copied to the CPU: safetensors refuses tensors
    that share storage, as tied embeddings do, and as all of DeepSpeed's flattened parameters do.
    A ZeRO-3 model is gathered one parameter at a time: every rank calls this, and only those
    that `keep` the copies (the writer) hold them (empty for the others)."""
    out = {}
    for n, t in state_items(model, skip=tied_names(model)):
        if keep:
            out[n] = t.detach().to("cpu", copy=True)
    return out


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Keyed by parameter name (not by a rank's shard), so any rank count reads it back."""
    return get_optimizer_state_dict(model, _bare(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, _bare(optimizer), state, options=StateDictOptions(full_state_dict=True))


def full_parameters(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The model's parameters, each gathered whole while it is read (FSDP, ZeRO-3)."""
    for _, p in one_by_one(model.named_parameters()):
        yield p.full_tensor() if isinstance(p, DTensor) else p


def _bare(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
