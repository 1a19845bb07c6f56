"""`mmdistill report`: runs side by side over hand-written run directories (references, gap
recovered, seeds, continual learning)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmdistill.cli import main
from mmdistill.reporting.compare import gap_recovered, report_markdown, seed_stem
from tests.helpers import table_header, table_row

# continual.json's matrices: the 2x2 case of test_continual.py
R2 = [[0.8, 0.1], [0.6, 0.9]]
B2 = [0.2, 0.05]


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
