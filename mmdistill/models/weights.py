"""A model's weights as a safetensors file holds them: each tied weight once, under its first name.

What a model's forward needs to be called (FSDP2 shards and ZeRO-3 partitions make it a
collective every rank must join) is a fact about the model, read here, so that adapters and
views can ask it without knowing which distributed backend made it so.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule


def tied_names(model: torch.nn.Module) -> set[str]:
    """The second and later names of each tied weight (an LM head tied to the embedding)."""
    first: dict[int, str] = {}
    return {n for n, t in model.state_dict(keep_vars=True).items() if first.setdefault(id(t), n) != n}


def cpu_copies(items: Iterable[tuple[str, torch.Tensor]], keep: bool = True) -> dict[str, torch.Tensor]:
    """Detached CPU copies of (name, tensor) pairs. The pairs are still walked when not `keep`:
    a walk that gathers (ZeRO-3) is a collective every rank must make, the writer alone keeping
    what it gathers."""
    out = {}
    for n, t in items:
        if keep:
            out[n] = t.detach().to("cpu", copy=True)
    return out


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each weight once, copied to the CPU: safetensors refuses tensors that share storage, as
    tied embeddings do."""
    tied = tied_names(model)
    return cpu_copies((n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in tied)


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2: the model's parameters are DTensor shards of every rank's."""
    return isinstance(model, FSDPModule)


def partitioned(model: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3: outside a forward, the model's parameters are empty shells of a rank's partition."""
    param = next(model.parameters(), None)
    return param is not None and hasattr(param, "ds_id")


def collective(model: torch.nn.Module) -> bool:
    """Whether the model's forward is a collective every rank must join: FSDP2 or DeepSpeed
    ZeRO-3 gather each block's weights from all ranks while it runs."""
    return is_sharded(model) or partitioned(model)


def synced_generation(model: torch.nn.Module) -> bool:
    """A sharded model's forward is a collective: every rank must keep stepping `generate`
    until all ranks are done (HF's synced_gpus), however long its own responses are."""
    return collective(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Copied into the model's own tensors (under DeepSpeed, views of its flat buffers); the
    file holds each tied weight once."""
    missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    missing = [n for n in missing if n not in tied_names(model)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {file}: weights do not match the model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
