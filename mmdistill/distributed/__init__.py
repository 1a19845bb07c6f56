"""Distributed training behind one interface (backend.py): data-parallel, FSDP2 or DeepSpeed
ZeRO, chosen once per run by `select` from how it was launched."""
from __future__ import annotations

from accelerate.utils import DistributedType
from omegaconf import DictConfig

from mmdistill.distributed.backend import Backend
from mmdistill.distributed.ddp import DataParallel
from mmdistill.distributed.deepspeed import DeepSpeed
from mmdistill.distributed.fsdp import FSDP2


def select(accelerator, cfg: DictConfig) -> Backend:
    """DeepSpeed when accelerate launched it (its config file), FSDP2 for train.fsdp, else
    data-parallel (one process included). Launch settings it cannot honour fail here, before
    any model loads."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeed(accelerator, cfg)
    if cfg.train.fsdp:
        return FSDP2(accelerator, cfg)
    return DataParallel(accelerator, cfg)


__all__ = ["Backend", "DataParallel", "DeepSpeed", "FSDP2", "select"]
