"""A check any user can run on their own models: with the teacher equal to the student and no
privileged information, every distillation method must give zero loss and zero gradient.
A method that does not is mis-aligned (views shifted, padding read, a wrong sign)."""
from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from mmdistill.adapters import build_adapter
from mmdistill.adapters.scoring import Views
from mmdistill.data.sources import load_split
from mmdistill.methods.registry import METHODS, build_method
from mmdistill.models.loading import load, max_positions
from mmdistill.models.teachers import Teacher

# Options worth checking separately: each estimator is its own code path.
VARIANTS: dict[str, list[dict]] = {"opd": [{"estimator": e} for e in ("full", "topk", "sampled")]}


def selfcheck(cfg: DictConfig, teacher_model: torch.nn.Module | None = None) -> list[tuple[str, float, float]]:
    """(method, |loss|, max |grad|) for every method with a teacher; SFT has none to match.

    teacher_model replaces the frozen copy (tests use it to show the check can fail)."""
    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.train.seed)
    student, proc = load(cfg.student, seed=cfg.train.seed)
    teacher = teacher_model if teacher_model is not None else Teacher("frozen_student", student).model
    # No privileged information: p is empty (whatever privileged.text adds around the fields) and
    # privileged images are the student's own (no boxes to draw, no teacher images).
    adapter = build_adapter(proc, OmegaConf.merge(cfg.privileged, {"text": ""}), max_positions(student))
    samples = [{**{k: v for k, v in s.items() if k != "teacher_images"}, "boxes": []}
               for s in load_split(cfg.data, "train")[: cfg.train.batch_size]]
    batch = adapter.rollout(student, samples, cfg.rollout)
    rows = []
    for name in METHODS:
        for options in VARIANTS.get(name, [{}]):
            method = build_method(name, chunk_size=cfg.method.chunk_size, **options)
            if not method.on_policy:
                continue
            student.zero_grad(set_to_none=True)
            loss, _ = method.loss(Views(adapter, batch, student, teacher, method.views), batch)
            loss.backward()
            grad = max((p.grad.abs().max().item() for p in student.parameters() if p.grad is not None), default=0.0)
            label = "/".join([name, *map(str, options.values())])
            rows.append((label, abs(loss.item()), grad))
    return rows


def main(cfg: DictConfig, tol: float = 1e-5) -> int:
    rows = selfcheck(cfg)
    print(f"{'method':<18}{'|loss|':>12}{'max|grad|':>12}  verdict")
    bad = 0
    for name, loss, grad in rows:
        ok = loss <= tol and grad <= tol
        bad += not ok
        print(f"{name:<18}{loss:>12.2e}{grad:>12.2e}  {'ok' if ok else 'FAIL'}")
    print("selfcheck passed" if not bad else f"selfcheck FAILED for {bad} method(s)",
          file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0
