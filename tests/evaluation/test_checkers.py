"""Answer extraction and the checkers: exact, numeric, choice, and the tasks' own."""
import pytest

from mmdistill.evaluation.checkers import check, extract, normalize, parse_number
from mmdistill.tasks import CHECKERS, arith

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
    pytest.importorskip("reasoning_gym",
                        reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    from mmdistill.data.convert.reasoning_gym import from_reasoning_gym

    s = next(iter(from_reasoning_gym("fraction_simplification", 1, seed=0)))  # scored from metadata
    assert check(None, "work\nAnswer: " + s["answer"], s)
    assert check("reasoning_gym:fraction_simplification", s["response"], s)
    assert not check(None, "Answer: 12345678", s)
    assert not check(None, None, s) and not check(None, "", s)


def test_reasoning_gym_scores_the_configured_extraction():
    """A model that never writes "Answer:" (SmolLM2 says "The answer is 6.") is scored on what
    eval.extraction takes out, not on the whole sentence."""
    pytest.importorskip("reasoning_gym",
                        reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    from mmdistill.data.convert.reasoning_gym import from_reasoning_gym

    s = next(iter(from_reasoning_gym("chain_sum", 1, seed=0)))
    said = f"The answer to this arithmetic problem is {s['answer']}."
    assert not check(None, said, s)  # default: the text after "Answer:", and there is none
    assert check(None, said, s, extraction="last_number")
    assert not check(None, f"The answer is {int(s['answer']) + 1}.", s, extraction="last_number")
    assert not check(None, "no number here", s, extraction="last_number")
    assert check(None, f"Result => {s['answer']}", s, extraction="tag", tag="Result =>")
