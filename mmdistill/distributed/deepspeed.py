"""DeepSpeed ZeRO students (stages 1, 2 and 3) from accelerate's DeepSpeed config files.

`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m mmdistill train CONFIG`
hands the student and its optimizer to DeepSpeed: ZeRO-1 partitions the optimizer state across
the processes, ZeRO-2 the gradients too, ZeRO-3 the weights as well. Under stages 1-2 every
process keeps the whole weights, so rollouts, evaluation and self-teachers work as under DDP.
Under ZeRO-3 a forward is a collective that gathers each block's weights: rollouts run
`generate(synced_gpus=True)`, evaluation runs on every rank, and whatever reads all the weights
(checkpoints, the EMA self-teacher, the final save) gathers them one parameter at a time
(`one_by_one`), so no rank holds the whole model on its device at once. The
teacher is never given to DeepSpeed: it is frozen and whole on every process.

mmdistill's config decides the batch, accumulation and clipping (train.batch_size, train.grad_accum,
optim.grad_clip); they are written into DeepSpeed's config before the engine is built. The step
is driven explicitly: each micro-batch's backward is told whether it is the last (DeepSpeed then
reduces), and the engine steps once per optimizer step, so a step cut short by the end of the
data still applies what it accumulated.
CPU offload of the optimizer state (any stage) and of the weights (stage 3) is DeepSpeed's own;
the optimizer is then DeepSpeed's CPU AdamW, which it requires there (`build_optimizer`).

Refused, each with a line naming the config key: stage 0 (plain data-parallel:
configs/accelerate/ddp.yaml), nvme offload, fp16 (loss scaling) and zero3_init_flag (models are
built whole, then partitioned by the engine); and under ZeRO-3 a student that is not a Hugging
Face model (a composite VLM's tower weights are read outside its modules' forward, where
DeepSpeed would not have gathered them).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.integrations import unset_hf_deepspeed_config

from mmdistill.config import ConfigError
from mmdistill.distributed import gather
from mmdistill.distributed.backend import Backend
from mmdistill.models.weights import load_weights, partitioned, tied_names


class DeepSpeed(Backend):
    name = "DeepSpeed"

    def __init__(self, accelerator, cfg):
        super().__init__(accelerator, cfg)
        if cfg.train.fsdp:
            raise ConfigError("train.fsdp=true and a DeepSpeed launch: choose one "
                              "(configs/accelerate/fsdp.yaml or a DeepSpeed one)")
        self.ds = accelerator.state.deepspeed_plugin.deepspeed_config
        configure(accelerator.state.deepspeed_plugin, cfg, accelerator.num_processes)
        self.collective = zero_stage(self.ds) == 3

    def prepare_model(self, student: torch.nn.Module) -> torch.nn.Module:
        check_student(self.ds, student)
        return student

    def build_optimizer(self, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                        weight_decay: float, implementation: str = "auto") -> torch.optim.Optimizer:
        """With the optimizer state offloaded to the CPU, DeepSpeed's CPU AdamW (the same update,
        vectorised on the CPU; compiled by DeepSpeed on first use), which it requires there.
        Otherwise torch's AdamW, with torch's default kernel under auto: DeepSpeed's engine steps
        it on its own flat partitions, where the fused kernel is not what it tests."""
        if offload_device(self.ds, "offload_optimizer") == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiles DeepSpeed's CPU op: only when asked for

            return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)
        return super().build_optimizer(params, lr, betas, weight_decay,
                                       "default" if implementation == "auto" else implementation)

    def shard_teacher(self, teacher) -> None:
        raise ConfigError("train.fsdp_teacher=true is not supported under DeepSpeed; launch with ddp.yaml or fsdp.yaml")

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, last: bool):
        model.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)  # already divided by the micro-batch count

    def optimizer_step(self, model: torch.nn.Module, optimizer, clip: float) -> float:
        model.set_gradient_accumulation_boundary(True)
        model.step()  # clips (gradient_clipping), steps and zeroes; skips a step whose gradient norm is not finite
        if not model.was_step_applied():  # its norm is then not computed: the last one would be reported
            return math.nan
        norm = model.get_global_grad_norm()
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def export_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Copies of DeepSpeed's flat buffers (ZeRO-3: gathered, every rank takes part)."""
        return gather.untied_copies(model, keep=self.main)

    def state(self, directory: Path, model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], None]:
        """Each rank writes its own optimizer partition."""
        weights = gather.untied_copies(model, keep=self.main)
        save_optimizer(directory, optimizer, self.rank)
        return weights, None

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer, optimizer_state: dict | None) -> None:
        if partitioned(model):
            load_partitioned(model, directory / "student.safetensors", self.rank)
        else:
            load_weights(model, directory / "student.safetensors")
        load_optimizer(directory, optimizer, self.rank, self.world_size)


