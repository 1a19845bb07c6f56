import itertools
import math

import pytest

from mmdistill.evaluation.checkers import check, extract, normalize, parse_number
from mmdistill.evaluation.leakage import is_shortcut, leakage_rates, leaked_span
from mmdistill.evaluation.stats import length_buckets, pass_at_k, wilson_interval
from mmdistill.tasks import CHECKERS
from mmdistill.tasks import arith

# --- extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Answer: 1,234.", "1,234."),
    ("answer: -3/4", "-3/4"),
    ("the result is 12 apples. Answer: 12", "12"),
    ("**Answer:** Blue", "Blue"),
    ("Answer: (C) because the rest are wrong", "(C) because the rest are wrong"),
    ("Answer: 3\nsome more\nAnswer: 4\ntrailing line", "4"),
    ("Answer:\n\n  42  \nnext", "42"),
    ("ANSWER: yes", "yes"),
    ("Answer:   ", None),
    ("no tag here", None),
    ("", None),
    (None, None),
])
def test_extract_tag(text, expected):
    assert extract(text) == expected


def test_extract_answer_tags():
    assert extract("think <answer> 42 </answer> then <ANSWER>\n7\n8</ANSWER> bye", tag="<answer>") == "7\n8"
    assert extract("reasoning <answer> 42\nmore", tag="<answer>") == "42"
    assert extract("<answer></answer>", tag="<answer>") is None
    assert extract("Final: 9", tag="Final:") == "9"


@pytest.mark.parametrize("text, expected", [
    ("Answer: 1,234.", "1,234"),
    ("answer: -3/4", "-3/4"),
    ("the result is 12 apples. Answer: 12", "12"),
    ("so x = -3.", "-3"),
    ("5-3", "3"),
    ("rate 1e-3 per step", "1e-3"),
    ("about 2.5E+4 people", "2.5E+4"),
    ("a total of 1,234,567.89 units", "1,234,567.89"),
    ("grew by 50%", "50%"),
    ("only .5 left", ".5"),
    ("list 1,2,3", "3"),
    ("12kg in all", "12"),
    ("model v2 only", None),
    ("minus \u22127", "-7"),
    ("no digits", None),
    ("", None),
    (None, None),
])
def test_extract_last_number(text, expected):
    assert extract(text, "last_number") == expected


def test_extract_regex():
    text = "score: 3 ... score: 7 ... done"
    assert extract(text, "regex", pattern=r"score: (\d+)") == "7"
    assert extract(text, "regex", pattern=r"grade: (\d+)") is None
    assert extract(text, "regex", pattern=r"score: (?:(x)|\d+)") is None  # group 1 did not take part
    with pytest.raises(ValueError, match="has no group"):
        extract(text, "regex", pattern=r"score: \d+")
    with pytest.raises(ValueError, match="needs a pattern"):
        extract(text, "regex")


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{ {a}{b{c}} }", "{a}{b{c}}"),
    ("\\boxed{unclosed {", None),
    ("\\boxed{}", None),
    ("no box", None),
    (None, None),
])
def test_extract_boxed(text, expected):
    assert extract(text, "boxed") == expected


def test_extract_unknown_mode():
    with pytest.raises(ValueError, match="unknown extraction 'last'; expected one of tag, last_number, regex, boxed"):
        extract("x", "last")


# --- checkers -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answer, ok", [
    ("**Answer:** Blue", "blue", True),
    ("Answer: **Blue**.", "Blue", True),
    ('Answer: "Blue."', "blue", True),
    ("Answer:   New    York ", "new york", True),
    ("Answer: Blue..", "blue", False),  # only one final period goes
    ("Answer: Blue", "Blue.", True),
    ("Answer: 1,234", "1234", False),  # numbers are the numeric checker's job
    ("Blue", "blue", False),  # no tag, no answer
    ("", "blue", False),
    (None, "blue", False),
])
def test_exact(text, answer, ok):
    assert check("exact", text, {"answer": answer}) is ok


def test_normalize():
    assert normalize("  **'The  Cat'**. ") == "the cat"
    assert normalize("`x`") == "x"
    assert normalize("**x") == "**x"  # unpaired markers stay


