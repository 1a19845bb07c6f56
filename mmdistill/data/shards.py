"""Datasets as tar shards (format version 1): one portable, streamable, checkable form for
samples with images, so a dataset built once reads the same in training, evaluation and the
data tools, and a corrupt file is caught with its shard and sample named.

A sample with id ``"scenes-train-0-3"`` (key: the id with every character outside
``[A-Za-z0-9_-]`` replaced by ``_``, so webdataset, which cuts keys at the first dot, groups it
right) is stored as consecutive tar members::

    scenes-train-0-3.json       the record: every field but the images, plus "schema",
                                "version", "num_images", "num_teacher_images"
    scenes-train-0-3.img0.png   student image 0 (.jpg when it was given as JPEG bytes or file)
    scenes-train-0-3.timg0.png  teacher image 0

Images given as PNG or JPEG bytes or files are stored byte for byte; anything else (a PIL
image, other formats) as PNG. A shard directory also holds ``manifest.json`` (shard names,
sizes, sha256, counts per split/stage/domain, the builder's ``meta``). Tars are written with
fixed metadata, so the same samples give byte-identical shards. Readers accept webdataset's
member dicts too (``decode_sample`` ignores ``__key__``-style entries).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand
from PIL import Image

from mmdistill.data.boxes import MAX_IMAGE_PIXELS, check_boxes, load_image
from mmdistill.data.files import not_regular
from mmdistill.tasks import CHECKERS, is_checker

SCHEMA = "mmdistill.sample"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mmdistill.shards"
TEXT_FIELDS = ("split", "domain", "task", "prompt", "system", "hint", "reasoning", "response")
RESERVED = ("schema", "version", "num_images", "num_teacher_images")
IMAGE_FIELDS = {"img": "images", "timg": "teacher_images"}
IMAGE_EXTS = ("png", "jpg", "jpeg")
COUNT_FIELDS = ("split", "stage", "domain")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
_IMAGE_MEMBER = re.compile(r"(t?img)(\d+)\.([A-Za-z]+)")
# Nesting a record may have. Deeper JSON parses (up to the interpreter's recursion limit) but then
# exhausts the stack of whatever walks it later (a deep copy, a log line), far from the sample.
MAX_DEPTH = 64


class ShardError(ValueError):
    """A bad sample, shard or manifest; the message is one line naming the file and sample key."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


def sample_key(sample_id, where: str = "sample") -> str:
    if not isinstance(sample_id, str) or not sample_id:
        raise ShardError(f"{where}: 'id' must be a non-empty string, got {sample_id!r}")
    return re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)


def sample_count_key(sample: dict, field: str) -> str:
    """The manifest's bucket for a sample; stage defaults to 0 as in training."""
    value = sample.get(field, 0 if field == "stage" else None)
    return "(none)" if value is None else str(value)


# --- records ---------------------------------------------------------------------------------

def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ShardError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ShardError(f"{where}: messages[{i}] must be a dict with a string 'role' and a 'content'")
        if not isinstance(m["content"], (str, list)):
            raise ShardError(f"{where}: messages[{i}] 'content' must be a string or a list of parts, "
                             f"got {type(m['content']).__name__}")
    if not any(m["role"] == "user" for m in messages):
        raise ShardError(f"{where}: 'messages' has no 'user' message")


def _check_checker(checker, where: str) -> None:
    if not is_checker(checker):
        raise ShardError(f"{where}: unknown checker {checker!r}; expected one of {CHECKERS} "
                         "or 'reasoning_gym:<task>'")


def _image_members(members, where: str) -> dict[str, list[str]]:
    """Image member suffixes by field, in index order; a gap, a duplicate or an unknown member is
    an error, so a half-written sample never passes for a smaller one."""
    found: dict[str, dict[int, str]] = {"img": {}, "timg": {}}
    for suffix in members:
        if suffix == "json" or suffix.startswith("__"):
            continue
        m = _IMAGE_MEMBER.fullmatch(suffix)
        if not m or m.group(3).lower() not in IMAGE_EXTS:
            raise ShardError(f"{where}: unexpected member {suffix!r} (expected json, img<i>.png/jpg "
                             "or timg<i>.png/jpg)")
        prefix, idx = m.group(1), int(m.group(2))
        if idx in found[prefix]:
            raise ShardError(f"{where}: two members for {prefix}{idx}: {found[prefix][idx]!r} and {suffix!r}")
        found[prefix][idx] = suffix
    return {p: [f[i] for i in sorted(f)] for p, f in found.items()}


