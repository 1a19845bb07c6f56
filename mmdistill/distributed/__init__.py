"""Distributed training behind one interface (backend.py): data-parallel, FSDP2 or DeepSpeed
ZeRO, chosen once per run by `select` from how it was launched."""
from __future__ import annotations

from accelerate.utils import DistributedType
from omegaconf import DictConfig, OmegaConf

from mmdistill.config import ConfigError
from mmdistill.distributed.backend import Backend
from mmdistill.distributed.ddp import DataParallel
from mmdistill.distributed.deepspeed import DeepSpeed
from mmdistill.distributed.fsdp import FSDP2


def select(accelerator, cfg: DictConfig) -> Backend:
    """DeepSpeed when accelerate launched it (its config file), FSDP2 for train.fsdp, else
    data-parallel (one process included). Launch settings it cannot honour fail here, before
    any model loads."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if OmegaConf.select(cfg, "student.lora.enabled", default=False):
            raise ConfigError("config key 'student.lora.enabled' is true under a DeepSpeed launch: LoRA students "
                              "train data-parallel only (their trained weights are small); launch with ddp.yaml")
        return DeepSpeed(accelerator, cfg)
    if cfg.train.fsdp:
        # train.fsdp may come from an accelerate FSDP config file, after the config was validated
        if OmegaConf.select(cfg, "student.lora.enabled", default=False):
            raise ConfigError("config key 'student.lora.enabled' is true with train.fsdp=true (an FSDP launch): "
                              "LoRA students train data-parallel only; launch with ddp.yaml")
        return FSDP2(accelerator, cfg)
    return DataParallel(accelerator, cfg)


__all__ = ["Backend", "DataParallel", "DeepSpeed", "FSDP2", "select"]
