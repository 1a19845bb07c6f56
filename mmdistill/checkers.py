"""Answer extraction, answer checkers, accuracy statistics and privileged-leakage diagnostics.

One place decides whether a model's text is right, so training rewards, evaluation and the data
tools agree. A sample names its checker in ``checker`` (``"exact"``, ``"numeric"``, ``"choice"``,
``"scenes"``, ``"arith"`` or ``"reasoning_gym:<task>"``); :func:`check` dispatches on it.

Leakage diagnostics ask whether a student that saw only the input still behaves as if it had
seen the teacher's privileged information: :func:`leaked_span` (it copies privileged text) and
:func:`is_shortcut` (it states the answer before any reasoning that could produce it).
"""
from __future__ import annotations

import math
import re
import string
from fractions import Fraction
from typing import Iterable, Sequence

from mmdistill.tasks import arith, scenes

EXTRACTIONS = ("tag", "last_number", "regex", "boxed")
CHECKERS = ("exact", "numeric", "choice", "scenes", "arith")
REASONING_GYM_PREFIX = "reasoning_gym:"
_ALLOWED = ", ".join(CHECKERS) + f" or {REASONING_GYM_PREFIX}<task>"

# --- answer extraction ----------------------------------------------------------------------

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_UNSIGNED = rf"(?:{_INT}(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
# A number in running text: not glued to a preceding word or number (so "5-3" holds 3, not -3,
# and "v2" holds none), optionally negative, a fraction or a percentage.
_NUMBER_IN_TEXT = re.compile(rf"(?<![\w.])(?:[-\u2212](?=[\d.]))?(?:{_INT}/{_INT}|{_UNSIGNED})%?")
_NUMBER_FULL = re.compile(rf"([-+]?)(?:({_INT})/({_INT})|({_UNSIGNED}))(%?)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _tag_answer(text: str, tag: str) -> str | None:
    if tag.casefold() == "<answer>":
        closed = list(re.finditer(r"<answer>(.*?)</answer>", text, re.IGNORECASE | re.DOTALL))
        if closed:
            return closed[-1].group(1).strip() or None
    pos = text.casefold().rfind(tag.casefold())
    if pos < 0:
        return None
    rest = text[pos + len(tag):]
    rest = re.sub(r"^[*_]+", "", rest).strip()  # the bold closing a bolded tag: "**Answer:** x"
    return rest.splitlines()[0].strip() if rest else None


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip() or None
    return None


def extract(text: str | None, how: str = "tag", *, tag: str = "Answer:", pattern: str | None = None) -> str | None:
    """The answer part of a model's text, or None when there is none.

    ``tag``: the text after the last ``tag`` (matched ignoring case, as models vary the
    capitals), its first non-empty line, stripped; emphasis markers glued to the tag
    (``**Answer:** x``) are dropped. With ``tag="<answer>"`` the content of the last
    ``<answer>...</answer>`` is taken whole, else the line after an unclosed ``<answer>``.
    ``last_number``: the last number, as written: integers, decimals, negatives, thousands
    separators (``1,234``), fractions (``3/4``), scientific (``1e-3``), a trailing ``%`` kept.
    ``regex``: group 1 of the last match of ``pattern``. ``boxed``: the content of the last
    ``\\boxed{...}``, nested braces included.
    """
    if how not in EXTRACTIONS:
        raise ValueError(f"unknown extraction {how!r}; expected one of {', '.join(EXTRACTIONS)}")
    if how == "regex":
        if not pattern:
            raise ValueError("extraction 'regex' needs a pattern")
        compiled = re.compile(pattern)
        if compiled.groups < 1:
            raise ValueError(f"regex pattern {pattern!r} has no group; put the answer in (...)")
    if not text:
        return None
    if how == "tag":
        return _tag_answer(text, tag)
    if how == "last_number":
        found = _NUMBER_IN_TEXT.findall(text)
        return found[-1].replace("\u2212", "-") if found else None
    if how == "regex":
        matches = list(compiled.finditer(text))
        got = (matches[-1].group(1) or "").strip() if matches else ""
        return got or None
    return _boxed(text)


# --- normalisation and numbers --------------------------------------------------------------

_WRAPPERS = (("**", "**"), ("__", "__"), ("*", "*"), ("`", "`"), ('"', '"'), ("'", "'"),
             ("\u201c", "\u201d"), ("\u2018", "\u2019"))


def _unwrap(s: str) -> str:
    changed = True
    while changed:
        changed = False
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s, changed = s[len(left):len(s) - len(right)].strip(), True
    return s


def normalize(s: str) -> str:
    """Exact-match form: formatting a grader would ignore (case, spacing, a final period, quotes
    or bold around the answer) must not decide correctness."""
    s = _unwrap(" ".join(str(s).split()).casefold())
    if s.endswith("."):
        s = _unwrap(s[:-1].rstrip())
    return s


def parse_number(s: str | None) -> tuple[Fraction, bool] | None:
    """(value, written as a percentage) of a string that is one number, else None. Exact
    fractions, so a tolerance is the only source of slack. Accepts thousands separators,
    fractions, ``\\frac{a}{b}``, ``%``/``\\%``, a leading ``$``, ``$...$`` math and ``\\boxed{...}``."""
    if s is None:
        return None
    s = normalize(s).replace("\u2212", "-").replace("\\%", "%").replace("{,}", ",")
    s = s.replace("\\!", "").replace("\\,", "")
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s[1:-1].strip()
    s = re.sub(r"^([-+]?)\\?\$", r"\1", s)
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", s)
    s = boxed.group(1).strip() if boxed else s
    s = _LATEX_FRAC.sub(lambda m: f"{m.group(1).strip()}/{m.group(2).strip()}", s)
    s = re.sub(r"\s*%$", "%", s)
    m = _NUMBER_FULL.fullmatch(s)
    if m is None:
        return None
    sign, num, den, plain, percent = m.groups()
    try:
        value = (Fraction(int(num.replace(",", "")), int(den.replace(",", ""))) if plain is None
                 else Fraction(plain.replace(",", "")))
    except ZeroDivisionError:
        return None
    return (-value if sign == "-" else value), bool(percent)


def numbers_match(predicted: str | None, gold: str | None, tolerance: float = 1e-6) -> bool:
    """Whether two strings are the same number within ``tolerance`` (absolute or relative).

    When exactly one side is a percentage it matches the other side's number either as written
    or divided by 100, since gold answers write "50%" as 50 or as 0.5.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    p, g = parse_number(predicted), parse_number(gold)
    if p is None or g is None:
        return False
    close = lambda a, b: abs(a - b) <= tolerance or abs(a - b) <= tolerance * max(abs(a), abs(b))  # noqa: E731
    (pv, pp), (gv, gp) = p, g
    if pp == gp:
        return close(pv, gv)
    pct, other = (pv, gv) if pp else (gv, pv)
    return close(pct, other) or close(pct / 100, other)


# --- multiple choice ------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
_ANSWER_IS = re.compile(r"\banswer\s+is\b", re.IGNORECASE)
_WHOLE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
_LEADING_LETTER = re.compile(r"^(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?=[\s.,:;)!]|$)|([a-z])(?=[.,:;)!]|$))")
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
_LISTED = re.compile(r"(?<![\w'])(?=[(\[]?([A-Z])[)\]]?(?:\s*[,/]\s*|\s+(?:or|and)\s+)[(\[]?([A-Z])(?![\w']))")
_TRAILING = re.compile(r"(?<![\w'])[(\[]?([A-Z])[)\]]?[.!]?$")
_NAMED = re.compile(r"\b(?:answer|option|choice)\s*(?:is\s*)?:?\s*[(\[]?([A-Za-z])(?![\w'])", re.IGNORECASE)


def _valid_letters(sample: dict) -> str:
    choices = sample.get("choices")
    if choices is None:
        return _LETTERS
    if not isinstance(choices, (list, tuple)) or not 0 < len(choices) <= 26:
        raise ValueError(f"sample 'choices' must be a list of 1 to 26 options, got {choices!r}")
    return _LETTERS[:len(choices)]


def _letter_of(span: str, sample: dict) -> str | None:
    """The one option letter a span names, or None when it names none or several."""
    valid = _valid_letters(sample)
    for letter, option in zip(valid, sample.get("choices") or ()):
        if normalize(span) == normalize(option):
            return letter
    span = _unwrap(span.strip())
    whole = _WHOLE_LETTER.fullmatch(span)
    if whole:
        found = {whole.group(1).upper()}
    else:
        found = set()
        lead = _LEADING_LETTER.match(span)
        if lead:
            found.add(next(g for g in lead.groups() if g).upper())
        for rx in (_BRACKETED, _LISTED, _NAMED, _TRAILING):
            for m in rx.finditer(span):
                found.update(g.upper() for g in m.groups() if g)
    found &= set(valid)
    return found.pop() if len(found) == 1 else None


def _choice_span(text: str, extraction: str, tag: str, pattern: str | None) -> str:
    got = extract(text, extraction, tag=tag, pattern=pattern)
    if got is not None:
        return got
    said = list(_ANSWER_IS.finditer(text))
    if said:
        return text[said[-1].end():].strip().split("\n", 1)[0]
    return text.strip()


def _gold_letter(sample: dict) -> str:
    gold = str(sample["answer"])
    whole = _WHOLE_LETTER.fullmatch(_unwrap(gold.strip()))
    letter = whole.group(1).upper() if whole else None
    if letter is None:
        options = [normalize(o) for o in sample.get("choices") or ()]
        if normalize(gold) in options:
            letter = _LETTERS[options.index(normalize(gold))]
    if letter is None or letter not in _valid_letters(sample):
        raise ValueError(f"choice sample {sample.get('id', '?')}: answer {gold!r} is not an option letter "
                         "or one of its choices")
    return letter


def choice_correct(text: str, sample: dict, *, extraction: str = "tag", tag: str = "Answer:",
                   pattern: str | None = None) -> bool:
    """Whether the text names exactly the sample's option.

    The answer span is the extracted answer, else what follows the last "answer is", else the
    whole text. The span names option X when it equals the text of choice X, or is a bare
    letter ("B", "(B)", "B)", "B."), or else when X is the only letter among: a leading option
    letter, bracketed letters "(x)", capital letters listed with or/and/,/, letters after
    "answer", "option" or "choice", and a capital letter ending the span. Letters beyond the
    sample's ``choices`` are ignored, so "I think it is B" names B when there are fewer than
    nine choices ("I" is the ninth letter); "A or B" names two letters and is never correct.
    """
    gold = _gold_letter(sample)
    return bool(text) and _letter_of(_choice_span(text, extraction, tag, pattern), sample) == gold


# --- checkers -------------------------------------------------------------------------------

def _kind_of(kind: str | None, sample: dict) -> str:
    if kind is None:
        kind = sample.get("checker") or (sample.get("domain") if sample.get("domain") in ("arith", "scenes")
                                         else "exact")
    if kind in CHECKERS or (isinstance(kind, str) and kind.startswith(REASONING_GYM_PREFIX)
                            and len(kind) > len(REASONING_GYM_PREFIX)):
        return kind
    raise ValueError(f"unknown checker {kind!r}; expected one of {_ALLOWED}")


def check(kind: str | None, predicted_text: str | None, sample: dict, *, extraction: str = "tag",
          tag: str = "Answer:", pattern: str | None = None, tolerance: float = 1e-6) -> bool:
    """Whether ``predicted_text`` answers ``sample`` correctly.

    ``kind`` None takes the sample's ``checker`` (else its domain when that is arith or scenes,
    else ``exact``, the converters' default). ``exact``: the extracted answer equals the gold
    answer after :func:`normalize`. ``numeric``: both are one number (:func:`parse_number`) and
    agree within ``tolerance``, absolute or relative. ``choice``: :func:`choice_correct`.
    ``arith``/``scenes``: the task's own ``is_correct`` (its "Answer:" extraction; the extraction
    options do not apply). ``reasoning_gym:<task>``: the package's own score of the extracted
    answer (by default the text after the last "Answer:") against the stored ``rg_entry`` is
    1.0. Text that is None or empty is never correct.
    """
    kind = _kind_of(kind, sample)
    if kind.startswith(REASONING_GYM_PREFIX):
        if not predicted_text:
            return False
        from data_tools.convert import reasoning_gym_score

        if (extraction, tag) != ("tag", "Answer:"):  # the package scores the text after "Answer:"
            got = extract(predicted_text, extraction, tag=tag, pattern=pattern)
            if got is None:
                return False
            predicted_text = f"Answer: {got}"
        return reasoning_gym_score(kind[len(REASONING_GYM_PREFIX):], predicted_text, sample) >= 1.0
    if "answer" not in sample:
        raise ValueError(f"sample {sample.get('id', '?')} has no 'answer' to check against")
    if kind == "choice":
        return choice_correct(predicted_text, sample, extraction=extraction, tag=tag, pattern=pattern)
    if kind in ("arith", "scenes"):
        if not predicted_text:
            return False
        return (arith if kind == "arith" else scenes).is_correct(predicted_text, sample["answer"])
    got = extract(predicted_text, extraction, tag=tag, pattern=pattern)
    if got is None:
        return False
    if kind == "numeric":
        return numbers_match(got, str(sample["answer"]), tolerance)
    return normalize(got) == normalize(str(sample["answer"]))


# --- statistics -----------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy: unlike p +- z*se it stays inside [0, 1] and is not
    zero-width at 0% or 100%, which small eval sets hit often. n=0 says nothing: (0, 1)."""
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), as the
    product 1 - prod_{i=n-c+1}^{n} (1 - k/i) so large n neither overflows nor cancels."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def length_buckets(lengths: Sequence[int], correct: Sequence[bool],
                   edges: Sequence[int] = (32, 64, 128, 256, 512, 1024)) -> list[dict]:
    """Accuracy by response length, to see whether errors come from long (rambling or truncated)
    answers. Buckets are [0, e0), [e0, e1), ..., [e_last, inf), labelled "0-31" ... ">=1024";
    empty ones are left out."""
    if len(lengths) != len(correct):
        raise ValueError(f"lengths and correct differ in length: {len(lengths)} vs {len(correct)}")
    edges = list(edges)
    if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be positive and strictly increasing, got {edges}")
    if any(x < 0 for x in lengths):
        raise ValueError("lengths must be >= 0")
    bounds = [0, *edges]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(bounds, edges)] + [f">={edges[-1]}"]
    tallies = [[0, 0] for _ in labels]
    for length, ok in zip(lengths, correct):
        i = sum(length >= e for e in edges)
        tallies[i][0] += 1
        tallies[i][1] += bool(ok)
    return [{"bucket": label, "n": n, "accuracy": hits / n}
            for label, (n, hits) in zip(labels, tallies) if n]


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
