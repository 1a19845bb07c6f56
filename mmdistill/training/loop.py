"""The training recipe: one loop for every method, modality and distributed backend.

`train` builds the run (setup.py), resumes it if asked, and loops over `train_step` (step.py),
checkpointing as configured; then it saves the student and scores it. Nothing here knows which
method, modality or backend is running.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

from accelerate.utils import gather_object
from omegaconf import DictConfig
from transformers.utils import logging as hf_logging

from mmdistill.distributed import select
from mmdistill.distributed.launch import make_accelerator
from mmdistill.training.checkpoint import save_checkpoint
from mmdistill.training.continual import Continual, heldout_accuracy
from mmdistill.training.export import save_student, weights_checksum, write_card
from mmdistill.training.logs import Progress, RolloutLog
from mmdistill.training.setup import Run, build
from mmdistill.training.step import train_step
from mmdistill.training.stopping import SignalStop, Stopped, stopped_by


def train(cfg: DictConfig) -> Path:
    hf_logging.disable_progress_bar()  # one progress bar: ours
    accelerator = make_accelerator(cfg)
    backend = select(accelerator, cfg)  # launch settings it cannot honour fail here, before any model loads
    failed = None
    try:
        with SignalStop() as stop:
            run_dir = _run(cfg, accelerator, backend, stop)
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


def _run(cfg: DictConfig, accelerator, backend, stop: SignalStop) -> Path:
    """The run itself; what it builds is freed when it returns (see train)."""
    run = build(cfg, accelerator, backend)
    continual = _score_before(run)
    progress = Progress(run.run_dir, cfg, accelerator, run.start, run.total)
    run.rollouts = RolloutLog(run.run_dir, accelerator.process_index, run.start, cfg.train.sample_every, run.adapter)
    step, saved, stopped = run.start, False, 0
    for step in range(run.start + 1, run.total + 1):
        row = train_step(run, step, diagnose=progress.logs(step))
        if row is None:
            step -= 1
            accelerator.print(f"data exhausted after {cfg.data.epochs} epoch(s); stopping at step {step}")
            break
        if run.test and cfg.eval.every and step % cfg.eval.every == 0:  # held-out accuracy along the run
            row["accuracy"] = heldout_accuracy(accelerator, run.adapter, run.plain, run.test, cfg)
        progress.step(step, row)
        if continual and step == run.stream.ends[run.stream.index]:  # a stage ends: score every stage's test split
            continual.set_row(run.stream.index, continual.scores(run.adapter, run.plain))
        saved = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0
        if saved:
            save_checkpoint(run.run_dir, step, **run.checkpointed(), keep=cfg.train.keep_checkpoints)
        stopped = stop.agreed(accelerator)  # a scheduler's signal on any rank: checkpoint this step, then exit
        if stopped:
            break
    progress.close()
    run.rollouts.close()
    if step > run.start and not saved and cfg.train.keep_checkpoints:  # the last step's checkpoint, unless just written
        save_checkpoint(run.run_dir, step, **run.checkpointed(), keep=cfg.train.keep_checkpoints)
    if stopped:  # as agreed in the loop: a signal after it changes nothing, on any rank
        raise stopped_by(stopped, step, run.run_dir)
    _finish(run, step, continual)
    return run.run_dir


def _score_before(run: Run) -> Continual | None:
    """Held-out accuracy before training (a fresh run only), and the continual record."""
    if run.test and run.start == 0:
        run.record["accuracy_before"] = heldout_accuracy(run.accelerator, run.adapter, run.plain, run.test, run.cfg)
        before = run.record["accuracy_before"]
        run.accelerator.print(f"held-out accuracy before: {before:.3f} ({_counted(run)})")
    if "accuracy_before" in run.record:  # a resumed run's, from its checkpoint
        run.summary["accuracy_before"] = run.record["accuracy_before"]
    continual = Continual(run.run_dir, run.stages, run.cfg, run.accelerator) if len(run.stages) > 1 else None
    if continual and run.start == 0:
        continual.baseline = continual.scores(run.adapter, run.plain)
        continual.R = []
    return continual


def _counted(run: Run) -> str:
    """"3 samples", with the bad ones skipped when there were any: a score on fewer samples than
    the split holds must say so."""
    return f"{len(run.test)} samples" + (f", {run.test_skipped} bad skipped" if run.test_skipped else "")


def _finish(run: Run, step: int, continual: Continual | None) -> None:
    """The student saved, every replica's checksum, held-out accuracy after, summary.json."""
    final = save_student(run, step)
    run.summary["replica_checksums"] = gather_object([weights_checksum(run.backend.whole_items(run.plain))])
    if run.test:
        run.summary["accuracy_after"] = heldout_accuracy(run.accelerator, run.adapter, run.plain, run.test, run.cfg)
        run.accelerator.print(f"held-out accuracy after:  {run.summary['accuracy_after']:.3f} ({_counted(run)})")
    run.summary["steps"] = step
    if continual:
        run.summary["continual"] = continual.finish()
    if run.accelerator.is_main_process:
        (run.run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
        write_card(run, final)
    run.accelerator.print(f"student saved to {final}")
    run.accelerator.wait_for_everyone()
