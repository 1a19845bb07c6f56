"""Checkpoints written atomically: a directory becomes visible under its final name only
once everything in it is on disk, so a killed run never leaves a checkpoint that loads."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mmdistill.distributed import Backend, DataParallel
from mmdistill.models.weights import load_weights, untied_state_dict

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_file(path: Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.pt"


def save_checkpoint(run_dir: Path, step: int, *, student, optimizer, scheduler, teacher, stream, keep: int,
                    backend: Backend | None = None) -> Path:
    """Every rank writes its RNG states and data position (and its backend's own part) into the
    `.tmp` directory; the main process writes the shared state and renames it only after all
    ranks are done."""
    backend = backend or DataParallel()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if backend.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    weights, optim = backend.state(tmp, backend.unwrap(student), optimizer)
    if backend.main:
        save_file(weights, str(tmp / "student.safetensors"), metadata={"format": "pt"})
        if teacher is not None and teacher.owns_weights:
            save_file(untied_state_dict(teacher.model), str(tmp / "teacher.safetensors"), metadata={"format": "pt"})
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
    state = {"step": step, "rank": backend.rank, "data": stream.state_dict(), "rng": rng_state()}
    torch.save(state, _rank_file(tmp, backend.rank))
    backend.barrier()
    if backend.main:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp` leftovers of a killed run are not listed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def load_checkpoint(path: Path, *, student, optimizer, scheduler, teacher, stream,
                    backend: Backend | None = None) -> int:
    backend = backend or DataParallel()
    path = Path(path)
    rank_file = _rank_file(path, backend.rank)
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no state for rank {backend.rank} "
                                "(was it written by fewer processes?)")
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    backend.load_state(path, backend.unwrap(student), optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if teacher is not None and teacher.owns_weights:
        load_weights(teacher.model, path / "teacher.safetensors")
    mine = torch.load(rank_file, weights_only=True)
    stream.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])
    return int(state["step"])
