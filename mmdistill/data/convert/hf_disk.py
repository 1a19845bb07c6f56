"""A Hugging Face dataset saved with `save_to_disk`, or parquet, as samples (needs `datasets`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mmdistill.data.convert.chat import answer_of, chat_turns, split_chat
from mmdistill.data.convert.common import (
    DEFAULT_CHECKER,
    SAMPLE_FIELDS,
    BadRecords,
    ConvertError,
    Located,
    check_stamp,
    guarded,
    image_under,
    samples_only,
    stamp,
    unique,
)

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
            out.append(image_under(root, v, where, f"{field}[{i}]"))
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
        system, turns, response = split_chat(chat_turns({"messages": sample["messages"]}, where), where)
        sample["messages"], sample["response"] = turns, response
        if system and "system" not in sample:
            sample["system"] = system
    elif "messages" in sample:
        sample["messages"] = chat_turns({"messages": sample["messages"]}, where)
    if "prompt" not in sample and "messages" not in sample:
        raise ConvertError(f"{where}: no 'prompt' or 'messages' (columns: {', '.join(row)}); "
                           "map one with --map prompt=COLUMN")
    if "answer" not in sample and "response" in sample:
        sample["answer"] = answer_of(sample["response"])
    if "response" not in sample and "answer" in sample:
        sample["response"] = ((sample["reasoning"] + "\n" if sample.get("reasoning") else "")
                              + "Answer: " + sample["answer"])
    sample.setdefault("checker", checker)
    return sample


def parse_columns(text: str | list[str] | None) -> list[str]:
    """``"source,url"`` (or a list) -> ``["source", "url"]``: the columns ``--drop`` names."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    return [c.strip() for c in items if c.strip()]


def hf_disk_records(path, split: str = "train", mapping: dict[str, str] | str | None = None, *,
                    domain: str = "hf", source_split: str | None = None, stage: int = 0,
                    checker: str = DEFAULT_CHECKER, bad: BadRecords | None = None,
                    drop: list[str] | str | None = None) -> Located:
    """(where, sample) pairs of :func:`from_hf_disk`; ``where`` is ``path row N``."""
    check_stamp(split, domain, stage)
    bad = bad or BadRecords()
    path = Path(path)
    mapping = parse_mapping(mapping) if isinstance(mapping, str) or mapping is None else dict(mapping)
    drop = parse_columns(drop)
    features, batches = _hf_tables(path, source_split or split)
    missing = sorted(c for c in mapping.values() if c not in features)
    if missing:
        raise ConvertError(f"{path}: --map names column(s) {missing} not in the dataset "
                           f"(columns: {', '.join(features)})")
    missing = sorted(c for c in drop if c not in features)
    if missing:
        raise ConvertError(f"{path}: --drop names column(s) {missing} not in the dataset "
                           f"(columns: {', '.join(features)})")
    columns = {f: f for f in SAMPLE_FIELDS if f in features and f not in mapping and f not in drop} | mapping
    unused = [c for c in features if c not in columns.values() and c not in drop]
    if unused:  # a column left out silently is data lost silently (a 'solution' column that vanished)
        raise ConvertError(f"{path}: column(s) {', '.join(repr(c) for c in unused)} map to no sample field and would "
                           f"be lost; map them (--map FIELD=COLUMN, fields: {', '.join(SAMPLE_FIELDS)}) or drop them "
                           f"on purpose (--drop {','.join(unused)})")
    for target, column in columns.items():
        if _is_image_feature(features[column]) and target not in ("images", "teacher_images"):
            raise ConvertError(f"{path}: column {column!r} holds images; map it to images or teacher_images")
    root = path if path.is_dir() else path.parent

    def rows() -> Located:
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                where = f"{path} row {n}"
                sample = guarded(lambda: _hf_sample(row, columns, features, root, where,
                                                     f"{path.stem}-{split}-{n}", checker), where, bad)
                if sample is not None:
                    yield where, stamp(sample, split, domain, stage)
                n += 1

    yield from unique(rows(), bad)


def from_hf_disk(path, split: str = "train", mapping: dict[str, str] | str | None = None, **kwargs) -> Iterator[dict]:
    """Samples from a Hugging Face dataset saved with ``save_to_disk`` (a Dataset, or the
    ``source_split`` (default: ``split``) of a DatasetDict) or from a parquet file or folder of
    parquet files (read in sorted order).

    Columns named like sample fields (``prompt``, ``answer``, ``hint``, ``images``, ...) are taken
    as they are; ``mapping`` (``{"prompt": "question"}`` or ``"prompt=question,answer=label"``)
    maps others. Image columns (the ``datasets.Image`` feature, single or a list) keep their
    encoded bytes; ClassLabel columns give their label names. A ``messages`` column ending with
    the assistant's turn gives ``response`` as in :func:`from_chat_jsonl`; without a response
    one is built from ``reasoning`` and ``answer`` ("Answer: ..."). A column that maps to no field
    is an error listing them all, unless ``drop`` (``"source,url"`` or a list) names it: nothing
    is left out unsaid. Needs the ``datasets`` package.
    """
    return samples_only(hf_disk_records(path, split, mapping, **kwargs))


