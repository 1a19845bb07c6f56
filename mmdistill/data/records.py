"""Sample records: JSONL files of them, and the data.select filter every source applies."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmdistill.data.boxes import MAX_IMAGE_PIXELS, check_boxes, image_size
from mmdistill.data.files import not_regular
from mmdistill.data.shards import ShardError, check_fields, parse_json

IMAGE_KEYS = ("images", "teacher_images")


def matches(sample: dict, select: dict) -> bool:
    """data.select: every named field equals the value (or is one of a list's values)."""
    # any sequence but a string: the config hands a list over as an OmegaConf ListConfig
    return all(sample.get(k) == v or (isinstance(v, Sequence) and not isinstance(v, str) and sample.get(k) in v)
               for k, v in select.items())


def _images(rec: dict, key: str, parent: Path, where: str, max_pixels: int | None) -> list[tuple[int, int]]:
    """Resolve ``rec[key]`` (paths relative to the file) in place; the sizes of the images, read
    from their headers: a missing file, a FIFO, a file that is no image or one with more than
    ``max_pixels`` pixels is this record's error now, not a failed batch later."""
    paths = rec.get(key)
    if paths is None:
        return []
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ShardError(f"{where}: {key!r} must be a list of image paths, got {paths!r:.80}")
    rec[key] = [str(parent / p) for p in paths]
    try:
        return [image_size(p, f"{where}: {key}[{i}]", max_pixels) for i, p in enumerate(rec[key])]
    except ValueError as e:
        raise ShardError(str(e)) from None


def check_jsonl_record(rec, where: str, parent: Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """One JSONL record checked as a shard record is (:func:`~mmdistill.data.shards.check_fields`:
    a task, text fields that are valid strings, stage, answer, checker, boxes), its image paths
    resolved against ``parent`` and their files checked; raises a one-line ShardError."""
    check_fields(rec, where)
    sizes = _images(rec, "images", parent, where, max_pixels)
    _images(rec, "teacher_images", parent, where, max_pixels)
    if "boxes" in rec:
        try:
            check_boxes(rec["boxes"], sizes, f"{where}: boxes")
        except ValueError as e:
            raise ShardError(str(e)) from None
    return rec


def read_jsonl(path: str | Path, on_bad: str = "raise", stats: dict | None = None,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> list[dict]:
    """Records with a task (`prompt` or `messages`); every bad line (not UTF-8, not JSON, a field
    of the wrong kind, text a tokenizer cannot take, a missing or oversized image) raises one
    ShardError naming ``file:line``, or with ``on_bad="skip"`` is skipped and counted in
    ``stats`` (``{"bad": n, "errors": [msg]}``). None is dropped unsaid."""
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    stats = {} if stats is None else stats
    stats.setdefault("bad", 0)
    stats.setdefault("errors", [])
    why = not_regular(path)
    if why is not None and why != "no such file":  # a FIFO would block the open below forever
        raise ShardError(f"{path}: cannot read a JSONL file here: {why}")
    out = []
    parent = Path(path).parent
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error, not the file's
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = parse_json(raw.rstrip(b"\r\n"), where, None)
                if isinstance(rec, dict):
                    rec.setdefault("id", f"{Path(path).name}:{n}")
                    if isinstance(rec["id"], int) and not isinstance(rec["id"], bool):
                        rec["id"] = str(rec["id"])  # ids are strings (as in shards); 7 and "7" are one id
                out.append(check_jsonl_record(rec, where, parent, max_pixels))
            except ShardError as e:
                if on_bad == "raise":
                    raise
                stats["bad"] += 1
                stats["errors"].append(str(e))
    if not out:
        raise ShardError(f"{path}: no samples" + (f" ({stats['bad']} bad line(s) skipped; first: {stats['errors'][0]})"
                                                  if stats["bad"] else ""))
    return out
