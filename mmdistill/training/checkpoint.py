"""Checkpoints written atomically: a directory becomes visible under its final name only
once everything in it is on disk, so a killed run never leaves a checkpoint that loads.

Each checkpoint lists the sha256 of every file in it (SHA256SUMS, `sha256sum -c` reads it),
written before the directory gets its final name; a resume checks the files against it before
anything is loaded, so a truncated, emptied or altered file is named and never loaded, and
`train.resume=auto` falls back to the newest intact checkpoint. Non-finite weights are never
written: a checkpoint always holds weights a run can continue from.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmdistill.distributed import Backend, DataParallel

STEP_DIR = re.compile(r"^step_(\d{8})$")
SUMS = "SHA256SUMS"
SAME_PROCESSES = "resume with the same number of processes"  # not damage: an older checkpoint would not do either
RANK_FILE = re.compile(r"(?:^|_)rank_(\d{5})\.pt$")  # a file one rank writes and reads (its state, its ZeRO partition)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: one line naming the checkpoint and the file."""


def newest_line(run_dir: Path) -> str:
    """What a message that stops a run says about where to continue from."""
    newest = list_checkpoints(run_dir)
    if not newest:
        return "no checkpoint yet"
    return f"the newest checkpoint is {newest[-1]} (train.resume=auto continues from it)"


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
                    backend: Backend | None = None, record: dict | None = None) -> Path:
    """Every rank writes its RNG states and data position (and its backend's own part) into the
    `.tmp` directory; the main process writes the shared state and `record` (what a resumed run
    carries over, plain numbers), lists every file's sha256 and renames it only after all ranks
    are done. Weights that are not finite raise FloatingPointError on every rank, and nothing is
    written."""
    backend = backend or DataParallel()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if backend.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    weights, optim = backend.state(tmp, backend.unwrap(student), optimizer)
    found = backend.gather_objects(not_finite(weights) if backend.main else None)
    bad = next((f for f in found if f), None)
    if bad:
        if backend.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise FloatingPointError(f"step {step}: the student's weights are not finite ({bad}); no checkpoint was "
                                 f"written; {newest_line(run_dir)}")
    if backend.main:
        save_file(weights, str(tmp / "student.safetensors"), metadata={"format": "pt"})
        if teacher is not None and teacher.owns_weights:
            teacher.save(tmp / "teacher.safetensors")
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                    "record": dict(record or {})}, tmp / "trainer_state.pt")
    state = {"step": step, "rank": backend.rank, "data": stream.state_dict(), "rng": rng_state()}
    torch.save(state, _rank_file(tmp, backend.rank))
    backend.barrier()
    if backend.main:
        _write_sums(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def not_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The first weight holding a NaN or an infinity, with how many, or None."""
    for name, w in weights.items():
        if w.is_floating_point() and not torch.isfinite(w).all():
            return f"{name}: {int((~torch.isfinite(w)).sum())} of {w.numel()} values"
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_sums(directory: Path) -> None:
    """SHA256SUMS of every other file in `directory`, in `sha256sum`'s format."""
    lines = [f"{_sha256(f)}  {f.name}\n" for f in sorted(directory.iterdir()) if f.is_file() and f.name != SUMS]
    (directory / SUMS).write_text("".join(lines))


def _read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise ValueError(f"line {n} is not '<sha256>  <file>'")
        sums[name] = digest
    return sums


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


def problem(path: Path, backend: Backend | None = None) -> str | None:
    """What is wrong with checkpoint `path`, as every rank finds it, or None: each rank checks the
    files it reads alone (its rank files), the main process the shared ones, against SHA256SUMS;
    a checkpoint written before SHA256SUMS existed, that its files are there and its weights'
    headers read. A collective: every rank calls it and gets the same answer."""
    backend = backend or DataParallel()
    found = backend.gather_objects(_own_problem(Path(path), backend.rank, backend.main))
    return next((p for p in found if p), None)


def _own_problem(path: Path, rank: int, main: bool) -> str | None:
    if not path.is_dir():
        return "no such directory"
    mine = _rank_file(path, rank).name
    if not (path / SUMS).is_file():  # written before checksums: what can be checked without them
        needed = (["trainer_state.pt", "student.safetensors"] if main else []) + [mine]
        missing = [n for n in needed if not (path / n).is_file()]
        if missing:
            return _missing(missing[0], rank, sorted(f.name for f in path.iterdir()))
        if main:
            for f in sorted(path.glob("*.safetensors")):
                try:
                    with safe_open(str(f), "pt"):
                        pass
                except (SafetensorError, OSError) as exc:
                    return f"{f.name} cannot be read ({' '.join(str(exc).split())}; {f.stat().st_size} bytes)"
        return None
    try:
        sums = _read_sums(path / SUMS)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        return f"{SUMS} cannot be read ({exc})"
    if mine not in sums:
        return _missing(mine, rank, sorted(sums))
    for name, digest in sums.items():
        owner = RANK_FILE.search(name)
        if (int(owner.group(1)) != rank) if owner else not main:
            continue
        file = path / name
        if not file.is_file():
            return f"{name} is missing (listed in {SUMS})"
        if _sha256(file) != digest:
            return f"{name} does not match its sha256 in {SUMS}: truncated or altered ({file.stat().st_size} bytes)"
    return None


def _missing(name: str, rank: int, names: list[str]) -> str:
    """Which file is missing, and for a rank's own file, how many processes wrote the checkpoint."""
    if not name.startswith("rank_"):
        return f"{name} is missing"
    ranks = sorted(n for n in names if n.startswith("rank_") and RANK_FILE.search(n))
    if ranks and len(ranks) <= rank:
        return (f"{name} is missing: the checkpoint holds the state of {len(ranks)} process(es) ({', '.join(ranks)}) "
                f"and this run has more; {SAME_PROCESSES}")
    return f"{name} is missing"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp` leftovers of a killed run are not listed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def resume_point(resume: str, run_dir: Path, backend: Backend | None = None) -> Path | None:
    """The checkpoint `train.resume` continues from, checked (see `problem`): none, the one it
    names (its damage is an error), or under auto the newest intact one of the run, with one
    line naming each damaged newer one it passes over."""
    backend = backend or DataParallel()
    if resume == "none":
        return None
    if resume != "auto":
        found = problem(Path(resume), backend)
        if found:
            raise CheckpointError(f"train.resume: checkpoint '{resume}' cannot be resumed: {found}")
        return Path(resume)
    damaged = []
    for path in reversed(list_checkpoints(run_dir)):
        found = problem(path, backend)
        if found is not None and SAME_PROCESSES in found:
            raise CheckpointError(f"train.resume=auto: checkpoint {path} cannot be resumed: {found}")
        if found is None:
            if damaged and backend.main:
                print(f"mmdistill: passing over damaged checkpoint(s): {'; '.join(damaged)}; resuming from the newest "
                      f"intact one, {path}", file=sys.stderr, flush=True)
            return path
        damaged.append(f"{path.name}: {found}")
    if damaged:
        raise CheckpointError(f"train.resume=auto: no checkpoint in {Path(run_dir) / 'checkpoints'} is intact "
                              f"({'; '.join(damaged)}); delete them to start afresh there, or set another "
                              "train.output_dir")
    return None


def _torch_load(file: Path):
    try:
        return torch.load(file, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint file {file} cannot be read ({' '.join(str(exc).split())[:200]})") from None


def load_checkpoint(path: Path, *, student, optimizer, scheduler, teacher, stream, backend: Backend | None = None,
                    record: dict | None = None, checked: bool = False) -> int:
    """Restores everything `save_checkpoint` wrote (`record` is updated in place) and returns the
    step. The files are checked first (see `problem`) unless the caller just did (`checked`)."""
    backend = backend or DataParallel()
    path = Path(path)
    found = None if checked else problem(path, backend)
    if found:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {found}")
    state = _torch_load(path / "trainer_state.pt")
    backend.load_state(path, backend.unwrap(student), optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if teacher is not None and teacher.owns_weights:
        teacher.load(path / "teacher.safetensors")
    mine = _torch_load(_rank_file(path, backend.rank))
    stream.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])
    if record is not None:
        record.update(state.get("record", {}))
    return int(state["step"])