def configure(plugin, cfg, num_processes: int) -> None:
    """Check what the accelerate config asks of DeepSpeed (`plugin`: accelerate's DeepSpeedPlugin),
    and write mmdistill's batch, accumulation and clipping into its config (before
    `accelerator.prepare` builds the engine). Models are built whole and partitioned by the
    engine: self-teachers and the initial student are copies of the whole student, and the
    frozen teacher is never partitioned."""
    ds = plugin.deepspeed_config
    stage = zero_stage(ds)
    if stage not in (1, 2, 3):
        raise ConfigError(f"accelerate config zero_stage={stage}: " + (
            "stage 0 shards nothing; use configs/accelerate/ddp.yaml" if stage == 0 else "unknown stage")
            + ", or zero_stage 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        device = offload_device(ds, key)
        if device not in ("none", "cpu"):
            raise ConfigError(f"accelerate config {key}_device={device}: mmdistill offloads to the CPU only; "
                              "set it to cpu or none")
        if key == "offload_param" and device == "cpu" and stage != 3:
            raise ConfigError("accelerate config offload_param_device=cpu: parameters are offloaded at "
                              f"zero_stage 3 only (this config has {stage}); set it to none or use stage 3")
    if (ds.get("fp16") or {}).get("enabled") in (True, "true"):
        raise ConfigError("accelerate config mixed_precision=fp16: fp16 (loss scaling) is not supported under "
                          "DeepSpeed; use bf16 or no")
    if plugin.zero3_init_flag:
        raise ConfigError("accelerate config zero3_init_flag=true: mmdistill builds its models whole (the teacher is "
                          "never partitioned, self-teachers copy the student); set it to false")
    # accelerate registers the config with transformers even without zero3_init_flag; at stage 3
    # every model built afterwards (the teacher too) would then be born partitioned.
    unset_hf_deepspeed_config()
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * num_processes
    ds["gradient_clipping"] = float(cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else 0.0
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW, built by mmdistill
    ds["steps_per_print"] = 2**31 - 1  # our logging, not DeepSpeed's


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def offload_device(ds: dict, key: str) -> str:
    """"none", "cpu" or "nvme": where DeepSpeed keeps the optimizer state ("offload_optimizer")
    or the parameters ("offload_param")."""
    device = str(((ds.get("zero_optimization") or {}).get(key) or {}).get("device", "none")).lower()
    return "none" if device == "null" else device


def check_student(ds: dict, student: torch.nn.Module) -> None:
    if zero_stage(ds) == 3 and not isinstance(student, PreTrainedModel):
        raise ConfigError(f"accelerate config zero_stage=3: a {type(student).__name__} student cannot be partitioned "
                          "(its generate reads weights outside forward); use zero_stage 1 or 2 for composite VLMs")


def load_partitioned(model, file: Path, rank: int) -> None:
    """ZeRO-3: one parameter at a time, rank 0 reading it from the file and DeepSpeed
    partitioning it back, so no rank holds the whole model. Names and shapes are checked on
    every rank first (an error on one rank alone would leave the others waiting)."""
    tied = tied_names(model)
    with safe_open(str(file), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        state = {n: tuple(getattr(t, "ds_shape", t.shape))
                 for n, t in model.state_dict(keep_vars=True).items() if n not in tied}
        missing, unexpected = state.keys() - shapes.keys(), shapes.keys() - state.keys()
        wrong = sorted(n for n in state.keys() & shapes.keys() if state[n] != shapes[n])
        if missing or unexpected or wrong:
            raise ValueError(f"checkpoint {file}: weights do not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}, other shapes {wrong[:3]})")
        with torch.no_grad():
            for n, t in gather.state_items(model, skip=tied, modify=True):
                if rank == 0 or not hasattr(t, "ds_id"):  # a buffer is every rank's own
                    t.copy_(f.get_tensor(n))


def _optimizer_file(path: Path, rank: int) -> Path:
    return Path(path) / f"zero_optimizer_rank_{rank:05d}.pt"


def _zero_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer


def save_optimizer(directory: Path, optimizer, rank: int) -> None:
    torch.save(_zero_optimizer(optimizer).state_dict(), _optimizer_file(directory, rank))


def _safe_globals() -> list:
    """The DeepSpeed classes a ZeRO optimizer state holds: allowed by name, so the file still
    loads with torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_optimizer(directory: Path, optimizer, rank: int, world_size: int) -> None:
    """This rank's partition, restored with its float32 master weights (exact resume). The
    partitions depend on the process count, so it must be the one that wrote them."""
    saved = sorted(Path(directory).glob("zero_optimizer_rank_*.pt"))
    if len(saved) != world_size:
        raise ValueError(f"checkpoint {directory}: its DeepSpeed optimizer state was written by {len(saved)} "
                         f"process(es), this run has {world_size}; resume with the same number")
    with torch.serialization.safe_globals(_safe_globals()):
        mine = torch.load(_optimizer_file(directory, rank), weights_only=True)
    states = [None] * world_size  # DeepSpeed reads its own rank's entry of the list
    states[rank] = mine
    _zero_optimizer(optimizer).load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
