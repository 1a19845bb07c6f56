"""The trained student as a loadable model directory, and a digest that shows every replica
ended with the same weights."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mmdistill.models.weights import tied_names
from mmdistill.training.checkpoint import newest_line, not_finite
from mmdistill.training.setup import Run


def save_student(run: Run, step: int) -> Path:
    """RUN_DIR/student, written by the main process (every rank takes part in gathering a sharded
    student's weights). Weights that are not finite are never saved: FloatingPointError on
    every rank instead."""
    final = run.run_dir / "student"
    weights = run.backend.export_weights(run.plain)
    if weights is None:  # the model's own, whole on every rank
        bad = not_finite(dict(run.plain.state_dict()))
    else:  # gathered by the backend, on the main process
        bad = not_finite(weights) if run.backend.main else None
    bad = next((found for found in run.backend.gather_objects(bad) if found), None)
    if bad:
        raise FloatingPointError(f"after step {step}: the student's weights are not finite ({bad}); the student "
                                 f"was not saved; {newest_line(run.run_dir)}")
    if run.accelerator.is_main_process:
        save_pretrained(run.plain, final, weights)
        run.proc.save_pretrained(final)
    return final


def save_pretrained(model: torch.nn.Module, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """`weights`: a sharded model's gathered ones, or a DeepSpeed student's copies; None: the
    model's own."""
    if weights is None:
        model.save_pretrained(directory)
        return
    tied = tied_names(model)
    model.save_pretrained(directory, state_dict={k: v for k, v in weights.items() if k not in tied})
    config = json.loads((directory / "config.json").read_text())  # FSDP2 renames the class to FSDP<Name>
    config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def weights_checksum(items) -> str:
    """A digest of (name, whole tensor) pairs (Backend.whole_items): equal across ranks when
    data-parallel training keeps them in sync."""
    digest = hashlib.sha256()
    for name, tensor in items:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
