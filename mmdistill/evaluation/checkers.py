"""Answer extraction and answer checkers.

One place decides whether a model's text is right, so training rewards, evaluation and the data
tools agree. A sample names its checker in ``checker`` (``"exact"``, ``"numeric"``, ``"choice"``,
``"scenes"``, ``"arith"`` or ``"reasoning_gym:<task>"``; the names are the tasks' own,
:data:`mmdistill.tasks.CHECKERS`); :func:`check` dispatches on it.
"""
from __future__ import annotations

import re
import string
from fractions import Fraction

from mmdistill.tasks import CHECKERS, REASONING_GYM_PREFIX, arith, is_checker, scenes
from mmdistill.tasks.reasoning_gym import reasoning_gym_score

EXTRACTIONS = ("tag", "last_number", "regex", "boxed")
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

def kind_of(kind: str | None, sample: dict) -> str:
    """The checker that scores ``sample``: ``kind`` (eval.checker) when given, else the sample's."""
    return _kind_of(kind, sample)


def _kind_of(kind: str | None, sample: dict) -> str:
    if kind is None:
        kind = sample.get("checker") or (sample.get("domain") if sample.get("domain") in ("arith", "scenes")
                                         else "exact")
    if is_checker(kind):
        return kind
    raise ValueError(f"unknown checker {kind!r}; expected one of {_ALLOWED}")


def answer_found(kind: str | None, predicted_text: str | None, sample: dict, *, extraction: str = "tag",
                 tag: str = "Answer:", pattern: str | None = None) -> bool:
    """Whether :func:`check` finds an answer in the text at all, right or wrong: when most
    responses have none, the extraction (eval.extraction / eval.tag) does not fit what the model
    writes, and its accuracy measures the format, not the answers. ``choice`` always finds a span
    (it falls back to the whole text); ``arith``/``scenes`` and the default ``reasoning_gym``
    scoring look for their own "Answer:"."""
    if not predicted_text:
        return False
    kind = _kind_of(kind, sample)
    if kind == "choice":
        return True
    default_rg = kind.startswith(REASONING_GYM_PREFIX) and (extraction, tag) == ("tag", "Answer:")
    if kind in ("arith", "scenes") or default_rg:
        return arith.extract_answer(predicted_text) is not None  # scenes uses the same extraction
    return extract(predicted_text, extraction, tag=tag, pattern=pattern) is not None


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


