"""Everything a run holds, built once before its first step: the method, the student (prepared
by the distributed backend), the teacher and the frozen initial student its views need, the
adapter, the data stream, the optimizer and schedule; resumed from a checkpoint when asked.

Before the run directory is made or any model loads: the preflight (preflight.py), the
checkpoint to resume from (checked file by file), and a resumed run's config against the one
it continues (a change is refused unless train.resume_changed=true)."""
from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from transformers import get_cosine_schedule_with_warmup

from mmdistill.adapters import TextAdapter, build_adapter
from mmdistill.config import ConfigError, config_changes, method_options, save_config
from mmdistill.core.views import VIEW_SPEC
from mmdistill.data.sources import load_split, skipped_line
from mmdistill.data.stream import StagedStream, stages_of
from mmdistill.distributed import Backend
from mmdistill.methods.registry import Method, build_method
from mmdistill.models.loading import check_same_vocab, load, max_positions, set_checkpointing, tokenizer_of
from mmdistill.models.lora import add_lora
from mmdistill.models.served import served_teacher
from mmdistill.models.teachers import Teacher, init_policy
from mmdistill.models.weights import is_sharded
from mmdistill.training.checkpoint import list_checkpoints, load_checkpoint, resume_point
from mmdistill.training.logs import RolloutLog
from mmdistill.training.preflight import preflight


@dataclass
class Run:
    cfg: DictConfig
    accelerator: object
    backend: Backend
    run_dir: Path
    method: Method
    student: torch.nn.Module  # as the backend prepared it: gradients flow (and sync) through it
    plain: torch.nn.Module  # the bare student: generation, saving and the EMA read it
    proc: object  # the student's tokenizer or processor
    teacher: Teacher | None
    init: torch.nn.Module | None  # the initial student, frozen (views student_init, student_init_priv)
    adapter: TextAdapter
    stages: list
    stream: StagedStream
    test: list[dict]
    optimizer: torch.optim.Optimizer
    scheduler: object
    start: int = 0  # the step a resumed run continues after
    summary: dict = field(default_factory=dict)
    rollouts: RolloutLog | None = None  # rollout samples written as the run goes
    test_skipped: int = 0  # bad held-out samples skipped under data.on_bad_sample=skip
    record: dict = field(default_factory=dict)  # what a resumed run carries over (accuracy_before), in its checkpoints
    init_scope: Callable[[], AbstractContextManager] = nullcontext  # what `init`'s forwards run under (LoRA)

    @property
    def total(self) -> int:
        return self.stream.ends[-1]

    def checkpointed(self) -> dict:
        """What a checkpoint holds (save_checkpoint's and load_checkpoint's keyword arguments)."""
        return dict(student=self.student, optimizer=self.optimizer, scheduler=self.scheduler, teacher=self.teacher,
                    stream=self.stream, backend=self.backend, record=self.record)


