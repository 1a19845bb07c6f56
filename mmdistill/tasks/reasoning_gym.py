"""reasoning-gym tasks: worked solutions (hint and reasoning) for the tasks that have a solver here,
and the package's own scoring of a model's answer."""
from __future__ import annotations

import functools
import math
import re
from typing import Callable


class ReasoningGymError(ValueError):
    """The package is missing, or an entry it made does not check out (its worked solution does
    not reach its answer): one line, so a converter can name the record."""


def package():
    try:
        import reasoning_gym
    except ImportError:
        raise ReasoningGymError("reasoning-gym tasks need the 'reasoning-gym' package: "
                                "pip install 'mmdistill[data]'") from None
    return reasoning_gym


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
        raise ReasoningGymError(f"answer_cot does not end on '#### {entry['answer']}'")
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
        raise ReasoningGymError(f"chain_sum: running total {total} != answer {entry['answer']!r}")
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
        raise ReasoningGymError(f"leg_counting: total {total} != answer {entry['answer']!r}")
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
        raise ReasoningGymError(f"fraction_simplification: {num}/{den} over gcd {g} is not the stored answer")
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
        raise ReasoningGymError(f"base_conversion: {src} in base {sb} is not {value}")
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
        raise ReasoningGymError(f"base_conversion: got {result!r}, answer {entry['answer']!r}")
    steps.append(f"Reading the remainders from last to first: {result}")
    hint = (f"First convert {src} from base {sb} to base 10, then divide by {tb} repeatedly "
            "and read the remainders backwards.")
    return hint, "\n".join(steps)


SOLVERS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "gsm_symbolic": _rg_gsm_symbolic,
    "chain_sum": _rg_chain_sum,
    "leg_counting": _rg_leg_counting,
    "fraction_simplification": _rg_fraction_simplification,
    "base_conversion": _rg_base_conversion,
}
# reasoning-gym tasks whose samples get a hint and a worked solution (`reasoning`); any other
# task converts too, with "Answer: ..." as its response and no hint or reasoning.
REASONING_GYM_WITH_SOLUTIONS = tuple(SOLVERS)



@functools.lru_cache(maxsize=None)
def _rg_scorer(task: str):
    return package().create_dataset(task, size=1, seed=0)


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


