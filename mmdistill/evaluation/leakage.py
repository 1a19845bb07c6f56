"""Privileged-leakage diagnostics: does a student that saw only the input still behave as if it had
seen the teacher's privileged information? :func:`leaked_span` (it copies privileged text) and
:func:`is_shortcut` (it states the answer before any reasoning that could produce it)."""
from __future__ import annotations

import re
from typing import Iterable

from mmdistill.evaluation.checkers import normalize

# --- privileged-leakage diagnostics ---------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")


def _words(text: str | None) -> list[re.Match]:
    return list(_WORD.finditer(text or ""))


def _has_run(haystack: list[str], run: list[str]) -> bool:
    joined = " " + " ".join(haystack) + " "
    return " " + " ".join(run) + " " in joined


def leaked_span(response: str | None, privileged: str | None, prompt: str | None, *, min_words: int = 6) -> str | None:
    """The privileged text the response reproduces that the input does not contain, or None.

    Words are maximal runs of letters and digits, casefolded; everything else (spaces,
    punctuation, symbols) only separates words. A leaked span is a run of at least
    ``min_words`` consecutive words that occurs as a run both in the response and in the
    privileged text, and does not occur as a run in the prompt (the input the student saw).
    Returned: the longest leaked span (the earliest in the response on a tie), as the response
    writes it (from its first word's first character to its last word's last character).
    A span that extends a quotation of the prompt by a single privileged word counts, since
    the run as a whole is not in the prompt.
    """
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}")
    resp_m = _words(response)
    resp = [m.group().casefold() for m in resp_m]
    priv = [m.group().casefold() for m in _words(privileged)]
    prompt_words = [m.group().casefold() for m in _words(prompt)]
    if len(resp) < min_words or len(priv) < min_words:
        return None
    starts: dict[tuple[str, ...], list[int]] = {}
    for j in range(len(priv) - min_words + 1):
        starts.setdefault(tuple(priv[j:j + min_words]), []).append(j)
    best: tuple[int, int] | None = None  # (start, length) in response words
    for i in range(len(resp) - min_words + 1):
        for j in starts.get(tuple(resp[i:i + min_words]), ()):
            if i and j and resp[i - 1] == priv[j - 1]:
                continue  # not left-maximal: the run starting one word earlier covers it
            length = min_words
            while i + length < len(resp) and j + length < len(priv) and resp[i + length] == priv[j + length]:
                length += 1
            if (best is None or length > best[1]) and not _has_run(prompt_words, resp[i:i + length]):
                best = (i, length)
    if best is None:
        return None
    i, length = best
    return response[resp_m[i].start():resp_m[i + length - 1].end()]


SHORTCUT_MIN_CHARS = 40
SHORTCUT_EARLY_FRACTION = 0.2


def _answer_regex(answer: str) -> re.Pattern:
    body = r"\s+".join(re.escape(part) for part in answer.split())
    before = r"(?<!\w)(?<!\d[.,])" + (r"(?<!-)" if answer[:1].isdigit() else "")
    return re.compile(before + body + r"(?!\w)(?![.,]\d)", re.IGNORECASE)


def is_shortcut(response: str | None, answer: str | None, *, tag: str = "Answer:") -> bool:
    """Whether the response states the final answer before the reasoning that supports it.

    With r = the response stripped of surrounding whitespace and a = the gold answer normalised
    as by the exact checker (:func:`normalize`), the response is a shortcut when either:

    1. r starts with ``tag`` (ignoring case and markdown ``*``/``#`` before it) and has
       non-blank text after the tag's line: the answer line comes first, reasoning after; or
    2. len(r) >= 40 and the first occurrence of a in r starts before 0.2 * len(r). An
       occurrence matches ignoring case, with whitespace inside a matching any whitespace, and
       is a whole token: no letter, digit or underscore right before or after it, not inside a
       larger number ("85" is not in "185", "8.85", "85.5" or "1,850"), and for an answer that
       starts with a digit no minus sign right before it ("3" is not in "-3").

    A bare answer with no reasoning (r shorter than 40 characters, or only the tag line) is
    not a shortcut by this test. Empty response or answer: False.
    """
    r = (response or "").strip()
    a = normalize(answer) if answer is not None else ""
    if not r or not a:
        return False
    head = re.sub(r"^[*#\s]+", "", r)
    if head.casefold().startswith(tag.casefold()) and len(head.split("\n", 1)) == 2 and head.split("\n", 1)[1].strip():
        return True
    if len(r) < SHORTCUT_MIN_CHARS:
        return False
    first = _answer_regex(a).search(r)
    return first is not None and first.start() < SHORTCUT_EARLY_FRACTION * len(r)


_RECORD_KEYS = ("response", "privileged", "prompt", "answer")


def leakage_rates(records: Iterable[dict], *, min_words: int = 6, tag: str = "Answer:") -> dict[str, float]:
    """Share of records with a :func:`leaked_span` and share that are :func:`is_shortcut`.
    Every record needs response, privileged, prompt and answer (None or "" allowed), so a
    misnamed field is an error rather than a silent zero."""
    n = leaks = shortcuts = 0
    for idx, rec in enumerate(records):
        missing = [k for k in _RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(f"record {idx} lacks {', '.join(missing)}; need {', '.join(_RECORD_KEYS)}")
        n += 1
        leaks += leaked_span(rec["response"], rec["privileged"], rec["prompt"], min_words=min_words) is not None
        shortcuts += is_shortcut(rec["response"], rec["answer"], tag=tag)
    if n == 0:
        raise ValueError("no records to measure leakage on")
    return {"leakage_rate": leaks / n, "shortcut_rate": shortcuts / n}
