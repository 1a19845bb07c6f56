"""Leakage of privileged text into responses, and shortcut answers."""
import pytest

from mmdistill.evaluation.leakage import is_shortcut, leakage_rates, leaked_span

PROMPT = "Is the red circle left or right of the blue square?"
PRIVILEGED = "The red circle is centred at x=10 and the blue square at x=40, so it is left of it."


def test_leaked_span_present():
    response = "Looking at it: the RED circle is centred at x = 10, and the blue square at x=40. Answer: left"
    assert leaked_span(response, PRIVILEGED, PROMPT) == ("the RED circle is centred at x = 10, "
                                                         "and the blue square at x=40")


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
