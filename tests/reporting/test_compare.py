"""`mmdistill.report`: one eval result, continual-learning metrics and heatmap, and the
side-by-side `mmdistill report` over hand-written run directories."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from mmdistill.cli import main
from mmdistill.reporting.compare import gap_recovered, report_markdown, seed_stem
from mmdistill.reporting.continual import continual_heatmap, continual_markdown, continual_metrics, write_continual
from mmdistill.reporting.tables import ReportError, eval_markdown, read_eval, split_order, write_eval

RESULT = {
    "label": "student", "role": "student", "run_dir": "runs/x", "method": "dopd", "step": 300,
    "splits": {
        "test": {"n": 200, "correct": 150, "accuracy": 0.75, "ci95": [0.69, 0.80], "pass_at_k": {"1": 0.75, "4": 0.9},
                 "mean_response_tokens": 21.3, "by_length": [{"bucket": "0-31", "n": 180, "accuracy": 0.8},
                                                              {"bucket": "32-63", "n": 20, "accuracy": 0.3}],
                 "distinct_rate": 0.985, "leakage_rate": 0.01, "shortcut_rate": 0.02},
        "ood_objects": {"n": 100, "correct": 40, "accuracy": 0.4, "ci95": [0.31, 0.5], "pass_at_k": {"1": 0.4, "16": 0.7},
                        "mean_response_tokens": 30.0, "by_length": [], "leakage_rate": None, "shortcut_rate": 0.0},
    },
    "settings": {"checker": "scenes", "extraction": "tag", "temperature": 0.0, "samples": 1},
}

R2 = [[0.8, 0.1], [0.6, 0.9]]
B2 = [0.2, 0.05]
R3 = [[0.9, 0.2, 0.1], [0.95, 0.8, 0.3], [0.6, 0.5, 0.95]]
B3 = [0.1, 0.1, 0.2]


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the Markdown row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def table_header(text: str) -> list[str]:
    return [c.strip() for c in next(l for l in text.splitlines() if l.startswith("|")).strip().strip("|").split("|")]


# ---------------------------------------------------------------------------------------------
# One eval result


def test_eval_markdown_has_every_number():
    md = eval_markdown(RESULT)
    assert table_header(md) == ["split", "n", "accuracy % [95% CI]", "pass@1 %", "pass@4 %", "pass@16 %",
                                "mean tokens", "distinct %", "leakage %", "shortcut %"]
    assert table_row(md, "test") == ["test", "200", "75.0 [69.0, 80.0]", "75.0", "90.0", "-", "21.3", "98.5", "1.0", "2.0"]
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


# ---------------------------------------------------------------------------------------------
# Continual learning


def test_continual_metrics_2x2_by_hand():
    m = continual_metrics(R2, B2)
    assert m["T"] == 2
    assert m["ACC"] == pytest.approx((0.6 + 0.9) / 2)
    assert m["BWT"] == pytest.approx(0.6 - 0.8)
    assert m["FWT"] == pytest.approx(0.1 - 0.05)
    assert m["forgetting"][0] == pytest.approx(0.2) and m["forgetting"][1] is None


def test_continual_metrics_3x3_by_hand():
    m = continual_metrics(R3, B3)
    assert m["ACC"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)  # against the diagonal
    assert m["FWT"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    # forgetting uses the best earlier accuracy (0.95 after stage 1), not the diagonal
    assert m["forgetting"][:2] == pytest.approx([0.95 - 0.6, 0.8 - 0.5]) and m["forgetting"][2] is None
    assert m["mean_forgetting"] == pytest.approx((0.35 + 0.3) / 2)


def test_continual_metrics_single_stage_has_no_transfer():
    m = continual_metrics([[0.7]], [0.1])
    assert m["ACC"] == pytest.approx(0.7) and m["BWT"] is None and m["FWT"] is None


@pytest.mark.parametrize("R, baseline, match", [
    ([[0.1, 0.2]], [0.1], "1 x 1"),
    ([[0.1, 0.2], [0.3]], [0.1, 0.2], r"2 x 2.*row 1 has 1"),
    (R2, [0.1], "baseline must have one accuracy per stage \\(2\\), got 1"),
    ([], [], "non-empty"),
    ([[0.5, 75.0], [0.5, 0.5]], B2, r"R\[0\]\[1\] = 75.0.*\[0, 1\]"),
    (R2, [0.1, float("nan")], r"baseline\[1\]"),
])
def test_continual_metrics_rejects_bad_shapes(R, baseline, match):
    with pytest.raises(ReportError, match=match):
        continual_metrics(R, baseline)


def test_continual_markdown_matrix_and_metrics():
    md = continual_markdown({"stages": ["count", "attribute", "spatial"], "R": R3, "baseline": B3})
    assert table_header(md) == ["after \\ test on", "count", "attribute", "spatial"]
    assert table_row(md, "after attribute") == ["after attribute", "95.0", "80.0", "30.0"]
    assert table_row(md, "before training") == ["before training", "10.0", "10.0", "20.0"]
    assert table_row(md, "forgetting") == ["forgetting", "+35.0", "+30.0", "-"]
    assert table_row(md, "ACC (final mean accuracy) %")[1] == "68.3"
    assert table_row(md, "BWT (backward transfer) pp")[1] == "-30.0"
    assert table_row(md, "FWT (forward transfer) pp")[1] == "+10.0"


def test_continual_stage_names_must_match_the_matrix():
    with pytest.raises(ReportError, match="'stages' must name the 2 stages"):
        continual_markdown({"stages": ["a"], "R": R2, "baseline": B2})


def test_continual_heatmap_is_a_png(tmp_path):
    out = continual_heatmap({"stages": ["count", "attribute", "spatial"], "R": R3, "baseline": B3}, tmp_path / "h.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert min(im.size) >= 200


def test_write_continual_next_to_the_json(tmp_path):
    data = {"stages": ["a", "b"], "R": R2, "baseline": B2}
    md, png = write_continual(data, tmp_path)
    assert (md, png) == (tmp_path / "continual.md", tmp_path / "continual.png")
    assert "+5.0" in md.read_text()
    with Image.open(png) as im:
        im.verify()


# ---------------------------------------------------------------------------------------------
# mmdistill report


def eval_file(run_dir: Path, label: str, accs: dict[str, float], method: str = "dopd", role: str | None = None,
              step: int | None = 300) -> Path:
    splits = {name: {"n": 100, "correct": round(100 * a), "accuracy": a} for name, a in accs.items()}
    result = {"label": label, "role": role or label, "run_dir": str(run_dir), "method": method, "step": step,
              "splits": splits, "settings": {}}
    path = run_dir / "eval" / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """dopd (one run, with a continual.json), gkd over three seeds; the untrained student's
    result lives in the dopd run, the teacher's in the second gkd seed."""
    r = {"dopd": tmp_path / "dopd"}
    eval_file(r["dopd"], "student", {"test": 0.76, "ood_objects": 0.52})
    eval_file(r["dopd"], "student_init", {"test": 0.5, "ood_objects": 0.3}, step=0)
    (r["dopd"] / "continual.json").write_text(json.dumps({"stages": ["a", "b"], "R": R2, "baseline": B2}))
    for seed, (t, o) in enumerate([(0.6, 0.4), (0.7, 0.5), (0.8, 0.6)], 1):
        r[f"gkd{seed}"] = tmp_path / f"gkd-seed{seed}"
        eval_file(r[f"gkd{seed}"], "student", {"test": t, "ood_objects": o}, method="gkd")
    eval_file(r["gkd2"], "teacher", {"test": 0.9, "ood_objects": 0.7}, method="gkd", step=None)
    return r


