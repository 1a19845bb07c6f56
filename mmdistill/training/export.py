"""The trained student as a loadable model directory, and a digest that shows every replica
ended with the same weights."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mmdistill.models.weights import tied_names
from mmdistill.training.setup import Run


def save_student(run: Run) -> Path:
    """RUN_DIR/student, written by the main process (every rank takes part in gathering a sharded
    student's weights)."""
    final = run.run_dir / "student"
    weights = run.backend.export_weights(run.plain)
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
