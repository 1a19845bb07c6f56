"""The training recipe: one loop for every method.

A step: sample responses (student rollouts, or oracle responses for off-policy methods), let
the method read the views it names, back-propagate into the student, step the optimizer, move
the self-teacher. Nothing here knows which method or modality is running.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from mmdistill import zero
from mmdistill.adapters import build_adapter
from mmdistill.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mmdistill.config import ConfigError, method_options, save_config
from mmdistill.data import StagedStream, load_split, stages_of
from mmdistill.evaluate import accuracy
from mmdistill.methods import build_method
from mmdistill.metrics import MetricsLogger, RolloutLog
from mmdistill.models import check_same_vocab, load, max_positions, set_checkpointing, tokenizer_of
from mmdistill.sharding import (collective, full_state_dict, is_sharded, launcher_fsdp, shard, tied_names, untied_state_dict,
                                whole_items)
from mmdistill.stopping import SignalStop, Stopped, stop_if_not_finite, stopped_by
from mmdistill.teachers import Teacher, frozen_copy
from mmdistill.views import VIEW_SPEC, Views


def _prepare_run_dir(cfg: DictConfig, main: bool) -> Path:
    run_dir = Path(cfg.train.output_dir)
    if cfg.train.resume == "none" and list_checkpoints(run_dir):
        raise FileExistsError(
            f"train.output_dir '{run_dir}' already holds checkpoints; set train.resume=auto to continue it "
            "or choose another train.output_dir"
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def _build_teacher(cfg: DictConfig, method, student, proc, device) -> tuple[Teacher | None, object]:
    """The teacher and its tokenizer/processor (a self-teacher renders prompts as the student)."""
    if not any(VIEW_SPEC[v][0] == "teacher" for v in method.views):
        return None, None
    model, t_proc = None, None
    if cfg.teacher.mode == "model":
        model, t_proc = load(cfg.teacher.model, seed=cfg.train.seed + 1)
        check_same_vocab(tokenizer_of(proc), tokenizer_of(t_proc), f"teacher.model.path={cfg.teacher.model.path}")
        model = model.to(device)
    return Teacher(cfg.teacher.mode, student, model, cfg.teacher.ema_decay), t_proc


def _check_teacher_sharding(teacher: Teacher, accelerator) -> None:
    if teacher.mode != "model":
        raise ConfigError(f"train.fsdp_teacher=true shards a separate teacher model; teacher.mode={teacher.mode} "
                          "is a copy of the student (shard the student with train.fsdp instead)")
    if accelerator.num_processes < 2:
        raise ConfigError("train.fsdp_teacher=true shards the teacher across processes: launch 2 or more")
    if zero.uses_deepspeed(accelerator):
        raise ConfigError("train.fsdp_teacher=true is not supported under DeepSpeed; launch with ddp.yaml or fsdp.yaml")


def _resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(cfg.train.resume)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint directory")
    return path


def draw_on_policy(method) -> bool:
    """Rollouts or oracle responses for this micro-batch. Methods that mix the two (GKD's
    lambda) declare `on_policy_fraction`; the draw uses the checkpointed Python RNG."""
    fraction = getattr(method, "on_policy_fraction", 1.0 if method.on_policy else 0.0)
    return fraction >= 1.0 or (fraction > 0.0 and random.random() < fraction)


def train(cfg: DictConfig) -> Path:
    hf_logging.disable_progress_bar()  # one progress bar: ours
    from_file = launcher_fsdp(os.environ)
    if from_file is not None:  # an accelerate FSDP config file: mmdistill's own FSDP2 takes it over
        os.environ["ACCELERATE_USE_FSDP"] = "false"  # accelerate sets up plain data-parallel processes
        cfg.train.fsdp = True
        cfg.train.fsdp_reshard_after_forward = from_file["reshard_after_forward"]
        cfg.train.gradient_checkpointing = cfg.train.gradient_checkpointing or from_file["gradient_checkpointing"]
    # Without an accelerator device, processes started by `accelerate launch`/torchrun train
    # data-parallel on the CPU (gloo) instead of each believing it is alone.
    options = zero.accelerator_options(zero.launched(os.environ))
    if options.get("cpu"):  # accelerate imports an installed deepspeed anyway, whose device probe would warn on every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a user's own choice is kept; DeepSpeed runs still probe
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, **options)
    if accelerator.distributed_type == DistributedType.FSDP:  # launched some other way
        raise NotImplementedError("FSDP: accelerate's own wrapping is not used; launch with "
                                  "configs/accelerate/fsdp.yaml or set train.fsdp=true")
    if zero.uses_deepspeed(accelerator):
        if cfg.train.fsdp:
            raise ConfigError("train.fsdp=true and a DeepSpeed launch: choose one (configs/accelerate/fsdp.yaml or a DeepSpeed one)")
        zero.configure(accelerator.state.deepspeed_plugin, cfg, accelerator.num_processes)
    if cfg.train.fsdp and accelerator.num_processes < 2:
        raise ValueError("train.fsdp=true shards the student across processes: launch 2 or more "
                         "(accelerate launch --num_processes N -m mmdistill train ...)")
    failed = None
    try:
        with SignalStop() as stop:
            run_dir = _run(cfg, accelerator, stop)
    except (FloatingPointError, Stopped) as exc:  # every rank stops at the same step (stopping.py)
        failed = exc.with_traceback(None)  # the traceback would keep the models alive
    # Models, optimizers and their process-group work go before the process group does: freed
    # later, at interpreter exit, gloo's threads could still hold tensors and abort the process.
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if failed is not None:
        raise failed
    return run_dir


def _run(cfg: DictConfig, accelerator, stop: SignalStop) -> Path:
    """The run itself; what it builds is freed when it returns (see train)."""
    set_seed(cfg.train.seed, device_specific=True)  # ranks sample differently; weights start equal (seeded init, DDP broadcast)
    run_dir = _prepare_run_dir(cfg, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    method = build_method(cfg.method.name, **method_options(cfg))

    student, proc = load(cfg.student, seed=cfg.train.seed)
    if zero.uses_deepspeed(accelerator):
        zero.check_student(accelerator.state.deepspeed_plugin.deepspeed_config, student)
    if cfg.train.gradient_checkpointing:
        set_checkpointing(student, True)
    student = student.to(accelerator.device)
    student.train()
    teacher, teacher_proc = _build_teacher(cfg, method, student, proc, accelerator.device)  # copies the whole student
    # The initial student, frozen (view student_init_priv): built before any checkpoint is loaded;
    # a frozen_student teacher already is one.
    init = None
    if "student_init_priv" in method.views:
        init = teacher.model if teacher is not None and teacher.mode == "frozen_student" else frozen_copy(student)
    if cfg.train.fsdp:
        student = shard(student, accelerator.mixed_precision, cfg.train.fsdp_reshard_after_forward)
    if cfg.train.fsdp_teacher and teacher is not None:
        _check_teacher_sharding(teacher, accelerator)
        shard(teacher.model, accelerator.mixed_precision)  # in place: each rank keeps 1/N of it
    limits = [cfg.train.max_length] if cfg.train.max_length else []
    limits += [max_positions(m) for m in (student, teacher and teacher.model) if m is not None and max_positions(m)]
    adapter = build_adapter(proc, cfg.privileged, min(limits) if limits else 0, teacher_proc)

    stages = stages_of(cfg)
    stream = StagedStream(stages, cfg.train.batch_size, cfg.train.seed, accelerator.process_index, accelerator.num_processes)
    total = stream.ends[-1]
    test = load_split(cfg.data, "test")[: cfg.eval.num_samples] if cfg.eval.num_samples else []
    optimizer = zero.build_optimizer(accelerator, [p for p in student.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                     betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.optim.warmup_ratio * total), total)
    # The student is wrapped for gradient sync (DDP, or DeepSpeed's engine) or sharded (FSDP2,
    # which syncs itself); the frozen teacher never is wrapped: it stays in eval mode, whole on
    # every device unless train.fsdp_teacher sharded it above. The scheduler steps once per
    # optimizer step, by us.
    if cfg.train.fsdp:
        optimizer = accelerator.prepare(optimizer)
    else:
        student, optimizer = accelerator.prepare(student, optimizer)
    plain = accelerator.unwrap_model(student)  # generation, saving and the EMA read the bare model
    state = dict(student=student, optimizer=optimizer, scheduler=scheduler, teacher=teacher, stream=stream, accelerator=accelerator)

    start = 0
    resume_from = _resume_path(cfg, run_dir)
    if resume_from is not None:
        start = load_checkpoint(resume_from, **state)
        accelerator.print(f"resumed from {resume_from} at step {start}")

    summary: dict = {"method": cfg.method.name, "run_dir": str(run_dir), "processes": accelerator.num_processes,
                     "distributed": accelerator.distributed_type.value, "fsdp": cfg.train.fsdp,
                     "fsdp_teacher": bool(teacher is not None and is_sharded(teacher.model)),
                     "mixed_precision": accelerator.mixed_precision}
    if test and start == 0:
        summary["accuracy_before"] = _evaluate(accelerator, adapter, plain, test, cfg)
        accelerator.print(f"held-out accuracy before: {summary['accuracy_before']:.3f} ({len(test)} samples)")
    continual = Continual(run_dir, stages, cfg, accelerator) if len(stages) > 1 else None
    if continual and start == 0:
        continual.baseline = continual.scores(adapter, plain)
        continual.R = []

    logger = MetricsLogger(run_dir, start) if accelerator.is_main_process else None
    rollouts = RolloutLog(run_dir, accelerator.process_index, start, cfg.train.sample_every, adapter)
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.method.name}",
               disable=not (cfg.train.progress and accelerator.is_local_main_process))
    step, saved, stopped = start, False, 0
    for step in range(start + 1, total + 1):
        stream.enter(stream.stage_of(step))
        t0 = time.perf_counter()
        parts: dict[str, float] = {}
        timing: dict[str, float] = {}
        tokens, lengths = 0, []
        micro_batches = []  # fetched first, so the last micro-batch is known: it syncs the gradients
        for _ in range(cfg.train.grad_accum):
            try:
                micro_batches.append(stream.next())
            except StopIteration:  # data.epochs passes are done
                break
        for i, samples in enumerate(micro_batches):
            with timed(timing, "time_rollout"):
                batch = adapter.rollout(plain, samples, cfg.rollout) if draw_on_policy(method) else adapter.oracle_batch(samples)
            rollouts.log(step, batch)
            with zero.micro_batch(accelerator, student, last=i == len(micro_batches) - 1):
                views = Views(adapter, batch, student, teacher.model if teacher else None, method.views, cfg.train.share_prefix,
                              init=init)
                with timed(timing, "time_loss"):
                    loss, metrics = method.loss(views, batch)
                stop_if_not_finite(accelerator, step, loss, run_dir)
                with timed(timing, "time_backward"):
                    zero.backward(accelerator, student, loss / len(micro_batches))
            for name, seconds in views.seconds.items():
                timing[f"time_view_{name}"] = timing.get(f"time_view_{name}", 0.0) + seconds
            timing["time_loss"] -= sum(views.seconds.values())  # the loss proper, without the views' forwards
            for k, v in metrics.items():
                parts[k] = parts.get(k, 0.0) + v / len(micro_batches)
            tokens += batch.num_tokens
            lengths += batch.response_mask.sum(1).tolist()
        if not micro_batches:
            step -= 1
            accelerator.print(f"data exhausted after {cfg.data.epochs} epoch(s); stopping at step {step}")
            break
        with timed(timing, "time_optimizer"):
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            lr = scheduler.get_last_lr()[0]
            grad_norm = zero.optimizer_step(accelerator, student, optimizer, clip)
            scheduler.step()
            if teacher is not None:
                teacher.update(plain)

        seconds = time.perf_counter() - t0
        # Loss parts are averaged over ranks; tokens and lengths summed.
        parts = dict(zip(parts, accelerator.reduce(torch.tensor(list(parts.values()), device=accelerator.device), "mean").tolist()))
        tokens, n_seq, len_sum = accelerator.reduce(torch.tensor([tokens, len(lengths), sum(lengths)], device=accelerator.device), "sum").tolist()
        row = {
            **parts,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(tokens),
            "tokens_per_s": tokens / seconds,
            "rollout_len": len_sum / n_seq,
            "step_s": seconds,
            **timing,
        }
        row["data_bad_samples"] = int(accelerator.reduce(torch.tensor(stream.bad_samples, device=accelerator.device), "sum"))
        if logger and (step % cfg.train.log_every == 0 or step == total):
            logger.log(step, row)
        bar.set_postfix(loss=f"{parts['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if continual and step == stream.ends[stream.index]:  # a stage ends: score every stage's test split
            continual.set_row(stream.index, continual.scores(adapter, plain))
        saved = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0
        if saved:
            save_checkpoint(run_dir, step, **state, keep=cfg.train.keep_checkpoints)
        stopped = stop.agreed(accelerator)  # a scheduler's signal on any rank: checkpoint this step, then exit
        if stopped:
            break
    bar.close()
    rollouts.close()
    if logger:
        logger.close()

    if step > start and not saved and cfg.train.keep_checkpoints:  # the last step's checkpoint, unless just written
        save_checkpoint(run_dir, step, **state, keep=cfg.train.keep_checkpoints)
    if stopped:  # as agreed in the loop: a signal after it changes nothing, on any rank
        raise stopped_by(stopped, step, run_dir)
    final = run_dir / "student"
    weights = None  # save_pretrained's own
    if is_sharded(plain):  # gathered: every rank takes part
        weights = full_state_dict(plain)
    elif zero.uses_deepspeed(accelerator):  # copies of DeepSpeed's flat buffers (ZeRO-3: every rank takes part)
        weights = untied_state_dict(plain, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_pretrained(plain, final, weights)
        proc.save_pretrained(final)
    summary["replica_checksums"] = gather_object([weights_checksum(plain)])
    if test:
        summary["accuracy_after"] = _evaluate(accelerator, adapter, plain, test, cfg)
        accelerator.print(f"held-out accuracy after:  {summary['accuracy_after']:.3f} ({len(test)} samples)")
    summary["steps"] = step
    if continual:
        summary["continual"] = continual.finish()
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.print(f"student saved to {final}")
    accelerator.wait_for_everyone()
    return run_dir


def _evaluate(accelerator, adapter, model, test: list[dict], cfg: DictConfig) -> float:
    """Held-out accuracy on the main process (the replicas hold the same weights); a sharded
    model's forward needs every rank (FSDP, ZeRO-3), so then all of them score the same samples."""
    scores = accelerator.is_main_process or collective(model)
    result = [accuracy(adapter, model, test, cfg.eval.batch_size, cfg.eval.max_new_tokens)] if scores else [None]
    return broadcast_object_list(result)[0]


