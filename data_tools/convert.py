"""Converters from common data formats to mmdistill sample records, and the shard writing they share.

Each ``from_*`` function yields sample dicts (see :mod:`mmdistill.shards` for the record); the
``python -m data_tools`` subcommands write them as shards with :func:`write_shards`. Every
converter

* is deterministic: the same input gives the same samples in the same order, so the same shards
  byte for byte;
* never drops a record silently: a bad one raises a one-line :class:`ConvertError` naming the
  file and line (or row, or record id); with ``BadRecords("skip")`` it is skipped and counted;
* stamps ``split``, ``domain`` and ``stage`` (default 0) on every sample, overriding the source.

Sources:

* chat JSONL (:func:`from_chat_jsonl`): ShareGPT ``{"conversations": [{"from", "value"}]}`` or
  OpenAI ``{"messages": [{"role", "content"}]}`` lines;
* LLaVA JSON (:func:`from_llava_json`): a list of ``{"id", "image", "conversations"}`` with
  ``<image>`` placeholders;
* a Hugging Face dataset saved with ``save_to_disk``, or parquet (:func:`from_hf_disk`);
* reasoning-gym tasks (:func:`from_reasoning_gym`), with worked solutions for
  :data:`REASONING_GYM_WITH_SOLUTIONS`;
* the procedural scenes task (:func:`from_scenes`, :func:`write_scenes_suite`).

The ``datasets`` and ``reasoning-gym`` packages are optional (``pip install 'mmdistill[data]'``);
only the converters that need them import them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mmdistill.shards import ShardError, ShardWriter, sample_key
from mmdistill.tasks import SPLIT_BUCKETS, split_of_key

IMAGE_TOKEN = "<image>"
DEFAULT_CHECKER = "exact"
# Fields a source record (or a dataset column of the same name) may carry into the sample.
PRIVILEGED_FIELDS = ("hint", "reasoning", "answer", "boxes")
SAMPLE_FIELDS = ("id", "prompt", "messages", "system", "hint", "reasoning", "answer", "response", "boxes",
                 "images", "teacher_images", "task", "checker")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
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


def _samples_only(records: Located) -> Iterator[dict]:
    for _, sample in records:
        yield sample


def _stamp(sample: dict, split: str, domain: str, stage: int) -> dict:
    sample.update(split=split, domain=domain, stage=stage)
    return sample


def _check_stamp(split: str, domain: str, stage: int) -> None:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise ValueError(f"stage must be an int >= 0, got {stage!r}")


def _unique(records: Located, bad: BadRecords) -> Located:
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


def _guarded(make: Callable[[], dict], where: str, bad: BadRecords) -> dict | None:
    """One record's conversion; its ConvertError goes to ``bad`` (raise or count)."""
    try:
        return make()
    except ConvertError as e:
        bad.reject(str(e) if str(e).startswith(where) else f"{where}: {e}")
        return None


# --- chat turns -------------------------------------------------------------------------------

