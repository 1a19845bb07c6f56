"""What every converter shares: sample fields, bad-record handling, stamping, and writing shards."""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable, Iterator

from mmdistill.data.boxes import MAX_IMAGE_PIXELS
from mmdistill.data.files import not_regular
from mmdistill.data.shards import ShardError, ShardWriter, sample_key

IMAGE_TOKEN = "<image>"
DEFAULT_CHECKER = "exact"
# Fields a source record (or a dataset column of the same name) may carry into the sample.
PRIVILEGED_FIELDS = ("hint", "reasoning", "answer", "boxes")
SAMPLE_FIELDS = ("id", "prompt", "messages", "system", "hint", "reasoning", "answer", "response", "boxes",
                 "images", "teacher_images", "task", "checker")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}


class ConvertError(ValueError):
    """A bad source record; the message is one line naming the file and line, row or record id."""


@dataclass
class BadRecords:
    """What to do with a bad record: ``raise`` stops the conversion naming it; ``skip`` counts it,
    so the CLI can say how many were left out (nothing is dropped without a number)."""

    on_bad: str = "raise"
    count: int = 0
    errors: list[str] = field(default_factory=list)
    keep: int = 20  # messages kept for the report

    def __post_init__(self):
        if self.on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {self.on_bad!r}")

    def reject(self, message: str) -> None:
        if self.on_bad == "raise":
            raise ConvertError(message)
        self.count += 1
        if len(self.errors) < self.keep:
            self.errors.append(message)


# A converter's records are (where, sample) pairs, so an error found later (by the shard writer)
# still names the source line; the public from_* functions hand out the samples alone.
Located = Iterator[tuple[str, dict]]


def samples_only(records: Located) -> Iterator[dict]:
    for _, sample in records:
        yield sample


def stamp(sample: dict, split: str, domain: str, stage: int) -> dict:
    sample.update(split=split, domain=domain, stage=stage)
    return sample


def check_stamp(split: str, domain: str, stage: int) -> None:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise ValueError(f"stage must be an int >= 0, got {stage!r}")


def unique(records: Located, bad: BadRecords) -> Located:
    """Drop nothing: a second record with the same shard key is a bad record naming both places,
    caught here so ``--on-bad skip`` can count it instead of the writer stopping."""
    seen: dict[str, str] = {}
    for where, sample in records:
        try:
            key = sample_key(sample.get("id"), where)
        except ShardError as e:
            bad.reject(str(e))
            continue
        if key in seen:
            bad.reject(f"{where}: duplicate id {sample['id']!r} (key {key!r}, first at {seen[key]})")
            continue
        seen[key] = where
        yield where, sample


def image_under(root: Path, rel: str, where: str, field: str) -> str:
    """``root / rel`` for an image path a record gives, which must stay under ``root`` (the
    image root): an absolute path or one that climbs out with ``..`` would embed any file the
    converting user can read into the shards, so it is refused naming the record and the path.
    The file must be a regular file (a FIFO would block the conversion forever)."""
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise ConvertError(f"{where}: {field} path {rel!r} is absolute; image paths must be relative to the "
                           f"image root ({root})")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise ConvertError(f"{where}: {field} path {rel!r} leaves the image root ({root}) with '..'")
    p = root / rel
    why = not_regular(p)
    if why == "no such file":
        raise ConvertError(f"{where}: {field} file {rel!r} not found (looked for {p})")
    if why:
        raise ConvertError(f"{where}: {field} file {rel!r} cannot be read: {why}")
    return str(p)


def data_file(path: Path) -> None:
    """A source file must be a regular file: a FIFO would block the conversion forever."""
    why = not_regular(path)
    if why is not None and why != "no such file":  # a missing file: open() says so
        raise ConvertError(f"{path}: cannot read it as a data file: {why}")


def guarded(make: Callable[[], dict], where: str, bad: BadRecords) -> dict | None:
    """One record's conversion; its ConvertError goes to ``bad`` (raise or count)."""
    try:
        return make()
    except ConvertError as e:
        bad.reject(str(e) if str(e).startswith(where) else f"{where}: {e}")
        return None


# --- writing ----------------------------------------------------------------------------------

def write_shards(records: Iterable[tuple[str, dict]], out_dir, *, prefix: str = "shard", max_bytes: int = 64 * 2**20,
                 max_count: int = 10_000, meta: dict | None = None, overwrite: bool = False,
                 bad: BadRecords | None = None, max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """Write (where, sample) records as shards and return the manifest. A sample the shard
    writer refuses (a field of the wrong type, text that is not valid UTF-8, an image that will
    not decode or has more than ``max_image_pixels`` pixels, a box outside its image) is a bad
    record named by its source; on any raised error no manifest is written, so a failed build
    never looks complete."""
    bad = bad or BadRecords()
    with ShardWriter(out_dir, prefix=prefix, max_bytes=max_bytes, max_count=max_count, meta=meta,
                     overwrite=overwrite, max_image_pixels=max_image_pixels) as writer:
        for where, sample in records:
            try:
                writer.write(sample)
            except ShardError as e:
                bad.reject(f"{where}: {e}")
    return writer.manifest


def convert_meta(converter: str, **params) -> dict:
    """The manifest's ``meta``: which converter and arguments built the shards (no time stamps or
    absolute paths, so rebuilding gives the same manifest)."""
    return {"converter": converter, **{k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in params.items()}}
