"""Chat JSONL (ShareGPT or OpenAI style) and LLaVA JSON records as samples."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mmdistill.data.convert.common import (
    DEFAULT_CHECKER,
    IMAGE_TOKEN,
    PRIVILEGED_FIELDS,
    ROLES,
    BadRecords,
    ConvertError,
    Located,
    check_stamp,
    data_file,
    guarded,
    image_under,
    samples_only,
    stamp,
    unique,
)
from mmdistill.data.shards import ShardError, parse_json
from mmdistill.tasks.arith import extract_answer

# --- chat turns -------------------------------------------------------------------------------

def chat_turns(rec: dict, where: str) -> list[dict]:
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
        if ROLES.get(str(role).lower()) is None:
            raise ConvertError(f"{where}: turn {i} has unknown role {role!r} (expected one of {sorted(ROLES)})")
        if not isinstance(content, (str, list)):
            raise ConvertError(f"{where}: turn {i} content must be a string or a list of parts, "
                               f"got {type(content).__name__}")
        if isinstance(content, list):  # arrow structs fill absent keys with None
            content = [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p for p in content]
        turns.append({"role": ROLES[str(role).lower()], "content": content})
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


def split_chat(turns: list[dict], where: str) -> tuple[str | None, list[dict], str]:
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


def answer_of(response: str) -> str:
    """The checked answer when the record has none: what follows "Answer:" (the project's
    response format), else the whole response."""
    return extract_answer(response) or response.strip()


def _image_paths(value, root: Path, where: str, field: str) -> list[str]:
    """Paths of a record's images, relative to ``root`` and inside it (:func:`image_under`); a
    missing file, an absolute path or one leaving the root names record and path."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise ConvertError(f"{where}: {field!r} must be a path or a list of paths, got {value!r:.80}")
    return [image_under(root, rel, where, field) for rel in items]


def _chat_sample(rec: dict, where: str, root: Path, default_id: str, checker: str) -> dict:
    """A sample from one chat record: the prompt turns, the final assistant turn as response,
    privileged fields and images carried over."""
    if not isinstance(rec, dict):
        raise ConvertError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    system, prompt_turns, response = split_chat(chat_turns(rec, where), where)
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
    sample.setdefault("answer", answer_of(response))
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
    check_stamp(split, domain, stage)
    bad = bad or BadRecords()
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent

    def lines() -> Located:
        data_file(path)
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's bad record
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line is not a record
                where = f"{path}:{n}"
                sample = guarded(lambda: _chat_line(line, where, root, f"{path.name}:{n}", checker), where, bad)
                if sample is not None:
                    yield where, stamp(sample, split, domain, stage)

    yield from unique(lines(), bad)


def _chat_line(line: bytes, where: str, root: Path, default_id: str, checker: str) -> dict:
    try:
        rec = parse_json(line.rstrip(b"\r\n"), where, None)  # not UTF-8, not JSON, too deep, too long a number
    except ShardError as e:
        raise ConvertError(str(e)) from None
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
    return samples_only(chat_jsonl_records(path, split, domain, **kwargs))


# --- 2. LLaVA JSON ----------------------------------------------------------------------------

def llava_records(path, image_root=None, split: str = "train", domain: str = "llava", *, stage: int = 0,
                  checker: str = DEFAULT_CHECKER, bad: BadRecords | None = None) -> Located:
    """(where, sample) pairs of :func:`from_llava_json`; ``where`` is ``file[index] (id ...)``."""
    check_stamp(split, domain, stage)
    bad = bad or BadRecords()
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = parse_json(raw, str(path), None)
    except ShardError as e:
        raise ConvertError(str(e)) from None
    if not isinstance(data, list):
        raise ConvertError(f"{path}: a LLaVA file holds a JSON list of records, got {type(data).__name__}")

    def records() -> Located:
        for i, rec in enumerate(data):
            rid = rec.get("id") if isinstance(rec, dict) else None
            where = f"{path}[{i}]" + (f" (id {rid!r})" if rid is not None else "")
            sample = guarded(lambda: _chat_sample(rec, where, root, f"{path.stem}-{i}", checker), where, bad)
            if sample is not None:
                yield where, stamp(sample, split, domain, stage)

    yield from unique(records(), bad)


def from_llava_json(path, image_root=None, split: str = "train", domain: str = "llava", **kwargs) -> Iterator[dict]:
    """Samples from a LLaVA-style JSON list: ``{"id", "image": "rel/path.jpg", "conversations":
    [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "answer"}]}``.

    ``<image>`` placeholders are cut from the text and become image parts (``{"type": "image"}``
    next to ``{"type": "text", ...}``) in the turn where they stood; the image path is relative to
    ``image_root`` (default: the JSON file's folder) and a missing file is an error naming the
    record id and path. Multi-turn records keep the earlier turns in ``messages``; ``image`` may
    also be a list, records without one are text-only. Otherwise as :func:`from_chat_jsonl`.
    """
    return samples_only(llava_records(path, image_root, split, domain, **kwargs))