def test_report_table_with_references_gap_and_seeds(runs, capsys, tmp_path):
    out = tmp_path / "report" / "table.md"
    dirs = [str(runs[k]) for k in ("dopd", "gkd1", "gkd2", "gkd3")]
    assert main(["report", *dirs, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert table_header(text) == ["run", "test", "ood_objects", "avg"]
    # gap recovered: (76 - 50) / (90 - 50) = 65%, (52 - 30) / (70 - 30) = 55%; avg (64 - 40) / (80 - 40) = 60%
    assert table_row(text, "dopd") == ["dopd", "76.0 (65%)", "52.0 (55%)", "64.0 (60%)"]
    # seeds: mean ± sample std, gap of the mean: (70 - 50) / 40 = 50%, (50 - 30) / 40 = 50%
    assert table_row(text, "gkd (3 seeds)") == ["gkd (3 seeds)", "70.0 ± 10.0 (50%)", "50.0 ± 10.0 (50%)",
                                                 "60.0 ± 10.0 (50%)"]
    assert table_row(text, "teacher (ref)") == ["teacher (ref)", "90.0", "70.0", "80.0"]
    assert table_row(text, "student_init (ref)") == ["student_init (ref)", "50.0", "30.0", "40.0"]
    assert f"teacher (ref): from {runs['gkd2'] / 'eval' / 'teacher.json'}." in text
    assert f"student_init (ref): from {runs['dopd'] / 'eval' / 'student_init.json'}, step 0." in text
    # continual table: only dopd has one; ACC 75.0, BWT -20.0, FWT +5.0, forgetting +20.0
    continual = text[text.index("## Continual learning"):]
    assert table_row(continual, "dopd") == ["dopd", "1", "a → b", "75.0", "-20.0", "+5.0", "+20.0"]
    assert "gkd" not in continual.split("\n|")[-1]


def test_report_gap_is_na_when_teacher_equals_untrained_student(tmp_path, capsys):
    run = tmp_path / "run"
    eval_file(run, "student", {"test": 0.6, "ood": 0.6})
    eval_file(run, "teacher", {"test": 0.5, "ood": 0.8})
    eval_file(run, "student_init", {"test": 0.5, "ood": 0.4})
    assert main(["report", str(run)]) == 0
    cells = table_row(capsys.readouterr().out, "dopd")
    assert cells[1] == "60.0 (n/a)"
    assert cells[2] == "60.0 (50%)"
    # a teacher below the untrained student has no lead to recover: n/a, not a negative share
    eval_file(run, "teacher", {"test": 0.4, "ood": 0.8})
    assert main(["report", str(run)]) == 0
    assert table_row(capsys.readouterr().out, "dopd")[1] == "60.0 (n/a)"


def test_report_takes_references_from_refs_dir_first(tmp_path, capsys):
    """The benchmark keeps its reference rows in one eval directory, outside every run."""
    run = tmp_path / "run"
    eval_file(run, "student", {"test": 0.7})
    eval_file(run, "teacher", {"test": 0.2})  # a run's own copy loses to the refs directory
    refs = tmp_path / "refs"
    for label, acc in (("teacher", 0.9), ("student_init", 0.5), ("student_init_priv", 0.6)):
        eval_file(tmp_path / "r", label, {"test": acc})
    (tmp_path / "r" / "eval").rename(refs)
    assert main(["report", str(run), "--refs", str(refs)]) == 0
    text = capsys.readouterr().out
    assert table_row(text, "dopd") == ["dopd", "70.0 (50%)", "70.0 (50%)"]  # (70 - 50) / (90 - 50)
    assert table_row(text, "teacher (ref)") == ["teacher (ref)", "90.0", "90.0"]
    assert table_row(text, "student_init_priv (ref)") == ["student_init_priv (ref)", "60.0", "60.0"]
    assert f"teacher (ref): from {refs / 'teacher.json'}" in text
    assert main(["report", str(run), "--refs", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: reference directory not found" in capsys.readouterr().err


def test_report_without_references_shows_plain_accuracy(tmp_path):
    eval_file(tmp_path / "a", "student", {"test": 0.5, "ood": 0.25})
    eval_file(tmp_path / "b", "student", {"test": 0.75})
    text = report_markdown([tmp_path / "a", tmp_path / "b"])
    assert table_header(text) == ["run", "test", "ood", "avg"]
    # same method twice: rows are told apart by the run directory name
    assert table_row(text, "dopd (a)") == ["dopd (a)", "50.0", "25.0", "37.5"]
    assert table_row(text, "dopd (b)") == ["dopd (b)", "75.0", "-", "75.0"]
    assert "(ref)" not in text and "gap recovered" not in text


def test_seed_grouping_needs_same_method_and_stem(tmp_path):
    eval_file(tmp_path / "x_s1", "student", {"test": 0.5})
    eval_file(tmp_path / "x_s2", "student", {"test": 0.7}, method="sft")  # other method: its own row
    eval_file(tmp_path / "y_s1", "student", {"test": 0.9})  # other experiment
    text = report_markdown([tmp_path / "x_s1", tmp_path / "x_s2", tmp_path / "y_s1"])
    assert table_row(text, "dopd (x)")[1] == "50.0"
    assert table_row(text, "sft")[1] == "70.0"
    assert table_row(text, "dopd (y)")[1] == "90.0"


def test_seed_rows_note_seeds_missing_a_split(tmp_path):
    eval_file(tmp_path / "r-seed1", "student", {"test": 0.5, "ood": 0.2})
    eval_file(tmp_path / "r-seed2", "student", {"test": 0.7})
    text = report_markdown([tmp_path / "r-seed1", tmp_path / "r-seed2"])
    cells = table_row(text, "dopd (2 seeds)")
    assert cells[1] == f"60.0 ± {100 * math.sqrt(0.02):.1f}"
    assert cells[2] == "20.0 n=1"
    assert cells[3].endswith(" †")


def test_seed_stem():
    assert seed_stem("dopd-seed3") == ("dopd", True)
    assert seed_stem("dopd_s12") == ("dopd", True)
    assert seed_stem("dopd_seed0") == ("dopd", True)
    assert seed_stem("dopd") == ("dopd", False)
    assert seed_stem("seeds") == ("seeds", False)


def test_gap_recovered():
    assert gap_recovered(0.7, 0.9, 0.5) == pytest.approx(0.5)
    assert gap_recovered(0.4, 0.9, 0.5) == pytest.approx(-0.25)
    assert gap_recovered(0.6, 0.5, 0.5) is None


def test_report_missing_eval_file_is_one_line_naming_it(runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["report", str(runs["dopd"]), str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert str(empty / "eval" / "student.json") in err
    assert main(["report", str(runs["dopd"]), "--label", "nope"]) == 2
    assert str(runs["dopd"] / "eval" / "nope.json") in capsys.readouterr().err
    assert main(["report", str(tmp_path / "no_such_dir")]) == 2
    assert "no_such_dir" in capsys.readouterr().err


def test_report_malformed_files_name_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    bad = eval_file(run, "student", {"test": 0.5})
    bad.write_text("{not json")
    assert main(["report", str(run)]) == 2
    assert str(bad) in capsys.readouterr().err
    eval_file(run, "student", {"test": 0.5})
    (run / "continual.json").write_text(json.dumps({"stages": ["a"], "R": R2, "baseline": B2}))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "continual.json") in err and "stages" in err


def test_report_label_option_reads_other_results(tmp_path, capsys):
    eval_file(tmp_path / "run", "teacher_priv", {"test": 0.95})
    assert main(["report", str(tmp_path / "run"), "--label", "teacher_priv"]) == 0
    text = capsys.readouterr().out
    assert "## Accuracy % (teacher_priv)" in text and table_row(text, "dopd")[1] == "95.0"