def _turns(rec: dict, where: str) -> list[dict]:
    """ShareGPT or OpenAI turns as ``{"role", "content"}`` with roles user/assistant/system; each
    turn may be either style (``{"from", "value"}`` or ``{"role", "content"}``)."""
    raw = rec.get("conversations", rec.get("messages"))
    if not isinstance(raw, list):
        raise ConvertError(f"{where}: needs a 'conversations' (ShareGPT) or 'messages' (OpenAI) list")
    turns = []
    for i, t in enumerate(raw):
        role = _first(t, "from", "role")
        content = _first(t, "value", "content")
        if role is None or content is None:
            raise ConvertError(f"{where}: turn {i} must be a dict with 'from' and 'value' (or 'role' and 'content')")
        if _ROLES.get(str(role).lower()) is None:
            raise ConvertError(f"{where}: turn {i} has unknown role {role!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(content, (str, list)):
            raise ConvertError(f"{where}: turn {i} content must be a string or a list of parts, "
                               f"got {type(content).__name__}")
        if isinstance(content, list):  # arrow structs fill absent keys with None
            content = [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p for p in content]
        turns.append({"role": _ROLES[str(role).lower()], "content": content})
    return turns


def _first(turn, *keys):
    """The first of ``keys`` the turn holds a value for (a dataset row holds every key, some None)."""
    if not isinstance(turn, dict):
        return None
    return next((turn[k] for k in keys if turn.get(k) is not None), None)


def _text_of(content, where: str) -> str:
    """A turn's text; the response must be plain text, so image parts there are an error."""
    if isinstance(content, str):
        return content
    parts = [p for p in content if isinstance(p, dict)]
    if len(parts) != len(content) or any(p.get("type") != "text" for p in parts):
        raise ConvertError(f"{where}: the final assistant turn must be text only")
    return "".join(str(p.get("text", "")) for p in parts)


def _split_chat(turns: list[dict], where: str) -> tuple[str | None, list[dict], str]:
    """(system, prompt turns, response): leading system turns become ``system`` (the adapter
    inserts it), the last turn must be the assistant's and the one before it the user's."""
    system = []
    while turns and turns[0]["role"] == "system":
        system.append(_text_of(turns.pop(0)["content"], where))
    if any(t["role"] == "system" for t in turns):
        raise ConvertError(f"{where}: a system turn may only come first")
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        roles = ", ".join(t["role"] for t in turns) or "none"
        raise ConvertError(f"{where}: needs a user turn then a final assistant turn (roles: {roles})")
    response = _text_of(turns[-1]["content"], where)
    if not response.strip():
        raise ConvertError(f"{where}: the final assistant turn is empty")
    return ("\n".join(system) or None), turns[:-1], response


def _image_parts(text: str) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> image and text parts, in order, whitespace trimmed."""
    parts = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip()})
    return parts


def _place_images(turns: list[dict], n_images: int, where: str) -> list[dict]:
    """Each ``<image>`` placeholder becomes an image part where it stood. Without placeholders
    the text stays as it is (the vision adapter puts images before the first user turn)."""
    counts = [t["content"].count(IMAGE_TOKEN) if isinstance(t["content"], str) else
              sum(isinstance(p, dict) and p.get("type") == "image" for p in t["content"]) for t in turns]
    total = sum(counts)
    if total == 0:
        return turns
    if total != n_images:
        raise ConvertError(f"{where}: {total} image placeholder(s) for {n_images} image(s)")
    out = []
    for t, n in zip(turns, counts):
        if n and t["role"] != "user":
            raise ConvertError(f"{where}: an image placeholder in a {t['role']} turn (only user turns may hold images)")
        out.append({**t, "content": _image_parts(t["content"])} if n and isinstance(t["content"], str) else t)
    return out


def _answer_of(response: str) -> str:
    """The checked answer when the record has none: what follows "Answer:" (the project's
    response format), else the whole response."""
    from mmdistill.tasks.arith import extract_answer

    return extract_answer(response) or response.strip()


def _image_paths(value, root: Path, where: str, field: str) -> list[str]:
    """Paths of a record's images, relative to ``root``; a missing file names record and path."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise ConvertError(f"{where}: {field!r} must be a path or a list of paths, got {value!r}")
    paths = []
    for rel in items:
        p = root / rel
        if not p.is_file():
            raise ConvertError(f"{where}: {field} file {rel!r} not found (looked for {p})")
        paths.append(str(p))
    return paths


def _chat_sample(rec: dict, where: str, root: Path, default_id: str, checker: str) -> dict:
    """A sample from one chat record: the prompt turns, the final assistant turn as response,
    privileged fields and images carried over."""
    if not isinstance(rec, dict):
        raise ConvertError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    system, prompt_turns, response = _split_chat(_turns(rec, where), where)
    images = _image_paths(rec.get("images", rec.get("image")), root, where, "images" if "images" in rec else "image")
    sample: dict[str, Any] = {"id": str(rec["id"]) if rec.get("id") not in (None, "") else default_id}
    if isinstance(rec.get("system"), str):
        system = rec["system"] if system is None else rec["system"] + "\n" + system
    if system:
        sample["system"] = system
    sample["messages"] = _place_images(prompt_turns, len(images), where)
    for key in PRIVILEGED_FIELDS + ("task",):
        if rec.get(key) is not None:
            sample[key] = rec[key]
    if isinstance(sample.get("answer"), (int, float)) and not isinstance(sample["answer"], bool):
        sample["answer"] = str(sample["answer"])
    sample.setdefault("answer", _answer_of(response))
    sample["response"] = response
    sample["checker"] = rec.get("checker", checker)
    if images:
        sample["images"] = images
    teacher = _image_paths(rec.get("teacher_images"), root, where, "teacher_images")
    if teacher:
        sample["teacher_images"] = teacher
    return sample


# --- 1. chat JSONL ----------------------------------------------------------------------------

def chat_jsonl_records(path, split: str = "train", domain: str = "chat", *, image_root=None, stage: int = 0,
                       checker: str = DEFAULT_CHECKER, bad: BadRecords | None = None) -> Located:
    """(where, sample) pairs of :func:`from_chat_jsonl`; ``where`` is ``file:line``."""
    _check_stamp(split, domain, stage)
    bad = bad or BadRecords()
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent

    def lines() -> Located:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line is not a record
                where = f"{path}:{n}"
                sample = _guarded(lambda: _chat_line(line, where, root, f"{path.name}:{n}", checker), where, bad)
                if sample is not None:
                    yield where, _stamp(sample, split, domain, stage)

    yield from _unique(lines(), bad)


def _chat_line(line: str, where: str, root: Path, default_id: str, checker: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    return _chat_sample(rec, where, root, default_id, checker)


def from_chat_jsonl(path, split: str = "train", domain: str = "chat", **kwargs) -> Iterator[dict]:
    """Samples from a chat JSONL file, ShareGPT (``{"conversations": [{"from": "human"|"gpt"|
    "system", "value"}]}``) or OpenAI (``{"messages": [{"role", "content"}]}``) per line.

    The last turn (the assistant's) becomes ``response``, the turns before it ``messages`` (leading
    system turns become ``system``); ``hint``, ``reasoning``, ``answer``, ``boxes``, ``task`` and
    ``checker`` are taken from the record when present (the answer defaults to what follows
    "Answer:" in the response, else the whole response). ``images`` / ``image`` (and
    ``teacher_images``) are paths relative to the file, or to ``image_root``; ``<image>``
    placeholders in user turns become image parts. The id defaults to ``name.jsonl:LINE``.
    Keyword options: ``image_root``, ``stage``, ``checker`` (default for records without one),
    ``bad`` (:class:`BadRecords`).
    """
    return _samples_only(chat_jsonl_records(path, split, domain, **kwargs))


# --- 2. LLaVA JSON ----------------------------------------------------------------------------

def llava_records(path, image_root=None, split: str = "train", domain: str = "llava", *, stage: int = 0,
                  checker: str = DEFAULT_CHECKER, bad: BadRecords | None = None) -> Located:
    """(where, sample) pairs of :func:`from_llava_json`; ``where`` is ``file[index] (id ...)``."""
    _check_stamp(split, domain, stage)
    bad = bad or BadRecords()
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ConvertError(f"{path}: a LLaVA file holds a JSON list of records, got {type(data).__name__}")

    def records() -> Located:
        for i, rec in enumerate(data):
            rid = rec.get("id") if isinstance(rec, dict) else None
            where = f"{path}[{i}]" + (f" (id {rid!r})" if rid is not None else "")
            sample = _guarded(lambda: _chat_sample(rec, where, root, f"{path.stem}-{i}", checker), where, bad)
            if sample is not None:
                yield where, _stamp(sample, split, domain, stage)

    yield from _unique(records(), bad)


def from_llava_json(path, image_root=None, split: str = "train", domain: str = "llava", **kwargs) -> Iterator[dict]:
    """Samples from a LLaVA-style JSON list: ``{"id", "image": "rel/path.jpg", "conversations":
    [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "answer"}]}``.

    ``<image>`` placeholders are cut from the text and become image parts (``{"type": "image"}``
    next to ``{"type": "text", ...}``) in the turn where they stood; the image path is relative to
    ``image_root`` (default: the JSON file's folder) and a missing file is an error naming the
    record id and path. Multi-turn records keep the earlier turns in ``messages``; ``image`` may
    also be a list, records without one are text-only. Otherwise as :func:`from_chat_jsonl`.
    """
    return _samples_only(llava_records(path, image_root, split, domain, **kwargs))


# --- 3. Hugging Face datasets on disk / parquet -----------------------------------------------

def _need_datasets():
    try:
        import datasets
    except ImportError:
        raise ConvertError("reading Hugging Face datasets needs the 'datasets' package: "
                           "pip install 'mmdistill[data]'") from None
    return datasets


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"prompt=question,answer=label"`` -> ``{"prompt": "question", "answer": "label"}``."""
    mapping: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        target, eq, column = item.partition("=")
        target, column = target.strip(), column.strip()
        if not eq or not target or not column:
            raise ValueError(f"--map entry {item!r} is not FIELD=COLUMN")
        if target not in SAMPLE_FIELDS:
            raise ValueError(f"--map: {target!r} is not a sample field; expected one of {SAMPLE_FIELDS}")
        if target in mapping:
            raise ValueError(f"--map: {target!r} is mapped twice")
        mapping[target] = column
    return mapping


def _hf_tables(path: Path, source_split: str | None):
    """(features, iterator of pyarrow batches): a ``save_to_disk`` folder (a Dataset, or one
    split of a DatasetDict) or parquet files, read without writing any cache."""
    datasets = _need_datasets()
    import pyarrow.parquet as pq

    saved = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
    if (path.is_file() and path.suffix == ".parquet") or (path.is_dir() and not saved):
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not files:
            raise ConvertError(f"{path}: no .parquet files and no save_to_disk dataset here")
        features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        return features, (b for f in files for b in pq.ParquetFile(f).iter_batches(batch_size=256))
    if not path.exists():
        raise ConvertError(f"{path}: no such dataset directory or parquet file")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if source_split not in ds:
            raise ConvertError(f"{path}: a DatasetDict with splits {sorted(ds)}; pick one with "
                               f"--source-split (got {source_split!r})")
        ds = ds[source_split]
    return ds.features, ds.with_format("arrow").iter(batch_size=256)


def _is_image_feature(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    inner = getattr(feature, "feature", None)  # Sequence / List of images
    return inner is not None and isinstance(inner, datasets.Image)


def _image_value(value, root: Path, where: str, field: str) -> list:
    """An image column's cell as a list the shard writer takes: arrow image structs
    ``{bytes, path}`` keep their bytes; a bare path is relative to the dataset."""
    items = value if isinstance(value, list) else [value]
    out = []
    for i, v in enumerate(items):
        if isinstance(v, dict):  # an image struct: its bytes, else its path
            v = v.get("bytes") if v.get("bytes") is not None else v.get("path")
        if isinstance(v, (bytes, bytearray)):
            out.append(bytes(v))
        elif isinstance(v, str) and v:
            p = root / v
            if not p.is_file():
                raise ConvertError(f"{where}: {field}[{i}] file {v!r} not found (looked for {p})")
            out.append(str(p))
        else:
            raise ConvertError(f"{where}: {field}[{i}] is not an image (bytes, path or image struct), "
                               f"got {type(v).__name__}")
    return out


def _text_value(value, feature, where: str, field: str):
    """A scalar cell as text: a ClassLabel index becomes its name, numbers their string."""
    import datasets

    if value is None:
        return None
    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
        return feature.int2str(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConvertError(f"{where}: column for {field!r} holds {type(value).__name__}, expected text")
    return str(value) if not isinstance(value, str) else value


def _hf_sample(row: dict, columns: dict[str, str], features, root: Path, where: str, default_id: str,
               checker: str) -> dict:
    sample: dict[str, Any] = {}
    for target, column in columns.items():
        value, feature = row[column], features.get(column)
        if value is None:
            continue
        if target in ("images", "teacher_images"):
            sample[target] = _image_value(value, root, where, target)
        elif target in ("messages", "boxes"):
            sample[target] = value
        else:
            sample[target] = _text_value(value, feature, where, target)
    sample["id"] = sample.get("id") or default_id
    if "messages" in sample and "response" not in sample:
        system, turns, response = _split_chat(_turns({"messages": sample["messages"]}, where), where)
        sample["messages"], sample["response"] = turns, response
        if system and "system" not in sample:
            sample["system"] = system
    elif "messages" in sample:
        sample["messages"] = _turns({"messages": sample["messages"]}, where)
    if "prompt" not in sample and "messages" not in sample:
        raise ConvertError(f"{where}: no 'prompt' or 'messages' (columns: {', '.join(row)}); "
                           "map one with --map prompt=COLUMN")
    if "answer" not in sample and "response" in sample:
        sample["answer"] = _answer_of(sample["response"])
    if "response" not in sample and "answer" in sample:
        sample["response"] = (sample["reasoning"] + "\n" if sample.get("reasoning") else "") + "Answer: " + sample["answer"]
    sample.setdefault("checker", checker)
    return sample


def hf_disk_records(path, split: str = "train", mapping: dict[str, str] | str | None = None, *,
                    domain: str = "hf", source_split: str | None = None, stage: int = 0,
                    checker: str = DEFAULT_CHECKER, bad: BadRecords | None = None) -> Located:
    """(where, sample) pairs of :func:`from_hf_disk`; ``where`` is ``path row N``."""
    _check_stamp(split, domain, stage)
    bad = bad or BadRecords()
    path = Path(path)
    mapping = parse_mapping(mapping) if isinstance(mapping, str) or mapping is None else dict(mapping)
    features, batches = _hf_tables(path, source_split or split)
    missing = sorted(c for c in mapping.values() if c not in features)
    if missing:
        raise ConvertError(f"{path}: --map names column(s) {missing} not in the dataset (columns: {', '.join(features)})")
    columns = {f: f for f in SAMPLE_FIELDS if f in features and f not in mapping} | mapping
    for target, column in columns.items():
        if _is_image_feature(features[column]) and target not in ("images", "teacher_images"):
            raise ConvertError(f"{path}: column {column!r} holds images; map it to images or teacher_images")
    root = path if path.is_dir() else path.parent

    def rows() -> Located:
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                where = f"{path} row {n}"
                sample = _guarded(lambda: _hf_sample(row, columns, features, root, where,
                                                     f"{path.stem}-{split}-{n}", checker), where, bad)
                if sample is not None:
                    yield where, _stamp(sample, split, domain, stage)
                n += 1

    yield from _unique(rows(), bad)


def from_hf_disk(path, split: str = "train", mapping: dict[str, str] | str | None = None, **kwargs) -> Iterator[dict]:
    """Samples from a Hugging Face dataset saved with ``save_to_disk`` (a Dataset, or the
    ``source_split`` (default: ``split``) of a DatasetDict) or from a parquet file or folder of
    parquet files (read in sorted order).

    Columns named like sample fields (``prompt``, ``answer``, ``hint``, ``images``, ...) are taken
    as they are; ``mapping`` (``{"prompt": "question"}`` or ``"prompt=question,answer=label"``)
    maps others. Image columns (the ``datasets.Image`` feature, single or a list) keep their
    encoded bytes; ClassLabel columns give their label names. A ``messages`` column ending with
    the assistant's turn gives ``response`` as in :func:`from_chat_jsonl`; without a response
    one is built from ``reasoning`` and ``answer`` ("Answer: ..."). Unmapped columns are not
    carried over. Needs the ``datasets`` package.
    """
    return _samples_only(hf_disk_records(path, split, mapping, **kwargs))


# --- 4. reasoning-gym -------------------------------------------------------------------------
# Each solver turns an entry into (hint, reasoning) from its metadata, and checks that its
# worked solution ends on the package's answer, so a wrong solution is never stored.

def _same_number(a, b) -> bool:
    try:
        return float(str(a).replace(",", "").strip()) == float(str(b).replace(",", "").strip())
    except ValueError:
        return False


def _rg_gsm_symbolic(entry: dict) -> tuple[str, str]:
    """gsm_symbolic: ``metadata["answer_cot"]``, the package's own step-by-step solution (its
    ``#### N`` line dropped) is the reasoning; its first computing step the hint."""
    cot = entry["metadata"]["answer_cot"]
    lines = [ln.strip() for ln in cot.splitlines() if ln.strip()]
    final = [ln for ln in lines if ln.startswith("####")]
    steps = [ln for ln in lines if not ln.startswith("####")]
    if not final or not _same_number(final[-1][4:], entry["answer"]):
        raise ConvertError(f"answer_cot does not end on '#### {entry['answer']}'")
    computing = [ln for ln in steps if re.search(r"\d", ln)]
    hint = computing[0] if len(computing) > 1 else "Work out each quantity the question mentions, one at a time."
    return hint, "\n".join(steps)


def _rg_chain_sum(entry: dict) -> tuple[str, str]:
    """chain_sum: ``metadata["expression"]`` evaluated left to right, one running total per step."""
    tokens = entry["metadata"]["expression"].split()
    total, steps = int(tokens[0]), []
    for op, value in zip(tokens[1::2], tokens[2::2]):
        new = total + int(value) if op == "+" else total - int(value)
        steps.append(f"{total} {op} {value} = {new}")
        total = new
    if str(total) != str(entry["answer"]):
        raise ConvertError(f"chain_sum: running total {total} != answer {entry['answer']!r}")
    return f"Start from {tokens[0]} and apply each + or - in turn, left to right.", "\n".join(steps)


def _rg_leg_counting(entry: dict) -> tuple[str, str]:
    """leg_counting: ``metadata["animals"]`` (name -> count) times the package's legs table
    (``reasoning_gym.arithmetic.leg_counting.ANIMALS``); the hint lists legs per animal."""
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry["metadata"]["animals"]
    per = {a: ANIMALS[a] for a in animals}
    steps = [f"{n} {a} x {per[a]} legs = {n * per[a]}" for a, n in animals.items()]
    products = [n * per[a] for a, n in animals.items()]
    total = sum(products)
    if str(total) != str(entry["answer"]):
        raise ConvertError(f"leg_counting: total {total} != answer {entry['answer']!r}")
    steps.append(" + ".join(map(str, products)) + f" = {total}")
    hint = "Legs per animal: " + ", ".join(f"{a} {per[a]}" for a in animals) + ". Multiply by each count and add."
    return hint, "\n".join(steps)


def _rg_fraction_simplification(entry: dict) -> tuple[str, str]:
    """fraction_simplification: the GCD of ``numerator`` and ``denominator`` (metadata), and the
    two divisions, checked against ``simplified_numerator`` / ``simplified_denominator``."""
    m = entry["metadata"]
    num, den = m["numerator"], m["denominator"]
    g = math.gcd(num, den)
    if (num // g, den // g) != (m["simplified_numerator"], m["simplified_denominator"]):
        raise ConvertError(f"fraction_simplification: {num}/{den} over gcd {g} is not the stored answer")
    reasoning = (f"gcd({num}, {den}) = {g}\n{num} / {g} = {num // g}\n{den} / {g} = {den // g}\n"
                 f"So {num}/{den} = {num // g}/{den // g}.")
    return "Divide the numerator and the denominator by their greatest common divisor.", reasoning


def _digit(d: int) -> str:
    return str(d) if d < 10 else chr(ord("a") + d - 10)


def _rg_base_conversion(entry: dict) -> tuple[str, str]:
    """base_conversion: ``source_repr`` expanded to ``decimal_value`` (metadata), then repeated
    division by ``target_base``, remainders read from last to first."""
    m = entry["metadata"]
    src, sb, tb, value = m["source_repr"], m["source_base"], m["target_base"], m["decimal_value"]
    terms = [f"{int(c, 36)}*{sb}^{len(src) - 1 - i}" for i, c in enumerate(src)]
    if int(src, sb) != value:
        raise ConvertError(f"base_conversion: {src} in base {sb} is not {value}")
    steps = [f"{src} in base {sb} = {' + '.join(terms)} = {value} in base 10"]
    n, digits = value, []
    while True:
        q, r = divmod(n, tb)
        steps.append(f"{n} / {tb} = {q} remainder {r}" + (f" ({_digit(r)})" if r > 9 else ""))
        digits.append(_digit(r))
        n = q
        if n == 0:
            break
    result = "".join(reversed(digits))
    if result != str(entry["answer"]):
        raise ConvertError(f"base_conversion: got {result!r}, answer {entry['answer']!r}")
    steps.append(f"Reading the remainders from last to first: {result}")
    hint = f"First convert {src} from base {sb} to base 10, then divide by {tb} repeatedly and read the remainders backwards."
    return hint, "\n".join(steps)


_RG_SOLVERS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "gsm_symbolic": _rg_gsm_symbolic,
    "chain_sum": _rg_chain_sum,
    "leg_counting": _rg_leg_counting,
    "fraction_simplification": _rg_fraction_simplification,
    "base_conversion": _rg_base_conversion,
}
# reasoning-gym tasks whose samples get a hint and a worked solution (`reasoning`); any other
# task converts too, with "Answer: ..." as its response and no hint or reasoning.
REASONING_GYM_WITH_SOLUTIONS = tuple(_RG_SOLVERS)


def _need_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ConvertError("reasoning-gym tasks need the 'reasoning-gym' package: "
                           "pip install 'mmdistill[data]'") from None
    return reasoning_gym


def _jsonable(value):
    """Metadata as JSON keeps it (the shard record is JSON): fractions and other values become
    strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    return str(value) if isinstance(value, Fraction) else repr(value)


def _self_scores(ds, entry: dict) -> bool:
    """Whether the package rewards its own answer: a few entries it makes cannot be (base_conversion
    of 0 has an empty answer; gsm_symbolic's scorer misreads negative answers), so none is drawn."""
    answer = entry.get("answer")
    return isinstance(answer, str) and bool(answer.strip()) and ds.score_answer(answer, entry) == 1.0


def _rg_sample(task: str, entry: dict, sample_id: str) -> dict:
    answer = entry.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ConvertError(f"has no answer ({answer!r}); this task cannot be checked against one answer")
    sample = {"id": sample_id, "task": task, "prompt": entry["question"], "answer": answer,
              "checker": f"reasoning_gym:{task}"}
    solver = _RG_SOLVERS.get(task)
    if solver is not None:
        sample["hint"], sample["reasoning"] = solver(entry)
        sample["response"] = sample["reasoning"] + "\nAnswer: " + answer
    else:
        sample["response"] = "Answer: " + answer
    sample["rg_entry"] = {"question": entry["question"], "answer": answer,
                          "metadata": _jsonable(entry.get("metadata", {}))}
    return sample


def reasoning_gym_records(task: str, n: int, seed: int = 0, split: str = "train", *, domain: str = "reasoning_gym",
                          stage: int = 0, bad: BadRecords | None = None, **config) -> Located:
    """(where, sample) pairs of :func:`from_reasoning_gym`; ``where`` names task, seed and index."""
    _check_stamp(split, domain, stage)
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"reasoning-gym split must be one of {sorted(SPLIT_BUCKETS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bad = bad or BadRecords()
    rg = _need_reasoning_gym()
    budget = 20 * n + 1000  # entries drawn at most; the test split keeps ~1 in 10
    try:
        ds = rg.create_dataset(task, size=budget, seed=seed * 1_000_003, **config)
    except Exception as e:  # noqa: BLE001 - unknown task or config: one line, not the package's traceback
        raise ConvertError(f"reasoning-gym task {task!r}: cannot create it ({type(e).__name__}: {e})") from None

    def entries() -> Located:
        seen: set[str] = set()
        made = 0
        for idx in range(budget):
            if made == n:
                return
            entry = ds[idx]
            question = entry["question"]
            if split_of_key(f"rg|{question}") != split or question in seen or not _self_scores(ds, entry):
                continue
            seen.add(question)
            where = f"reasoning_gym {task} seed {seed} entry {idx}"
            sample = _guarded(lambda: _rg_sample(task, entry, f"rg-{task}-{split}-{seed}-{made}"), where, bad)
            made += 1
            if sample is not None:
                yield where, _stamp(sample, split, domain, stage)
        if made < n:
            raise ConvertError(f"reasoning-gym task {task!r}: only {made} distinct {split} questions "
                               f"among {budget} entries, {n} asked")

    yield from _unique(entries(), bad)


def from_reasoning_gym(task: str, n: int, seed: int = 0, split: str = "train", **kwargs) -> Iterator[dict]:
    """``n`` samples of a reasoning-gym task: ``prompt`` = the question, ``answer``, ``checker``
    = ``"reasoning_gym:<task>"``, the entry under ``rg_entry`` (question, answer, metadata as
    JSON) for :func:`reasoning_gym_score`, and for :data:`REASONING_GYM_WITH_SOLUTIONS` a
    ``hint`` and a worked solution as ``reasoning`` (``response`` = reasoning + "\\nAnswer: " +
    answer; otherwise just "Answer: " + answer).

    Splits never share a question: each question is hashed into 10 buckets (test 0, val 1,
    train 2-9, as the scenes task) and only the asked split's are kept, distinct; entries the
    package's own scorer does not give 1.0 for their own answer are not drawn. The package
    seeds entry i with ``seed + i``, so the package seed is ``seed * 1_000_003`` to keep
    neighbouring seeds from sharing entries. Extra keyword arguments go to the task's config.
    """
    return _samples_only(reasoning_gym_records(task, n, seed, split, **kwargs))


@functools.lru_cache(maxsize=None)
def _rg_scorer(task: str):
    return _need_reasoning_gym().create_dataset(task, size=1, seed=0)


def _final_answer(text: str, oracle: str) -> str:
    """The model's answer: the text after the last "Answer:" (its first line unless the oracle
    answer spans lines), else the whole text."""
    pos = text.rfind("Answer:")
    rest = (text[pos + len("Answer:"):] if pos >= 0 else text).strip()
    return rest if "\n" in oracle.strip() else (rest.splitlines() or [""])[0].strip()


def reasoning_gym_score(task: str, answer_text: str, entry_or_answer) -> float:
    """The package's own score (``dataset.score_answer``, 1.0 = correct) of a model's text.

    ``entry_or_answer`` is a stored sample (its ``rg_entry`` is used), a reasoning-gym entry, or
    the bare oracle answer (enough for tasks that score against ``entry["answer"]`` alone, like
    all of :data:`REASONING_GYM_WITH_SOLUTIONS` but fraction_simplification, which reads its
    metadata).
    """
    entry = entry_or_answer
    if isinstance(entry, dict) and isinstance(entry.get("rg_entry"), dict):
        entry = entry["rg_entry"]
    if not isinstance(entry, dict):
        entry = {"answer": str(entry), "metadata": {}}
    got = _final_answer(answer_text or "", str(entry.get("answer", "")))
    return float(_rg_scorer(task).score_answer(got, entry))


# --- 5. procedural scenes ---------------------------------------------------------------------

def scenes_records(n: int, seed: int = 0, split: str = "train", *, stage: int = 0, id_prefix: str = "",
                   **knobs) -> Located:
    """(where, sample) pairs of :func:`from_scenes`."""
    from mmdistill.tasks import scenes

    _check_stamp(split, scenes.DOMAIN, stage)
    for s in scenes.make_samples(n, seed, split, **knobs):
        s = dict(s, id=id_prefix + s["id"], checker="scenes",
                 boxes=[dict(b, image=0) for b in s["boxes"]])
        yield f"scenes {s['id']}", _stamp(s, split, scenes.DOMAIN, stage)


def from_scenes(n: int, seed: int = 0, split: str = "train", **kwargs) -> Iterator[dict]:
    """:func:`mmdistill.tasks.scenes.make_samples` as stamped samples: ``checker="scenes"``,
    ``stage``, boxes with their ``image`` index, ids prefixed with ``id_prefix``. Other keyword
    arguments are make_samples' knobs (image_size, min/max_objects, question_types, colors,
    shapes, exclude_combos, only_combos)."""
    return _samples_only(scenes_records(n, seed, split, **kwargs))


HELD_OUT_COMBOS = ("red circle", "green square", "blue triangle")  # every colour and shape still seen in train
CL_STAGES = ("count", "attribute", "spatial")  # cl_stage1, 2, 3


@dataclass
class SuiteSizes:
    """Samples per part of the scenes suite (small by default: a smoke-sized benchmark)."""

    train: int = 1000
    test: int = 200
    ood: int = 200  # each of ood_objects and ood_combos
    cl_train: int = 300  # per continual-learning stage
    cl_test: int = 100


def scenes_suite_parts(seed: int, sizes: SuiteSizes, *, image_size: int = 64,
                       held_out=HELD_OUT_COMBOS, ood_objects=(5, 7), max_objects: int = 4) -> list[tuple[str, Located]]:
    """(folder, records) per part of the benchmark layout; see :func:`write_scenes_suite`."""
    held_out = list(held_out)
    base = {"image_size": image_size, "max_objects": max_objects, "exclude_combos": held_out}
    lo, hi = ood_objects
    parts = [
        ("train", scenes_records(sizes.train, seed, "train", id_prefix="train-", **base)),
        ("test", scenes_records(sizes.test, seed, "test", id_prefix="test-", **base)),
        ("ood_objects", scenes_records(sizes.ood, seed, "test", id_prefix="ood_objects-",
                                       **dict(base, min_objects=lo, max_objects=hi))),
        ("ood_combos", scenes_records(sizes.ood, seed, "test", id_prefix="ood_combos-", image_size=image_size,
                                      max_objects=max_objects, only_combos=held_out)),
    ]
    for stage, qtype in enumerate(CL_STAGES, 1):
        for split, n in (("train", sizes.cl_train), ("test", sizes.cl_test)):
            parts.append((f"cl_stage{stage}/{split}",
                          scenes_records(n, seed, split, stage=stage, id_prefix=f"cl_stage{stage}-",
                                         question_types=(qtype,), **base)))
    return parts


def write_scenes_suite(out_dir, seed: int = 0, sizes: SuiteSizes | None = None, *, image_size: int = 64,
                       held_out=HELD_OUT_COMBOS, ood_objects=(5, 7), max_objects: int = 4,
                       max_bytes: int = 64 * 2**20, max_count: int = 10_000, overwrite: bool = False) -> dict:
    """The scenes benchmark in one go, deterministic for ``seed``; each folder a shard dataset:

    * ``train`` / ``test``: in distribution (1..max_objects objects, every question type), the
      ``held_out`` colour-shape pairs never drawn;
    * ``ood_objects``: test images with more objects (``ood_objects``, default 5-7);
    * ``ood_combos``: test images made only of the held-out pairs;
    * ``cl_stage1`` / ``2`` / ``3`` (each with ``train`` and ``test``): count, then attribute,
      then spatial questions, stamped ``stage`` 1, 2, 3, for continual learning.

    Writes ``out_dir/suite.json`` (the parameters and counts per part) and returns it.
    """
    sizes = sizes or SuiteSizes()
    meta = {"converter": "scenes-suite", "seed": seed, "image_size": image_size, "held_out": list(held_out),
            "ood_objects": list(ood_objects), "max_objects": max_objects, "sizes": vars(sizes)}
    counts = {}
    for name, records in scenes_suite_parts(seed, sizes, image_size=image_size, held_out=held_out,
                                            ood_objects=ood_objects, max_objects=max_objects):
        manifest = write_shards(records, Path(out_dir) / name, max_bytes=max_bytes, max_count=max_count,
                                meta=dict(meta, part=name), overwrite=overwrite)
        counts[name] = manifest["total"]
    suite = dict(meta, parts=counts)
    with open(Path(out_dir) / "suite.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(suite, f, indent=2, sort_keys=True)
        f.write("\n")
    return suite


# --- writing ----------------------------------------------------------------------------------

def write_shards(records: Iterable[tuple[str, dict]], out_dir, *, prefix: str = "shard", max_bytes: int = 64 * 2**20,
                 max_count: int = 10_000, meta: dict | None = None, overwrite: bool = False,
                 bad: BadRecords | None = None) -> dict:
    """Write (where, sample) records as shards and return the manifest. A sample the shard
    writer refuses (a field of the wrong type, an image that will not decode, a box outside
    its image) is a bad record named by its source; on any raised error no manifest is
    written, so a failed build never looks complete."""
    bad = bad or BadRecords()
    with ShardWriter(out_dir, prefix=prefix, max_bytes=max_bytes, max_count=max_count, meta=meta,
                     overwrite=overwrite) as writer:
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
