"""Whole weights read one entry at a time from a model that may be sharded (FSDP2) or partitioned
(DeepSpeed ZeRO-3): checkpoints, the EMA self-teacher, the final save and the replica checksum
never hold the whole model on a device at once. On an ordinary model every walk here is a plain
iteration. On a sharded one it is a collective: every rank walks all of it."""
from __future__ import annotations

from collections.abc import Container, Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor

from mmdistill.models.weights import cpu_copies, tied_names


def one_by_one(items: Iterable[tuple[str, torch.Tensor]], modify: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs as given, each ZeRO-3 parameter among them gathered while the
    caller holds it. `modify`: what rank 0 writes into a parameter is kept. Tensors are the
    model's own: detach before keeping one."""
    for n, t in items:
        if not hasattr(t, "ds_id"):  # not partitioned (a buffer, or any other model's tensor)
            yield n, t
            continue
        import deepspeed  # only a ZeRO-3 parameter leads here

        with deepspeed.zero.GatheredParameters([t], modifier_rank=0 if modify else None):
            yield n, t


def state_items(model: torch.nn.Module, skip: Container[str] = (),
                modify: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's state dict, in its order, leaving out the names in `skip`,
    each gathered while it is held (see one_by_one)."""
    return one_by_one(((n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in skip), modify)


def whole_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of the model's state dict, FSDP2 shards and ZeRO-3 partitions gathered
    one entry at a time, on every rank."""
    for name, t in state_items(model):
        yield name, t.full_tensor() if isinstance(t, DTensor) else t


def full_parameters(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The model's parameters, each gathered whole while it is read."""
    for _, p in one_by_one(model.named_parameters()):
        yield p.full_tensor() if isinstance(p, DTensor) else p


def untied_copies(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Each weight once (tied ones under their first name), copied to the CPU, a ZeRO-3 model
    gathered one parameter at a time; copies are kept only where `keep` (the writer)."""
    return cpu_copies(state_items(model, skip=tied_names(model)), keep)
