"""Sample records: JSONL files of them, and the data.select filter every source applies."""
from __future__ import annotations

import json
from pathlib import Path


def matches(sample: dict, select: dict) -> bool:
    """data.select: every named field equals the value (or is one of a list's values)."""
    return all(sample.get(k) == v or (isinstance(v, (list, tuple)) and sample.get(k) in v) for k, v in select.items())


def read_jsonl(path: str | Path) -> list[dict]:
    """Records with a task (`prompt` or `messages`); every bad line is named, none dropped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not ("prompt" in rec or "messages" in rec):
                raise ValueError(f"{path}:{n}: a record needs a 'prompt' or 'messages' field")
            rec.setdefault("id", f"{Path(path).name}:{n}")
            for key in ("images", "teacher_images"):  # image paths are relative to the file
                if isinstance(rec.get(key), list):
                    rec[key] = [str(Path(path).parent / x) if isinstance(x, str) else x for x in rec[key]]
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no samples")
    return out
