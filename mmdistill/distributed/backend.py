"""The one interface the training loop, checkpoints and exports use to reach their distributed
engine. Data-parallel (ddp.py), FSDP2 (fsdp.py) and DeepSpeed ZeRO (deepspeed.py) each implement
it; `mmdistill.distributed.select` chooses one per run, from how the run was launched.

A step, whichever engine runs it: for each micro-batch, `with backend.micro_batch(model, last)`,
forward and `backend.backward(model, loss)`; then `backend.optimizer_step(model, optimizer, clip)`.
Whole weights (checkpoints, the final save, the EMA self-teacher, the replica checksum) come
through `state`, `export_weights`, `parameters` and `whole_items`, one parameter gathered at a
time where the engine shards them.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import gather_object

from mmdistill.config import ConfigError
from mmdistill.distributed import gather


class Backend:
    name = ""
    collective = False  # whether the student's forward is a collective (every rank must call it)

    def __init__(self, accelerator=None, cfg=None):
        self.accelerator, self.cfg = accelerator, cfg

    # -- processes ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank: a collective every rank calls, so that a decision
        one rank makes alone (stop, skip a damaged checkpoint) is made by all."""
        if self.world_size == 1:
            return bool(flag)
        found = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(found, "sum").item() > 0)

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank: a collective."""
        return [obj] if self.world_size == 1 else gather_object([obj])

    @property
    def loss_scaling(self) -> bool:
        """fp16's dynamic loss scaler is on: a non-finite gradient norm is then an overflow it
        skips the step for and lowers its scale, routine and not a reason to stop."""
        return getattr(self.accelerator, "scaler", None) is not None

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model) if self.accelerator else model

    # -- set-up ---------------------------------------------------------------------------------
    def prepare_model(self, student: torch.nn.Module) -> torch.nn.Module:
        """The student before its optimizer is built (FSDP2 shards it here)."""
        return student

    def build_optimizer(self, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                        weight_decay: float, implementation: str = "auto") -> torch.optim.Optimizer:
        """torch's AdamW with the kernel optim.implementation names (adamw_kernel)."""
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                 **adamw_kernel(implementation, params))

    def prepare(self, student: torch.nn.Module, optimizer) -> tuple[torch.nn.Module, object]:
        """Wrapped for gradient sync (DDP, DeepSpeed's engine), or already sharded (FSDP2)."""
        return self.accelerator.prepare(student, optimizer)

    def shard_teacher(self, teacher) -> None:
        """train.fsdp_teacher: each rank keeps 1/N of a separate frozen teacher (FSDP2, forward only)."""
        raise ConfigError(f"train.fsdp_teacher=true is not supported under {self.name}")

    # -- a step ---------------------------------------------------------------------------------
    def micro_batch(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """One micro-batch's forward and backward; only the last of a step syncs gradients."""
        raise NotImplementedError

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """`loss` is already divided by the step's micro-batch count."""
        self.accelerator.backward(loss)

    def optimizer_step(self, model: torch.nn.Module, optimizer, clip: float) -> float:
        """Clip, step and zero the gradients; returns the gradient norm before clipping. A
        non-finite norm (it is the norm of the gradients of every rank, the same on each) skips
        the step: nothing is applied (under loss scaling the scaler skips it itself)."""
        norm = float(self.accelerator.clip_grad_norm_(model.parameters(), clip))
        if math.isfinite(norm) or self.loss_scaling:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- whole weights --------------------------------------------------------------------------
    def parameters(self, model: torch.nn.Module) -> Iterator[torch.Tensor]:
        """The parameters, each whole while it is read (the EMA self-teacher's update)."""
        return gather.full_parameters(model)

    def whole_items(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole tensor) of the state dict, one at a time, on every rank (the checksum)."""
        return gather.whole_items(model)

    def export_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The weights the final save writes; None: the model's own save_pretrained reads them."""
        return None

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, directory: Path, model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict | None]:
        """(weights, optimizer state) that the main process writes to the checkpoint; every rank
        calls it, and may write its own part into `directory`."""
        raise NotImplementedError

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer, optimizer_state: dict | None) -> None:
        raise NotImplementedError


# Devices whose floating-point parameters torch's fused AdamW takes (torch >= 2.4 for the CPU).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw_kernel(implementation: str, params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """AdamW's keyword for optim.implementation. auto: the fused kernel when every parameter is a
    floating-point tensor on a device it covers; otherwise ("default" too) torch's own choice:
    foreach on CUDA, a Python loop over the tensors on the CPU, the slowest there."""
    if implementation == "fused":
        return {"fused": True}
    if implementation in ("foreach", "for_loop"):
        return {"foreach": implementation == "foreach"}
    fusable = params and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return {"fused": True} if implementation == "auto" and fusable else {}
