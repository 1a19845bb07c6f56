"""Data-parallel training (accelerate's DDP, or a single process): every rank holds the whole
student and its optimizer; gradients are all-reduced on the last micro-batch of a step."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mmdistill.distributed import gather
from mmdistill.distributed.backend import Backend
from mmdistill.distributed.fsdp import shard_teacher
from mmdistill.models import lora
from mmdistill.models.weights import load_weights


class DataParallel(Backend):
    name = "data-parallel"

    def shard_teacher(self, teacher) -> None:
        shard_teacher(teacher, self)

    def micro_batch(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def state(self, directory: Path, model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict | None]:
        if lora.has_lora(model):  # what trains: the base weights are the loaded model's, unchanged
            trained = lora.copies(lora.adapter_parameters(model)) if self.main else {}
            return trained, optimizer.state_dict() if self.main else None
        return gather.untied_copies(model, keep=self.main), optimizer.state_dict() if self.main else None

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer, optimizer_state: dict | None) -> None:
        if optimizer_state is None:
            raise ValueError(f"checkpoint {directory} was written under DeepSpeed ZeRO "
                             "(per-rank optimizer partitions); resume it with the same DeepSpeed launch")
        if lora.has_lora(model):
            lora.load_into(lora.adapter_parameters(model), directory / "student.safetensors")
        else:
            load_weights(model, directory / "student.safetensors")
        optimizer.load_state_dict(optimizer_state)
