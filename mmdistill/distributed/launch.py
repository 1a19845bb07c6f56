"""How the run was launched, read once: the accelerate config file's distributed type (passed down
by `accelerate launch` in the environment), turned into an Accelerator and mmdistill's own FSDP2
settings. accelerate's FSDP plugin is not used: on a CPU-only machine it silently falls back to
unsharded data-parallel, and its FSDP1 form needs a GPU to exist."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from omegaconf import DictConfig


def _flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "false").strip().lower() in ("1", "true", "yes")


def launched(environ: Mapping[str, str]) -> bool:
    """Whether `accelerate launch` asked for DeepSpeed (its config file's distributed_type)."""
    return _flag(environ, "ACCELERATE_USE_DEEPSPEED")


def accelerator_options(deepspeed: bool) -> dict:
    """Accelerator arguments. On a machine without GPUs, accelerate would start DeepSpeed
    processes that each believe they are alone (no backend): gloo is named for them."""
    if not deepspeed:
        return {"cpu": not torch.cuda.is_available()}
    if torch.cuda.is_available():
        return {}
    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
# FSDP1's sharding strategies, in the order of their enum numbers (1-5), which configs may use instead.
STRATEGY_NAMES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
# accelerate's fsdp_reshard_after_forward (FSDP2) or strategy name (FSDP1) -> FSDP2's reshard_after_forward.
RESHARD = {"TRUE": True, "FALSE": False, "FULL_SHARD": True, "SHARD_GRAD_OP": False}
REFUSED = {"NO_SHARD": "nothing is sharded: use configs/accelerate/ddp.yaml",
           "HYBRID_SHARD": "hybrid (per-node) sharding is not supported",
           "HYBRID_SHARD_ZERO2": "hybrid (per-node) sharding is not supported"}

def launcher_fsdp(environ: Mapping[str, str]) -> dict | None:
    """The FSDP settings `accelerate launch` passes down from an accelerate config file
    (`distributed_type: FSDP`), as mmdistill's own: {"reshard_after_forward", "gradient_checkpointing"};
    None when the launch was not FSDP.

    accelerate's plugin cannot be used for this: on a CPU-only machine it silently falls back to
    unsharded data-parallel, and its FSDP1 form needs a GPU to exist. mmdistill shards with FSDP2
    whichever `fsdp_version` the file names: FULL_SHARD is reshard_after_forward=true,
    SHARD_GRAD_OP is false. What it cannot honour (parameter offload, NO_SHARD, hybrid sharding)
    is refused rather than ignored. (DeepSpeed launches are deepspeed.py's.)
    """
    if not _flag(environ, "ACCELERATE_USE_FSDP"):
        return None
    version = environ.get("FSDP_VERSION", "1").strip()
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().upper()
    # FSDP1 configs name a strategy; the older key wins when the new one holds none
    if version == "1" and reshard in ("TRUE", "FALSE"):
        reshard = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if reshard.isdigit() and 1 <= int(reshard) <= len(STRATEGY_NAMES):
        reshard = STRATEGY_NAMES[int(reshard) - 1]
    if reshard in REFUSED:
        raise ValueError(f"accelerate config fsdp_reshard_after_forward/fsdp_sharding_strategy={reshard}: "
                         f"{REFUSED[reshard]}")
    if reshard not in RESHARD:
        raise ValueError(f"accelerate config fsdp_reshard_after_forward={reshard!r}: "
                         "expected true, false, FULL_SHARD or SHARD_GRAD_OP")
    after_forward = RESHARD[reshard]
    if _flag(environ, "FSDP_OFFLOAD_PARAMS"):
        raise ValueError("accelerate config fsdp_offload_params=true: CPU offload is not supported; set it to false")
    return {"reshard_after_forward": after_forward,
            "gradient_checkpointing": _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING")}


def device_defaults(mixed_precision: str | None, tf32: bool, environ: Mapping[str, str], *, cuda: bool, bf16: bool,
                    deepspeed: bool) -> tuple[str | None, bool]:
    """(the Accelerator's mixed_precision, whether float32 matmuls run in TF32) for this device.

    Unset everywhere (train.mixed_precision null, no launcher flag): bf16 autocast on a GPU that
    has it, as the GPU measurements were taken; accelerate's own default (no) elsewhere. DeepSpeed
    keeps its config's choice: its bf16 also changes how it holds the optimizer's weights. TF32
    on CUDA unless train.tf32=false; on the CPU the setting would reach oneDNN's matmuls, so it
    is left alone there."""
    if mixed_precision is None and not deepspeed and not environ.get("ACCELERATE_MIXED_PRECISION") and bf16:
        mixed_precision = "bf16"
    return mixed_precision, tf32 and cuda


def trackers(names) -> list[str]:
    """The trackers of train.report_to, each installed: accelerate passes over a missing one in silence."""
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ValueError(f"config key 'train.report_to' names {name}, which is not installed here "
                             f"(pip install {_PACKAGE.get(name, name)})")
    return list(names)


_PACKAGE = {"comet_ml": "comet-ml", "mlflow": "mlflow-skinny"}


def make_accelerator(cfg: DictConfig) -> Accelerator:
    r"""The run's Accelerator. An accelerate FSDP config file is taken over by mmdistill's own
    FSDP2 (its settings written into cfg.train); without an accelerator device, processes started
    by \`accelerate launch\`/torchrun train data-parallel on the CPU (gloo) instead of each
    believing it is alone. On a GPU, bf16 autocast and TF32 unless the config says otherwise
    (device_defaults)."""
    from_file = launcher_fsdp(os.environ)
    if from_file is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"  # accelerate sets up plain data-parallel processes
        cfg.train.fsdp = True
        cfg.train.fsdp_reshard_after_forward = from_file["reshard_after_forward"]
        cfg.train.gradient_checkpointing = cfg.train.gradient_checkpointing or from_file["gradient_checkpointing"]
    options = accelerator_options(launched(os.environ))
    # accelerate imports an installed deepspeed anyway, whose device probe would warn on every run
    if options.get("cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a user's own choice is kept; DeepSpeed runs still probe
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    mixed_precision, tf32 = device_defaults(cfg.train.mixed_precision, cfg.train.tf32, os.environ, cuda=cuda, bf16=bf16,
                                            deepspeed=launched(os.environ))
    if tf32:
        torch.set_float32_matmul_precision("high")
    run_dir = Path(cfg.train.output_dir)  # tensorboard's events go in RUN_DIR/tensorboard
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=trackers(cfg.train.report_to) or None,
                              project_config=ProjectConfiguration(run_dir, logging_dir=run_dir / "tensorboard"),
                              **options)
    if accelerator.distributed_type == DistributedType.FSDP:  # launched some other way
        raise NotImplementedError("FSDP: accelerate's own wrapping is not used; launch with "
                                  "configs/accelerate/fsdp.yaml or set train.fsdp=true")
    return accelerator
