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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmdistill import zero
from mmdistill.sharding import (full_optimizer_state, full_state_dict, is_sharded, load_full_optimizer_state,
                                load_full_state_dict, tied_names, untied_state_dict)

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
                    accelerator=None) -> Path:
    """Every rank writes its RNG states and data position into the `.tmp` directory; the main
    process writes the shared state and renames it only after all ranks are done."""
    rank = accelerator.process_index if accelerator else 0
    main = rank == 0
    barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model = accelerator.unwrap_model(student) if accelerator else student
    sharded = is_sharded(model)
    deepspeed = accelerator is not None and zero.uses_deepspeed(accelerator)
    if sharded:  # gathered whole (every rank takes part), written by the main process like any other
        weights, optim = full_state_dict(model), full_optimizer_state(model, optimizer)
    else:  # each weight once (ZeRO-3: gathered one by one, every rank takes part); the writer keeps them
        weights, optim = untied_state_dict(model, keep=main), None
        if deepspeed:  # ZeRO: each rank writes its own optimizer partition
            zero.save_optimizer(tmp, optimizer, rank)
        elif main:
            optim = optimizer.state_dict()
    if main:
        save_file(weights, str(tmp / "student.safetensors"), metadata={"format": "pt"})
        if teacher is not None and teacher.owns_weights:
            save_file(untied_state_dict(teacher.model), str(tmp / "teacher.safetensors"), metadata={"format": "pt"})
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
    torch.save({"step": step, "rank": rank, "data": stream.state_dict(), "rng": rng_state()}, _rank_file(tmp, rank))
    barrier()
    if main:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
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


def _load_weights(model, file: Path) -> None:
    """Copied into the model's own tensors (under DeepSpeed, views of its flat buffers); the
    file holds each tied weight once."""
    missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    missing = [n for n in missing if n not in tied_names(model)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {file}: weights do not match the model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def _load_partitioned(model, file: Path, rank: int) -> None:
    """ZeRO-3: one parameter at a time, rank 0 reading it from the file and DeepSpeed
    partitioning it back, so no rank holds the whole model. Names and shapes are checked on
    every rank first (an error on one rank alone would leave the others waiting)."""
    tied = tied_names(model)
    with safe_open(str(file), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        state = {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in model.state_dict(keep_vars=True).items() if n not in tied}
        missing, unexpected = state.keys() - shapes.keys(), shapes.keys() - state.keys()
        wrong = sorted(n for n in state.keys() & shapes.keys() if state[n] != shapes[n])
        if missing or unexpected or wrong:
            raise ValueError(f"checkpoint {file}: weights do not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}, other shapes {wrong[:3]})")
        with torch.no_grad():
            for n, t in zero.state_items(model, skip=tied, modify=True):
                if rank == 0 or not hasattr(t, "ds_id"):  # a buffer is every rank's own
                    t.copy_(f.get_tensor(n))


def load_checkpoint(path: Path, *, student, optimizer, scheduler, teacher, stream, accelerator=None) -> int:
    path = Path(path)
    rank = accelerator.process_index if accelerator else 0
    rank_file = _rank_file(path, rank)
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no state for rank {rank} (was it written by fewer processes?)")
    model = accelerator.unwrap_model(student) if accelerator else student
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    if is_sharded(model):
        load_full_state_dict(model, load_file(str(path / "student.safetensors")))
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    elif accelerator is not None and zero.uses_deepspeed(accelerator):
        if zero.partitioned(model):
            _load_partitioned(model, path / "student.safetensors", rank)
        else:
            _load_weights(model, path / "student.safetensors")
        zero.load_optimizer(path, optimizer, rank, accelerator.num_processes)
    else:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {path} was written under DeepSpeed ZeRO (per-rank optimizer partitions); "
                             "resume it with the same DeepSpeed launch")
        _load_weights(model, path / "student.safetensors")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if teacher is not None and teacher.owns_weights:
        _load_weights(teacher.model, path / "teacher.safetensors")
    mine = torch.load(rank_file, weights_only=True)
    stream.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])
    return int(state["step"])