def save_pretrained(model: torch.nn.Module, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """The student as a loadable model directory; `weights`: a sharded model's gathered ones,
    or a DeepSpeed student's copies."""
    if weights is None:
        model.save_pretrained(directory)
        return
    tied = tied_names(model)
    model.save_pretrained(directory, state_dict={k: v for k, v in weights.items() if k not in tied})
    config = json.loads((directory / "config.json").read_text())  # FSDP2 renames the class to FSDP<Name>
    config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextmanager
def timed(into: dict[str, float], key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - t0


def weights_checksum(model: torch.nn.Module) -> str:
    """A digest of the weights: equal across ranks when data-parallel training keeps them in sync
    (a sharded model's are gathered one entry at a time, so every rank digests the same whole weights)."""
    digest = hashlib.sha256()
    for name, tensor in whole_items(model):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Continual:
    """The continual-learning record: baseline[j] (before training) and R[i][j], the accuracy on
    stage j's test split after training stage i, kept in continual.json as it grows so a resumed
    run keeps the rows of the stages it finished."""

    def __init__(self, run_dir: Path, stages, cfg: DictConfig, accelerator):
        self.path, self.cfg, self.accelerator = run_dir / "continual.json", cfg, accelerator
        n = cfg.eval.num_samples or None
        self.names = [name for name, _, _ in stages]
        self.tests = [load_split(data, "test")[:n] for _, _, data in stages]
        for name, test in zip(self.names, self.tests):
            if not test:
                raise ValueError(f"continual stage '{name}' has no test samples (set its test_path or select)")
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.baseline, self.R = saved.get("baseline"), saved.get("R", [])

    def scores(self, adapter, model) -> list[float]:
        return [_evaluate(self.accelerator, adapter, model, test, self.cfg) for test in self.tests]

    def set_row(self, stage: int, row: list[float]) -> None:
        self.R = self.R[:stage] + [row]  # a stage re-run after a resume replaces its row
        self._write()

    def _write(self) -> None:
        if self.accelerator.is_main_process:
            data = {"stages": self.names, "baseline": self.baseline, "R": self.R}
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.path)

    def finish(self) -> dict:
        """ACC, BWT, FWT (report.continual_metrics), with continual.md and the heatmap."""
        from mmdistill.report import continual_metrics, write_continual

        data = {"stages": self.names, "baseline": self.baseline, "R": self.R}
        if self.accelerator.is_main_process:
            write_continual(data, self.path.parent)
        return {**data, **continual_metrics(self.R, self.baseline)}
