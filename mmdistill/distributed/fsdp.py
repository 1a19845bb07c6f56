"""FSDP2 students (`train.fsdp`): parameters sharded across the processes, gathered whole
wherever mmdistill reads or writes all of them (checkpoints, the EMA teacher, the final save).

mmdistill applies torch's `fully_shard` itself, after building any self-teacher from the whole
student, so the same code runs on GPUs (NCCL) and in the CPU tests (gloo). Every function here
that gathers is a collective: all ranks call it. A frozen teacher can be sharded the same way
under any launch but DeepSpeed (train.fsdp_teacher).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from mmdistill.config import ConfigError
from mmdistill.distributed.backend import Backend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDP2(Backend):
    name = "FSDP2"
    collective = True

    def __init__(self, accelerator, cfg):
        super().__init__(accelerator, cfg)
        if self.world_size < 2:
            raise ValueError("train.fsdp=true shards the student across processes: launch 2 or more "
                             "(accelerate launch --num_processes N -m mmdistill train ...)")

    def prepare_model(self, student: torch.nn.Module) -> torch.nn.Module:
        return shard(student, self.accelerator.mixed_precision, self.cfg.train.fsdp_reshard_after_forward)

    def prepare(self, student: torch.nn.Module, optimizer) -> tuple[torch.nn.Module, object]:
        return student, self.accelerator.prepare(optimizer)  # FSDP2 syncs gradients itself

    def shard_teacher(self, teacher) -> None:
        shard_teacher(teacher, self)

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, last: bool):
        """Accumulating micro-batches keep their gradients unsharded and local; the last one
        reduce-scatters them all."""
        model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def export_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return full_state_dict(model)

    def state(self, directory: Path, model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        return full_state_dict(model), full_optimizer_state(model, optimizer)

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer, optimizer_state: dict | None) -> None:
        set_model_state_dict(model, load_file(str(directory / "student.safetensors")),
                             options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, _bare(optimizer), optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))


def shard_teacher(teacher, backend: Backend) -> None:
    if teacher.mode != "model":
        raise ConfigError(f"train.fsdp_teacher=true shards a separate teacher model; teacher.mode={teacher.mode} "
                          "is a copy of the student (shard the student with train.fsdp instead)")
    if backend.world_size < 2:
        raise ConfigError("train.fsdp_teacher=true shards the teacher across processes: launch 2 or more")
    shard(teacher.model, backend.accelerator.mixed_precision)  # in place: each rank keeps 1/N of it


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


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (of rank 0 only)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in state.items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Keyed by parameter name (not by a rank's shard), so any rank count reads it back."""
    return get_optimizer_state_dict(model, _bare(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _bare(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
