"""One eval result: its Markdown table, written next to its JSON."""
from __future__ import annotations

import json

import pytest

from mmdistill.reporting.tables import ReportError, eval_markdown, read_eval, split_order, write_eval
from tests.helpers import table_header, table_row

RESULT = {
    "label": "student", "role": "student", "run_dir": "runs/x", "method": "dopd", "step": 300,
    "splits": {
        "test": {"n": 200, "correct": 150, "accuracy": 0.75, "ci95": [0.69, 0.80], "pass_at_k": {"1": 0.75, "4": 0.9},
                 "mean_response_tokens": 21.3, "by_length": [{"bucket": "0-31", "n": 180, "accuracy": 0.8},
                                                              {"bucket": "32-63", "n": 20, "accuracy": 0.3}],
                 "distinct_rate": 0.985, "leakage_rate": 0.01, "shortcut_rate": 0.02},
        "ood_objects": {"n": 100, "correct": 40, "accuracy": 0.4, "ci95": [0.31, 0.5],
                        "pass_at_k": {"1": 0.4, "16": 0.7},
                        "mean_response_tokens": 30.0, "by_length": [], "leakage_rate": None, "shortcut_rate": 0.0},
    },
    "settings": {"checker": "scenes", "extraction": "tag", "temperature": 0.0, "samples": 1},
}


def test_eval_markdown_has_every_number():
    md = eval_markdown(RESULT)
    assert table_header(md) == ["split", "n", "accuracy % [95% CI]", "pass@1 %", "pass@4 %", "pass@16 %",
                                "mean tokens", "distinct %", "leakage %", "shortcut %"]
    assert table_row(md, "test") == ["test", "200", "75.0 [69.0, 80.0]", "75.0", "90.0", "-", "21.3", "98.5",
                                     "1.0", "2.0"]
    assert table_row(md, "ood_objects") == ["ood_objects", "100", "40.0 [31.0, 50.0]", "40.0", "-", "70.0", "30.0",
                                            "-", "-", "0.0"]  # results written before distinct_rate existed
    assert md.index("| test") < md.index("| ood_objects")  # test first
    assert "checker=scenes" in md and "step 300" in md
    lengths = md[md.index("by response length"):]
    assert table_row(lengths, "test")[1:] == ["0-31", "180", "80.0"]
    assert "32-63" in lengths and "30.0" in lengths


def test_write_eval_writes_json_and_markdown_atomically(tmp_path):
    out = tmp_path / "run" / "eval"
    json_path, md_path = write_eval(RESULT, out)
    assert (json_path, md_path) == (out / "student.json", out / "student.md")
    assert json.loads(json_path.read_text()) == RESULT
    assert md_path.read_text() == eval_markdown(RESULT)
    assert sorted(p.name for p in out.iterdir()) == ["student.json", "student.md"]  # no temporaries left
    assert read_eval(json_path)["splits"]["test"]["accuracy"] == 0.75


@pytest.mark.parametrize("label", ["", "../x", "a/b", None])
def test_write_eval_refuses_a_label_that_cannot_name_a_file(tmp_path, label):
    with pytest.raises(ReportError, match="label"):
        write_eval({**RESULT, "label": label}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_split_order_puts_test_first():
    assert split_order(["ood_b", "test", "ood_a"]) == ["test", "ood_a", "ood_b"]
    assert split_order(["b", "a"]) == ["a", "b"]