def _check_text(text: str, where: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # only a lone UTF-16 surrogate ("\ud800") gets here
        raise ShardError(f"{where}: {field} is not valid text: {text[e.start:e.end]!r} at character {e.start} "
                         "is a lone surrogate, which UTF-8 cannot encode (a tokenizer would fail on it)") from None


def check_values(record, where: str) -> None:
    """Every string of ``record`` (keys too) encodable as UTF-8, every float finite, nesting at
    most :data:`MAX_DEPTH`: what JSON lets through but a tokenizer, the shard writer (strict JSON)
    or a recursive walk would fail on later, far from the sample. Iterative, so a deep record
    cannot exhaust the stack here."""
    stack = [(record, "record", 0)]
    while stack:
        value, field, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where, field)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ShardError(f"{where}: {field} is {value!r}; numbers must be finite")
        elif isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ShardError(f"{where}: {field} is nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, dict):
                for k, v in value.items():
                    name = repr(k) if field == "record" else f"{field}[{k!r}]"
                    if isinstance(k, str):
                        _check_text(k, where, f"key {name}")
                    stack.append((v, name, depth + 1))
            else:
                stack.extend((v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value))


def check_fields(record, where: str) -> None:
    """Raise a ShardError unless ``record`` holds a usable sample: a task (``prompt`` or
    ``messages``), text fields that are strings, valid text and numbers (:func:`check_values`),
    ``stage``, ``answer``, ``checker`` and ``boxes`` of the right kind. Shard records and JSONL
    records (``mmdistill.data.records.read_jsonl``) both pass it."""
    if not isinstance(record, dict):
        raise ShardError(f"{where}: a record must be a JSON object with a 'prompt' or 'messages', "
                         f"got {type(record).__name__}")
    check_values(record, where)
    if "id" in record and (not isinstance(record["id"], str) or not record["id"]):
        raise ShardError(f"{where}: 'id' must be a non-empty string, got {record['id']!r}")
    if "prompt" not in record and "messages" not in record:
        raise ShardError(f"{where}: missing field 'prompt' (or 'messages')")
    for field in TEXT_FIELDS:
        if field in record and not isinstance(record[field], str):
            raise ShardError(f"{where}: {field!r} must be a string, got {type(record[field]).__name__}")
    if "split" in record and not record["split"]:
        raise ShardError(f"{where}: 'split' is empty")
    if "messages" in record:
        _check_messages(record["messages"], where)
    stage = record.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise ShardError(f"{where}: 'stage' must be an int >= 0, got {stage!r}")
    answer = record.get("answer", "")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ShardError(f"{where}: 'answer' must be a string or number, got {type(answer).__name__}")
    if "checker" in record:
        _check_checker(record["checker"], where)
    if "boxes" in record and not isinstance(record["boxes"], list):
        raise ShardError(f"{where}: 'boxes' must be a list, got {type(record['boxes']).__name__}")


def check_record(record, where: str, members=None) -> None:
    """Raise a ShardError unless ``record`` is a readable version-1 sample record; with
    ``members`` (suffix -> bytes) also check that its image members are exactly the counted ones."""
    if not isinstance(record, dict):
        raise ShardError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    if record.get("schema") != SCHEMA:
        raise ShardError(f"{where}: not an mmdistill sample record (schema {record.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ShardError(f"{where}: 'version' must be an int >= 1, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ShardError(f"{where}: record version {version} is newer than this mmdistill reads "
                         f"(version {SCHEMA_VERSION}); upgrade mmdistill")
    for field in ("id", "split"):
        if field not in record:
            raise ShardError(f"{where}: missing field {field!r}")
    check_fields(record, where)
    for field in IMAGE_FIELDS.values():
        if field in record:
            raise ShardError(f"{where}: {field!r} must be stored as image members, not in the record")
    counts = {}
    for prefix, field in IMAGE_FIELDS.items():
        n = record.get(f"num_{field}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ShardError(f"{where}: 'num_{field}' must be an int >= 0, got {n!r}")
        counts[prefix] = n
    if members is not None:
        found = _image_members(members, where)
        for prefix, field in IMAGE_FIELDS.items():
            want = [f"{prefix}{i}" for i in range(counts[prefix])]
            got = [s.split(".")[0] for s in found[prefix]]
            if got != want:
                raise ShardError(f"{where}: record says {counts[prefix]} {field} but the shard holds "
                                 f"{len(got)} ({', '.join(found[prefix]) or 'none'})")


# --- samples <-> members ---------------------------------------------------------------------

def _image_bytes(obj, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[bytes, str, tuple[int, int]]:
    """(stored bytes, extension, size): PNG/JPEG files keep their bytes, the rest becomes PNG."""
    raw = obj
    if isinstance(raw, dict):
        raw = raw.get("bytes") if raw.get("bytes") is not None else raw.get("path")
    if isinstance(raw, (str, Path)):
        why = not_regular(raw)
        if why is not None and why != "no such file":
            raise ShardError(f"{where}: cannot read image file {os.fspath(raw)!r}: {why}")
        try:
            raw = Path(raw).read_bytes()
        except OSError as e:
            raise ShardError(f"{where}: cannot read image file ({type(e).__name__}: {_one_line(e)})") from None
    try:
        im = load_image(obj if isinstance(obj, Image.Image) else raw, where, max_pixels)
    except ValueError as e:
        raise ShardError(str(e)) from None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if raw.startswith(_PNG_MAGIC):
            return raw, "png", im.size
        if raw.startswith(_JPEG_MAGIC):
            return raw, "jpg", im.size
    src = obj if isinstance(obj, Image.Image) and obj.mode in _PNG_MODES else im
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    return buf.getvalue(), "png", im.size


def _json_bytes(record: dict, where: str) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        for k, v in record.items():
            try:
                json.dumps(v, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ShardError(f"{where}: field {k!r} is not JSON-serialisable ({_one_line(e)})") from None
        raise


def _image_list(sample: dict, field: str, where: str) -> list:
    images = sample.get(field)
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        raise ShardError(f"{where}: {field!r} must be a list, got {type(images).__name__}")
    return list(images)


def encode_sample(sample: dict, where: str | None = None,
                  max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict[str, bytes]:
    """Members of one sample, suffix -> bytes (``{"json": ..., "img0.png": ...}``); the sample
    is checked as a reader would check it, so a writer never produces a shard that fails. An
    image with more than ``max_pixels`` pixels is refused (:func:`~mmdistill.data.boxes.load_image`)."""
    if not isinstance(sample, dict):
        raise ShardError(f"{where or 'sample'}: must be a dict, got {type(sample).__name__}")
    where = where or f"sample {sample.get('id')!r}"
    record = {k: v for k, v in sample.items() if k not in RESERVED and k not in IMAGE_FIELDS.values()}
    record.update(schema=SCHEMA, version=SCHEMA_VERSION)
    out: dict[str, bytes] = {}
    images: dict[str, list] = {}
    sizes = []
    for prefix, field in IMAGE_FIELDS.items():
        images[field] = _image_list(sample, field, where)
        record[f"num_{field}"] = len(images[field])
    check_record(record, where)
    out["json"] = _json_bytes(record, where)
    for prefix, field in IMAGE_FIELDS.items():
        for i, obj in enumerate(images[field]):
            data, ext, size = _image_bytes(obj, f"{where}: {field}[{i}]", max_pixels)
            out[f"{prefix}{i}.{ext}"] = data
            if prefix == "img":
                sizes.append(size)
    _check_boxes(record, sizes, where)
    return out


def _check_boxes(record: dict, sizes, where: str) -> None:
    if "boxes" in record:
        try:
            check_boxes(record["boxes"], sizes, f"{where}: boxes")
        except ValueError as e:
            raise ShardError(str(e)) from None


def parse_json(data: bytes | str, where: str, what: str | None = "record"):
    """JSON text (bytes must be UTF-8) as Python values; every way it can fail (not UTF-8, not
    JSON, an integer past Python's digit limit, nesting past the recursion limit) is one
    ShardError naming ``where`` (and ``what`` was read there, if given)."""
    it = f"{what} is " if what else ""
    try:
        text = bytes(data).decode("utf-8") if not isinstance(data, str) else data
    except UnicodeDecodeError as e:
        bad = bytes(data)[e.start:e.start + 1]
        raise ShardError(f"{where}: {it}not UTF-8 ({bad!r} at byte {e.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise ShardError(f"{where}: {it}not valid JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise ShardError(f"{where}: {it}not usable JSON (nested too deeply to parse)") from None
    except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise ShardError(f"{where}: {it}not usable JSON ({_one_line(e)})") from None


def decode_sample(members: dict[str, bytes], where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """The sample dict back from its members, images as RGB PIL images; every problem (bad JSON,
    a field, an image that will not decode or is larger than ``max_pixels``, a box outside its
    image) is a one-line ShardError."""
    if "json" not in members:
        raise ShardError(f"{where}: no .json record member (members: {', '.join(sorted(members)) or 'none'})")
    record = parse_json(members["json"], where)
    check_record(record, where, members)
    found = _image_members(members, where)
    sample = {k: v for k, v in record.items() if k not in RESERVED}
    sizes = []
    for prefix, field in IMAGE_FIELDS.items():
        decoded = []
        for suffix in found[prefix]:
            try:
                decoded.append(load_image(bytes(members[suffix]), f"{where}: member {suffix!r}", max_pixels))
            except ValueError as e:
                raise ShardError(str(e)) from None
        if decoded:
            sample[field] = decoded
        if prefix == "img":
            sizes = [im.size for im in decoded]
    _check_boxes(record, sizes, where)
    return sample


# --- writing ---------------------------------------------------------------------------------

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _member_bytes(name: str, size: int) -> int:
    header = _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return len(header) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_size(content: int) -> int:
    """File size of a tar whose members take ``content`` bytes: end blocks, record padding."""
    return -(-(content + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes ``out_dir/{prefix}-{i:06d}.tar`` (each via ``.tmp`` then rename) and, on close,
    ``manifest.json``; a new shard starts when a sample would push the file past ``max_bytes``
    or the count past ``max_count`` (a sample larger than max_bytes gets a shard to itself).

    Keys must be unique across the whole dataset, so an id collision is caught when written.
    An existing ``{prefix}-*.tar`` or manifest in ``out_dir`` is an error unless ``overwrite``,
    because stale shards would silently join the dataset.
    """

    def __init__(self, out_dir, prefix: str = "shard", max_bytes: int = 64 * 2**20,
                 max_count: int = 10_000, meta: dict | None = None, overwrite: bool = False,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        for name, v in (("max_bytes", max_bytes), ("max_count", max_count)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ShardWriter: {name} must be an int >= 1, got {v!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix or ""):
            raise ValueError(f"ShardWriter: prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
        self.out_dir, self.prefix = str(out_dir), prefix
        self.max_bytes, self.max_count = max_bytes, max_count
        self.max_image_pixels = max_image_pixels
        self.meta = dict(meta or {})
        os.makedirs(self.out_dir, exist_ok=True)
        stale = sorted(p.name for p in Path(self.out_dir).glob(f"{prefix}-*.tar")) + (
            [MANIFEST] if os.path.exists(os.path.join(self.out_dir, MANIFEST)) else [])
        if stale and not overwrite:
            raise ShardError(f"{self.out_dir}: already holds {', '.join(stale[:3])}"
                             f"{' ...' if len(stale) > 3 else ''}; use an empty directory or overwrite=True")
        for name in stale:
            os.remove(os.path.join(self.out_dir, name))
        self.shards: list[dict] = []
        self.counts = {f: Counter() for f in COUNT_FIELDS}
        self.total = 0
        self._keys: dict[str, str] = {}
        self._tar = self._file = None
        self._count = self._content = 0
        self._closed = False
        self.manifest: dict | None = None

    def _path(self, index: int) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{index:06d}.tar")

    def _open(self) -> None:
        path = self._path(len(self.shards))
        self._file = open(path + ".tmp", "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = self._content = 0

    def _finish(self) -> None:
        path = self._path(len(self.shards))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        os.replace(path + ".tmp", path)
        self.shards.append({"name": os.path.basename(path), "samples": self._count,
                            "bytes": os.path.getsize(path), "sha256": sha256_file(path)})

    def write(self, sample: dict) -> str:
        """Add one sample; returns its key."""
        if self._closed:
            raise ShardError(f"{self.out_dir}: ShardWriter is closed")
        index = len(self.shards) + (self._tar is not None and self._count >= self.max_count)
        shard = self._path(index)
        key = sample_key(sample.get("id") if isinstance(sample, dict) else None, f"{shard}: sample")
        where = f"{shard}: sample {key!r}"
        if key in self._keys:
            raise ShardError(f"{where}: duplicate key (id {sample['id']!r}; also in {self._keys[key]}; "
                             "ids map to keys with characters outside [A-Za-z0-9_-] as '_')")
        members = encode_sample(sample, where, self.max_image_pixels)
        names = [(f"{key}.{suffix}", data) for suffix, data in members.items()]
        size = sum(_member_bytes(n, len(d)) for n, d in names)
        if self._tar is not None and self._count and (
                self._count >= self.max_count or _tar_size(self._content + size) > self.max_bytes):
            self._finish()
        if self._tar is None:
            self._open()
        for name, data in names:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._content += size
        self._count += 1
        self._keys[key] = os.path.basename(self._path(len(self.shards)))
        for f in COUNT_FIELDS:
            self.counts[f][sample_count_key(sample, f)] += 1
        self.total += 1
        return key

    def close(self) -> dict:
        """Finish the last shard, write ``manifest.json`` and return it."""
        if self._closed:
            return self.manifest
        if self._tar is not None:
            self._finish()
        self._closed = True
        self.manifest = {
            "format": MANIFEST_FORMAT, "version": SCHEMA_VERSION, "shards": self.shards,
            "counts": {f: dict(sorted(c.items())) for f, c in self.counts.items()},
            "total": self.total, "meta": self.meta,
        }
        _write_json_atomic(os.path.join(self.out_dir, MANIFEST), self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress and write no manifest: a failed build never looks complete."""
        if self._tar is not None:
            path = self._path(len(self.shards)) + ".tmp"
            self._file.close()
            self._tar = self._file = None
            if os.path.exists(path):
                os.remove(path)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- reading ---------------------------------------------------------------------------------

def _manifest_path(path) -> str:
    p = str(path)
    return os.path.join(p, MANIFEST) if os.path.isdir(p) else p


def read_manifest(path_or_dir) -> dict:
    """The checked manifest of a shard directory (or the manifest file itself)."""
    path = _manifest_path(path_or_dir)
    why = not_regular(path)
    if why is not None and why != "no such file":  # a FIFO would block the open below forever
        raise ShardError(f"{path}: cannot read manifest: {why}")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{path}: no such manifest") from None
    except (OSError, ValueError) as e:  # not UTF-8, not JSON, a number past the digit limit
        raise ShardError(f"{path}: cannot read manifest ({_one_line(e)})") from None
    except RecursionError:
        raise ShardError(f"{path}: cannot read manifest (nested too deeply to parse)") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: not an mmdistill shard manifest (format must be {MANIFEST_FORMAT!r})")
    v = m.get("version")
    if not isinstance(v, int) or v < 1 or v > SCHEMA_VERSION:
        raise ShardError(f"{path}: manifest version {v!r}; this mmdistill reads version {SCHEMA_VERSION}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: 'shards' must be a list")
    for i, s in enumerate(shards):
        ok = (isinstance(s, dict) and isinstance(s.get("name"), str)
              and re.fullmatch(r"[A-Za-z0-9_.-]+", s["name"]) and s["name"] not in (".", "..")
              and isinstance(s.get("samples"), int) and isinstance(s.get("bytes"), int)
              and isinstance(s.get("sha256"), str))
        if not ok:
            raise ShardError(f"{path}: shards[{i}] must be {{name (a file name), samples, bytes, sha256}}, got {s!r}")
    if not isinstance(m.get("counts"), dict) or not isinstance(m.get("total"), int):
        raise ShardError(f"{path}: needs 'counts' (a dict) and 'total' (an int)")
    return m


def shard_urls(path) -> list[str]:
    """Tar paths of a shard directory (manifest order), a manifest file, a brace pattern
    (``dir/shard-{000000..000003}.tar``) or a single tar; a missing file is an error here,
    not a short epoch later."""
    p = str(path)
    listed_in = None
    if os.path.isdir(p) or p.endswith(".json"):
        mpath = _manifest_path(p)
        urls = [os.path.join(os.path.dirname(mpath), s["name"]) for s in read_manifest(mpath)["shards"]]
        listed_in = mpath
    elif "{" in p:
        urls = list(braceexpand(p))
    else:
        urls = [p]
    for u in urls:
        why = not_regular(u)
        if why is not None:
            why = "no such shard file" if why == "no such file" else why
            raise ShardError(f"{u}: {why}" + (f" (listed in {listed_in})" if listed_in else ""))
    return urls


def _split_name(name: str) -> tuple[str, str]:
    """(key, suffix) the way webdataset splits: at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


def _unsafe(name: str) -> bool:
    return name.startswith("/") or "\\" in name or ".." in name.split("/")


def _end_problem(f, offset: int) -> str | None:
    """None when the archive ends properly at ``offset``: at least two zero blocks, then only
    zeros to the end of the file. Otherwise what is wrong there, since tarfile stops silently at
    the first zero block or at a garbled header: a zeroed header in the middle of a shard would
    pass for its end and every later sample would vanish."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(offset)
    pos, first_data = offset, None
    while first_data is None and (chunk := f.read(1 << 20)):
        rest = chunk.lstrip(b"\0")
        if rest:
            first_data = pos + len(chunk) - len(rest)
        pos += len(chunk)
    if first_data is None:
        zeros = size - offset
        if zeros >= 2 * tarfile.BLOCKSIZE:
            return None
        return (f"cut off at byte {size}: no end-of-archive marker (two zero blocks), only {zeros} zero byte(s)"
                if zeros else f"cut off at byte {size}: no end-of-archive marker")
    if first_data == offset:
        if size - offset < tarfile.BLOCKSIZE:
            return f"cut off at byte {size}, inside a tar header"
        return f"byte {offset} holds no valid tar header"
    return (f"a zero block at byte {offset} is followed by data at byte {first_data}, so it is not the end of "
            f"the archive (a zeroed or lost header)")


def _keys_after(f, offset: int) -> list[str]:
    """Sample keys of the members that can still be found after ``offset``, skipping blocks that
    are not headers (what ``tar --ignore-zeros`` lists): how much a corrupt stretch cost. Only
    counted, never read as samples: the data there is not trustworthy."""
    keys: dict[str, None] = {}
    f.seek(offset)
    try:
        tar = tarfile.open(fileobj=f, mode="r|", ignore_zeros=True)
        while (info := tar.next()) is not None:
            tar.members.clear()
            keys.setdefault(_split_name(info.name)[0], None)
    except (tarfile.TarError, EOFError, OSError):
        pass  # as many as could be found
    return list(keys)


def _new_stats(stats: dict | None) -> dict:
    stats = {} if stats is None else stats
    stats.setdefault("samples", 0)
    stats.setdefault("bad", 0)
    stats.setdefault("errors", [])
    stats.setdefault("lost", [])  # samples each error stands for, in step with "errors"
    return stats


def iter_shard(path, on_bad: str = "raise", stats: dict | None = None,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """Decoded samples of one tar, streamed. ``on_bad="skip"`` skips bad samples, and stops at a
    corrupt tar, counting each in ``stats`` (``{"samples": good, "bad": n, "errors": [msg],
    "lost": [samples per msg]}``) instead of raising; a corrupt stretch counts the samples it
    made unreadable. Images with more than ``max_pixels`` pixels are bad samples."""
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    stats = _new_stats(stats)
    shard = str(path)
    last = None  # key of the last sample decoded, to say where a corrupt tar went wrong

    def bad(msg: str, lost: int = 1) -> None:
        if on_bad == "raise":
            raise ShardError(msg)
        stats["bad"] += lost
        stats["errors"].append(msg)
        stats["lost"].append(lost)

    def emit(key: str, members: dict) -> Iterator[dict]:
        nonlocal last
        where = f"{shard}: sample {key!r}"
        try:
            sample = decode_sample(members, where, max_pixels)
        except ShardError as e:
            bad(str(e))
            return
        except Exception as e:  # noqa: BLE001 - whatever a member's bytes make a decoder raise is that sample's fault
            bad(f"{where}: cannot decode ({type(e).__name__}: {_one_line(e)})")
            return
        last = key
        stats["samples"] += 1
        yield sample

    why = not_regular(shard)
    if why is not None and why != "no such file":  # a FIFO would block the open below forever
        bad(f"{shard}: cannot open shard: {why}")
        return
    try:
        f = open(shard, "rb")
    except OSError as e:
        bad(f"{shard}: cannot open shard ({type(e).__name__}: {_one_line(e)})")
        return
    with f:
        seen: set[str] = set()
        key, members, skip, n_members = None, {}, None, 0
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            while (info := tar.next()) is not None:
                tar.members.clear()  # streaming: keep no history
                n_members += 1
                name = info.name
                if _unsafe(name):
                    bad(f"{shard}: member {name!r}: unsafe path (absolute or with '..')")
                    continue
                if not info.isfile():
                    bad(f"{shard}: member {name!r}: not a regular file")
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                k, suffix = _split_name(name)
                if k == skip:
                    continue
                if k != key:
                    if key is not None:
                        yield from emit(key, members)
                    key, members = None, {}
                    if k in seen:
                        bad(f"{shard}: sample {k!r}: duplicate key (used twice, or its members "
                            "are not contiguous)")
                        skip = k
                        continue
                    seen.add(k)
                    key = k
                if not suffix or suffix in members:
                    what = "has no extension" if not suffix else "appears twice"
                    bad(f"{shard}: sample {k!r}: member {name!r} {what}")
                    key, members, skip = None, {}, k
                    continue
                members[suffix] = data
            end = tar.offset
            problem = _end_problem(f, end)
        except (tarfile.TarError, EOFError, OSError) as e:
            after = f"after sample {last!r}" if last else "before its first good sample"
            bad(f"{shard}: corrupt or truncated tar {after} ({_one_line(e)})")
            return
        if key is not None:  # complete unless a header of its own was lost: decode_sample counts its images
            yield from emit(key, members)
        if problem is not None:
            size = f.seek(0, os.SEEK_END)
            keys = _keys_after(f, end)
            lost = [k for k in keys if k != key]
            after = f"after sample {last!r}" if last else "before its first good sample"
            names = ", ".join(repr(k) for k in lost[:3]) + (", ..." if len(lost) > 3 else "")
            held = (f"members of at least {len(lost)} more sample(s) ({names})" if lost
                    else "no sample header that can be found")
            bad(f"{shard}: corrupt or truncated tar {after}: {problem}; the last {size - end} bytes are not read, "
                f"they hold {held}", max(1, len(lost)))
            return
        if n_members == 0:
            bad(f"{shard}: has no samples")


def iter_samples(paths, on_bad: str = "raise", stats: dict | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """Every sample of every shard ``shard_urls`` finds for each of ``paths``, in order."""
    stats = _new_stats(stats)
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        for url in shard_urls(p):
            yield from iter_shard(url, on_bad, stats, max_pixels)