@pytest.mark.parametrize("text, answer, ok", [
    ("Answer: 1,234.", "1234", True),
    ("answer: -3/4", "-0.75", True),
    ("the result is 12 apples. Answer: 12", "12", True),
    ("Answer: 3.0000001", "3", True),
    ("Answer: 3.001", "3", False),
    ("Answer: 1000001", "1e6", True),  # relative tolerance
    ("Answer: 50%", "0.5", True),
    ("Answer: 50%", "50", True),
    ("Answer: 0.5", "50 %", True),
    ("Answer: 50%", "0.5%", False),  # both percentages: compared as written
    ("Answer: \\boxed{\\frac{1}{2}}", "0.5", True),
    ("Answer: $\\dfrac{3}{4}$", ".75", True),
    ("Answer: -\\frac{3}{4}", "-3/4", True),
    ("Answer: $1,000", "1000", True),
    ("Answer: 25\\%", "1/4", True),
    ("Answer: \u22125", "-5", True),
    ("Answer: 12 apples", "12", False),  # the extracted answer must be one number
    ("Answer: 12,34", "1234", False),  # not a thousands grouping
    ("Answer: twelve", "12", False),
    ("Answer: 1/0", "1", False),
    ("Answer: 12", "twelve", False),
    ("", "12", False),
    (None, "12", False),
])
def test_numeric(text, answer, ok):
    assert check("numeric", text, {"answer": answer}) is ok


def test_numeric_tolerance_and_extraction():
    assert check("numeric", "Answer: 3.01", {"answer": "3"}, tolerance=0.01)
    assert not check("numeric", "Answer: 3.05", {"answer": "3"}, tolerance=0.01)
    assert check("numeric", "so it is 12 apples", {"answer": "12"}, extraction="last_number")
    assert check("numeric", "\\boxed{\\frac{1}{2}}", {"answer": "1/2"}, extraction="boxed")
    assert check("numeric", "x=7; total=41;", {"answer": "41"}, extraction="regex", pattern=r"total=(\S+?);")
    with pytest.raises(ValueError, match="tolerance"):
        check("numeric", "Answer: 3", {"answer": "3"}, tolerance=-1)


def test_parse_number():
    assert parse_number("1,234.5") == (pytest.approx(1234.5), False)
    assert parse_number("50%") == (50, True)
    assert parse_number("1e-3")[0] == pytest.approx(0.001)
    assert parse_number("3/4.") == (0.75, False)
    assert parse_number("1,23") is None and parse_number("nan") is None and parse_number("inf") is None


CHOICES = {"answer": "B", "choices": ["red", "blue", "green"]}


@pytest.mark.parametrize("text, ok", [
    ("B", True), ("(B)", True), ("B)", True), ("B.", True), ("b", True), ("[B]", True),
    ("Answer: B", True), ("answer: (b)", True), ("**Answer:** **B**", True),
    ("The answer is (b)", True), ("Option (A) is wrong. The answer is (B).", True),
    ("Answer: (B) because the sky is blue", True), ("Answer: B because the sky is blue", True),
    ("Answer: The correct option is B", True), ("I think it is B.", True),
    ("blue", True), ("Answer: Blue.", True),
    ("A or B", False), ("Answer: A, B", False), ("Answer: (a) or (b)", False), ("A/B", False),
    ("Answer: (C) because...", False), ("Answer: green", False), ("Answer: purple", False),
    ("Answer:", False), ("", False), (None, False),
])
def test_choice(text, ok):
    assert check("choice", text, CHOICES) is ok


def test_choice_gold_forms_and_letters_without_choices():
    assert check("choice", "Answer: (B)", {"answer": "blue", "choices": ["red", "blue"]})
    assert check("choice", "Answer: blue", {"answer": "(b)", "choices": ["red", "blue"]})
    assert check("choice", "Answer: E", {"answer": "E"})  # no choices: any letter A-Z
    assert not check("choice", "I think it is E", {"answer": "E"})  # "I" is a letter too: two named
    with pytest.raises(ValueError, match="not an option letter"):
        check("choice", "Answer: D", {"answer": "D", "choices": ["x", "y"]})
    with pytest.raises(ValueError, match="choices"):
        check("choice", "Answer: A", {"answer": "A", "choices": "xy"})


def test_arith_and_scenes_delegate():
    s = arith.make_samples(1, seed=0)[0]
    assert check("arith", s["response"], s) and check(None, s["response"], s)  # domain fallback
    assert not check("arith", "Answer: " + s["answer"] + "0", s)
    scene = {"checker": "scenes", "answer": "red"}
    assert check(None, "The only square is a red square.\nAnswer: Red.", scene)
    assert not check("arith", "Answer: Red.", scene)  # arith is case-sensitive
    assert not check("scenes", None, scene)