def build(cfg: DictConfig, accelerator, backend: Backend) -> Run:
    preflight(cfg)  # paths, tokenizers, templates, the first samples: seconds, before any model or the run directory
    resume_from = resume_point(cfg.train.resume, Path(cfg.train.output_dir), backend)
    run_dir = _prepare_run_dir(cfg, accelerator.is_main_process, resume_from)
    # ranks sample differently; weights start equal (seeded init, DDP broadcast)
    set_seed(cfg.train.seed, device_specific=True)
    accelerator.wait_for_everyone()
    method = build_method(cfg.method.name, **method_options(cfg))
    if getattr(method, "caveat", None) and accelerator.is_main_process:
        print(f"mmdistill: {method.caveat}", file=sys.stderr, flush=True)
    student, proc = load(cfg.student, seed=cfg.train.seed)
    if cfg.student.lora.enabled:
        add_lora(student, cfg.student.lora)
    if cfg.train.gradient_checkpointing:
        set_checkpointing(student, True)
    student = student.to(accelerator.device)
    student.train()
    teacher, teacher_proc = _build_teacher(cfg, method, student, proc, accelerator.device)  # copies the whole student
    # The initial student, frozen (views student_init, student_init_priv): built before any
    # checkpoint is loaded; a frozen_student teacher already is one, a LoRA student without its adapters too.
    init, init_scope = None, nullcontext
    if any(VIEW_SPEC[v][0] == "student_init" for v in method.views):
        init, init_scope = init_policy(student, teacher)
    student = backend.prepare_model(student)
    if cfg.train.fsdp_teacher and teacher is not None:
        backend.shard_teacher(teacher)
    limits = [cfg.train.max_length] if cfg.train.max_length else []
    limits += [max_positions(m) for m in (student, teacher and teacher.model)
               if isinstance(m, torch.nn.Module) and max_positions(m)]
    adapter = build_adapter(proc, cfg.privileged, min(limits) if limits else 0, teacher_proc)
    stages = stages_of(cfg)
    stream = StagedStream(stages, cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                          accelerator.num_processes)
    test_stats: dict = {"bad": 0, "errors": []}
    test = load_split(cfg.data, "test", test_stats)[: cfg.eval.num_samples] if cfg.eval.num_samples else []
    warning = skipped_line(test_stats, f"held-out split {cfg.data.test_path}")
    if warning:
        accelerator.print(warning)
    optimizer = backend.build_optimizer([p for p in student.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                        betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
                                        implementation=cfg.optim.implementation)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.optim.warmup_ratio * stream.ends[-1]),
                                                stream.ends[-1])
    # The frozen teacher is never wrapped: it stays in eval mode, whole on every device unless
    # train.fsdp_teacher sharded it above. The scheduler steps once per optimizer step, by us.
    student, optimizer = backend.prepare(student, optimizer)
    run = Run(cfg, accelerator, backend, run_dir, method, student, accelerator.unwrap_model(student), proc, teacher,
              init, adapter, stages, stream, test, optimizer, scheduler, test_skipped=test_stats["bad"],
              init_scope=init_scope)
    if resume_from is not None:
        run.start = load_checkpoint(resume_from, **run.checkpointed(), checked=True)
        accelerator.print(f"resumed from {resume_from} at step {run.start}")
    run.summary = {"method": cfg.method.name, "run_dir": str(run_dir), "processes": accelerator.num_processes,
                   "distributed": accelerator.distributed_type.value, "fsdp": cfg.train.fsdp,
                   "fsdp_teacher": bool(teacher is not None and is_sharded(teacher.model)),
                   "mixed_precision": accelerator.mixed_precision,
                   "tf32": torch.get_float32_matmul_precision() != "highest"}
    if run.test_skipped:
        run.summary["test_bad_samples"] = run.test_skipped
    return run


def _prepare_run_dir(cfg: DictConfig, main: bool, resume_from: Path | None) -> Path:
    """The run directory and its config: config.yaml is the first run's; a resume whose config
    differs (beyond train.resume) is saved beside it as config.resume-N.yaml, and one that
    differs in a key that changes what is trained is refused unless train.resume_changed=true."""
    run_dir = Path(cfg.train.output_dir)
    if cfg.train.resume == "none" and list_checkpoints(run_dir):
        raise FileExistsError(
            f"train.output_dir '{run_dir}' already holds checkpoints; set train.resume=auto to continue it "
            "or choose another train.output_dir"
        )
    first = run_dir / "config.yaml"
    before = first if first.is_file() else (resume_from.parent.parent / "config.yaml" if resume_from else None)
    changed, refused = [], []
    if resume_from is not None and before is not None and before.is_file():
        changed, refused = config_changes(before, cfg)
        if refused and not cfg.train.resume_changed:
            shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
            raise ConfigError(f"train.resume: the config differs from {before} in {shown}; set "
                              f"train.resume_changed=true to continue {resume_from.name} with it anyway "
                              f"({first.name} keeps the first config)")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not first.is_file() or resume_from is None:
            save_config(cfg, first)
        elif changed:
            n = 1
            while (run_dir / f"config.resume-{n}.yaml").exists():
                n += 1
            save_config(cfg, run_dir / f"config.resume-{n}.yaml")
    return run_dir


def _build_teacher(cfg: DictConfig, method, student, proc, device) -> tuple[Teacher | None, object]:
    """The teacher and its tokenizer/processor (a self-teacher renders prompts as the student)."""
    if not any(VIEW_SPEC[v][0] == "teacher" for v in method.views):
        return None, None
    model, t_proc = None, None
    if cfg.teacher.mode == "served":
        return Teacher("served", student, served=served_teacher(cfg.teacher.server, tokenizer_of(proc))), None
    if cfg.teacher.mode == "model":
        model, t_proc = load(cfg.teacher.model, seed=cfg.train.seed + 1)
        check_same_vocab(tokenizer_of(proc), tokenizer_of(t_proc), f"teacher.model.path={cfg.teacher.model.path}")
        model = model.to(device)
    return Teacher(cfg.teacher.mode, student, model, cfg.teacher.ema_decay), t_proc