def test_kind_from_sample_and_errors():
    assert check(None, "Answer: 1,000", {"answer": "1000", "checker": "numeric"})
    assert not check(None, "Answer: 1,000", {"answer": "1000"})  # default exact
    assert check("exact", "Answer: 1,000", {"answer": "1,000", "checker": "numeric"})  # kind wins
    with pytest.raises(ValueError, match=r"unknown checker 'fuzzy'; expected one of exact, numeric, choice, "
                                         r"scenes, arith or reasoning_gym:<task>"):
        check("fuzzy", "Answer: 1", {"answer": "1"})
    with pytest.raises(ValueError, match="unknown checker 'reasoning_gym:'"):
        check(None, "Answer: 1", {"answer": "1", "checker": "reasoning_gym:"})
    with pytest.raises(ValueError, match="has no 'answer'"):
        check("exact", "Answer: 1", {"id": "s1"})
    assert CHECKERS == ("exact", "numeric", "choice", "scenes", "arith")


def test_reasoning_gym_delegates_to_the_stored_entry():
    pytest.importorskip("reasoning_gym", reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    from mmdistill.data.convert.reasoning_gym import from_reasoning_gym

    s = next(iter(from_reasoning_gym("fraction_simplification", 1, seed=0)))  # scored from metadata
    assert check(None, "work\nAnswer: " + s["answer"], s)
    assert check("reasoning_gym:fraction_simplification", s["response"], s)
    assert not check(None, "Answer: 12345678", s)
    assert not check(None, None, s) and not check(None, "", s)


def test_reasoning_gym_scores_the_configured_extraction():
    """A model that never writes "Answer:" (SmolLM2 says "The answer is 6.") is scored on what
    eval.extraction takes out, not on the whole sentence."""
    pytest.importorskip("reasoning_gym", reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    from mmdistill.data.convert.reasoning_gym import from_reasoning_gym

    s = next(iter(from_reasoning_gym("chain_sum", 1, seed=0)))
    said = f"The answer to this arithmetic problem is {s['answer']}."
    assert not check(None, said, s)  # default: the text after "Answer:", and there is none
    assert check(None, said, s, extraction="last_number")
    assert not check(None, f"The answer is {int(s['answer']) + 1}.", s, extraction="last_number")
    assert not check(None, "no number here", s, extraction="last_number")
    assert check(None, f"Result => {s['answer']}", s, extraction="tag", tag="Result =>")


# --- statistics -----------------------------------------------------------------------------


def test_wilson_interval():
    # 8/10 at z=1.96 by hand: centre (0.8 + 3.8416/20) / 1.38416 = 0.716738,
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226584
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490155, abs=1e-5) and hi == pytest.approx(0.943322, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert 0.8 < lo < 1 and hi == 1.0
    assert wilson_interval(50, 100, z=0)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(5, 4)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))
                brute = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_length_buckets():
    rows = length_buckets([0, 31, 32, 100, 2000, 1024], [1, 0, 1, True, False, 1])
    assert rows == [
        {"bucket": "0-31", "n": 2, "accuracy": 0.5},
        {"bucket": "32-63", "n": 1, "accuracy": 1.0},
        {"bucket": "64-127", "n": 1, "accuracy": 1.0},
        {"bucket": ">=1024", "n": 2, "accuracy": 0.5},
    ]
    assert length_buckets([9, 10], [0, 1], edges=(10,)) == [
        {"bucket": "0-9", "n": 1, "accuracy": 0.0}, {"bucket": ">=10", "n": 1, "accuracy": 1.0}]
    assert length_buckets([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        length_buckets([1, 2], [True])
    with pytest.raises(ValueError, match="strictly increasing"):
        length_buckets([1], [True], edges=(64, 32))


# --- leakage --------------------------------------------------------------------------------

PROMPT = "Is the red circle left or right of the blue square?"
PRIVILEGED = "The red circle is centred at x=10 and the blue square at x=40, so it is left of it."


def test_leaked_span_present():
    response = "Looking at it: the RED circle is centred at x = 10, and the blue square at x=40. Answer: left"
    assert leaked_span(response, PRIVILEGED, PROMPT) == "the RED circle is centred at x = 10, and the blue square at x=40"


def test_leaked_span_absent_only_in_prompt_and_too_short():
    assert leaked_span("I compared their horizontal positions.\nAnswer: left", PRIVILEGED, PROMPT) is None
    privileged = "Is the red circle left or right of the blue square? Compare the x positions."
    echo = "Question: is the red circle left or right of the blue square. Answer: left"
    assert leaked_span(echo, privileged, PROMPT) is None  # copied, but the input has it
    short = "The red circle is centred somewhere."  # 5 privileged words in a row
    assert leaked_span(short, PRIVILEGED, PROMPT) is None
    assert leaked_span(short, PRIVILEGED, PROMPT, min_words=5) == "The red circle is centred"
    assert leaked_span(None, PRIVILEGED, PROMPT) is None and leaked_span("x", None, None) is None
    with pytest.raises(ValueError, match="min_words"):
        leaked_span("a", "a", "", min_words=0)


def test_leaked_span_longest_wins_and_prompt_quote_extended_counts():
    privileged = "one two three four five six seven. alpha beta gamma delta epsilon zeta eta theta"
    response = "one two three four five six! then alpha beta gamma delta epsilon zeta eta"
    assert leaked_span(response, privileged, "") == "alpha beta gamma delta epsilon zeta eta"
    # the run as a whole is not in the prompt, so a quotation plus one privileged word is a leak
    prompt = "one two three four five six"
    assert leaked_span("one two three four five six seven", privileged, prompt) == "one two three four five six seven"
    assert leaked_span("one two three four five six", privileged, prompt) is None


@pytest.mark.parametrize("response, answer, shortcut", [
    ("Answer: 85\n7+8=15 carry 1. 4+3+1=8.", "85", True),  # answer line first, reasoning after
    ("**Answer:** 85\nbecause 7+8=15", "85", True),
    ("Answer: 85", "85", False),  # no reasoning at all
    ("7+8=15 carry 1. 4+3+1=8.\nAnswer: 85", "85", False),
    ("First the ones: 7+8=15, carry 1. Then the tens: 4+3+1=8.\nAnswer: 85", "85", False),
    ("It is 85, because 7+8=15 carry 1 and 4+3+1=8 in the tens.", "85", True),
    ("Left. The red circle is centred at x=10 and the blue square at x=40.", "left", True),
    ("LEFT: the red circle is centred at x=10 and the blue square at x=40.", "Left.", True),
    ("There were 185 apples before we started counting them carefully.\nAnswer: 85", "85", False),
    ("It is 8.85 or 85.5 or 1,850 or -85 by the rough estimate we made.\nAnswer: 85", "85", False),
    ("It is red circle, as the picture shows clearly on the left side.", "red  circle", True),
    ("", "85", False), ("Answer: 85\nmore", "", False), (None, "85", False),
])
def test_is_shortcut(response, answer, shortcut):
    assert is_shortcut(response, answer) is shortcut


def test_is_shortcut_thresholds():
    early = "abcdefgh 85 " + "z" * 38  # 50 characters, the answer at 9 < 0.2 * 50
    late = "abcdefghi 85 " + "z" * 37  # 50 characters, the answer at 10
    assert len(early) == len(late) == 50
    assert is_shortcut(early, "85") and not is_shortcut(late, "85")
    assert not is_shortcut("85 " + "x" * 36, "85")  # 39 characters: too short to hold reasoning
    assert is_shortcut("85 " + "x" * 37, "85")
    assert is_shortcut("Final: 85\nbecause", "85", tag="Final:") and not is_shortcut("Final: 85\nbecause", "85")


def test_leakage_rates():
    records = [
        {"response": "Looking: the red circle is centred at x=10 and more. Answer: left",
         "privileged": PRIVILEGED, "prompt": PROMPT, "answer": "left"},
        {"response": "Answer: left\nbecause it is further to the left.", "privileged": PRIVILEGED,
         "prompt": PROMPT, "answer": "left"},
        {"response": "Answer: left", "privileged": None, "prompt": "", "answer": "left"},
        {"response": "Answer: right", "privileged": "", "prompt": PROMPT, "answer": None},
    ]
    assert leakage_rates(records) == {"leakage_rate": 0.25, "shortcut_rate": 0.25}
    assert leakage_rates(iter(records), min_words=20) == {"leakage_rate": 0.0, "shortcut_rate": 0.25}
    with pytest.raises(ValueError, match="record 0 lacks privileged, prompt"):
        leakage_rates([{"response": "x", "answer": "y"}])
    with pytest.raises(ValueError, match="no records"):
        leakage_rates([])
