"""The preflight (training/preflight.py): what can be checked before any model loads is checked,
in seconds, and reported as one line; the run directory is not made.

Each case is a real bad input: a missing path, a JSONL file without the field privileged.text
names, tokenizers whose vocabularies differ, a tokenizer without a chat template, a corrupt
shard. `train(cfg)` is called as `mmdistill train` calls it: no model may load before the
error (the run directory, made right before the student loads, must not exist)."""
from __future__ import annotations

import shutil

import pytest

from mmdistill.cli import main
from mmdistill.config import REPO_ROOT, ConfigError, load_config
from mmdistill.models.tokenizer import build_tokenizer
from mmdistill.training.loop import train
from mmdistill.training.preflight import first_samples, preflight
from tests.helpers import write_lines, write_shards

RECORDS = [{"prompt": f"What is {i}+1?", "answer": str(i + 1), "response": f"Answer: {i + 1}", "hint": f"{i} and 1"}
           for i in range(12)]


def jsonl_cfg(tmp_path, records, *overrides):
    path = write_lines(tmp_path / "train.jsonl", records)
    return load_config("tiny", ["data.source=jsonl", f"data.train_path={path}", f"train.output_dir={tmp_path / 'run'}",
                                "eval.num_samples=0", *overrides])


def fails_before_the_run_directory(cfg, exc_type, match):
    with pytest.raises(exc_type, match=match):
        train(cfg)
    assert not (cfg.train.output_dir and (REPO_ROOT / cfg.train.output_dir).exists())


def test_good_data_passes(tmp_path):
    preflight(jsonl_cfg(tmp_path, RECORDS, "method=full_opd"))


@pytest.mark.parametrize("method, text, missing", [
    ("full_opd", "{hint}", "hint"),
    ("full_opd", "{reasoning}", "reasoning"),
    ("partial_opd", "{hint}", "hint"),
    ("ar_opd", "{hint}", "hint"),
    ("dopd", "{hint}", "hint"),
])
def test_a_field_privileged_text_names_is_missing(tmp_path, method, text, missing):
    records = [{k: v for k, v in r.items() if k != missing} for r in RECORDS]
    cfg = jsonl_cfg(tmp_path, records, f"method={method}", f"privileged.text=\"{text}\"")
    fails_before_the_run_directory(cfg, KeyError, f"sample 'train.jsonl:1' has no field '{missing}'")


def test_the_partial_views_field_is_missing(tmp_path):
    cfg = jsonl_cfg(tmp_path, RECORDS, "method=partial_opd", "privileged.partial_field=reasoning")
    fails_before_the_run_directory(cfg, KeyError, r"sample 'train.jsonl:1' has no field 'reasoning' that the partial "
                                                  r"view cuts \(privileged.partial_field\)")


def test_a_method_that_reads_no_privileged_view_needs_no_hint(tmp_path):
    preflight(jsonl_cfg(tmp_path, [{k: v for k, v in r.items() if k != "hint"} for r in RECORDS], "method=opd"))


@pytest.mark.parametrize("method", ["sft", "gkd"])
def test_an_off_policy_method_needs_the_oracle_response(tmp_path, method):
    cfg = jsonl_cfg(tmp_path, [{k: v for k, v in r.items() if k != "response"} for r in RECORDS], f"method={method}")
    fails_before_the_run_directory(cfg, KeyError, f"train sample 'train.jsonl:1' has no field 'response' "
                                                  f"\\(method={method} trains on the oracle response\\)")


def test_the_test_split_is_read_when_held_out_accuracy_reads_it(tmp_path):
    test = write_lines(tmp_path / "test.jsonl", ['{"prompt": "1+1?", "answer": 2', RECORDS[0]])
    cfg = jsonl_cfg(tmp_path, RECORDS, f"data.test_path={test}", "eval.num_samples=4")
    fails_before_the_run_directory(cfg, ValueError, f"{test}:1: not valid JSON")
    preflight(jsonl_cfg(tmp_path, RECORDS, f"data.test_path={test}", "eval.num_samples=0"))


def test_a_missing_model_path_stops_before_the_run_directory(tmp_path):
    cfg = load_config("tiny", ["student.path=/nope/model", f"train.output_dir={tmp_path / 'run'}"])
    fails_before_the_run_directory(cfg, ConfigError, "config key 'student.path': '/nope/model' does not exist")


def test_teacher_and_student_vocabularies_must_agree(tmp_path):
    other = build_tokenizer(str(tmp_path / "tok"), split_digits=False)
    assert other.get_vocab() != build_tokenizer().get_vocab()
    cfg = load_config("tiny", [f"teacher.model.tokenizer={tmp_path / 'tok'}", f"train.output_dir={tmp_path / 'run'}"])
    fails_before_the_run_directory(cfg, ValueError, "teacher/student vocab mismatch")
    # a self-teacher has no vocabulary of its own
    preflight(load_config("tiny", [f"teacher.model.tokenizer={tmp_path / 'tok'}", "teacher.mode=frozen_student"]))


def test_a_tokenizer_without_a_chat_template(tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(REPO_ROOT / "assets" / "tokenizer", tok)
    (tok / "chat_template.jinja").unlink()
    cfg = load_config("tiny", [f"student.tokenizer={tok}", f"train.output_dir={tmp_path / 'run'}"])
    fails_before_the_run_directory(cfg, ValueError, f"tokenizer '{tok}' has no chat template")


def test_a_corrupt_shard_stops_before_any_model_loads(tmp_path):
    shards = write_shards(tmp_path / "shards", [{**r, "id": f"s{i}", "split": "train"} for i, r in enumerate(RECORDS)])
    tar = shards / "s-000000.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    cfg = load_config("tiny", ["data.source=shards", f"data.train_path={shards}",
                               f"train.output_dir={tmp_path / 'run'}"])
    fails_before_the_run_directory(cfg, ValueError, str(tar))


def test_first_samples_reads_only_what_it_needs(tmp_path):
    shards = write_shards(tmp_path / "shards", [{**r, "id": f"s{i}", "split": "train"} for i, r in enumerate(RECORDS)])
    cfg = load_config("tiny", ["data.source=shards", f"data.train_path={shards}"])
    assert [s["id"] for s in first_samples(cfg.data, "train", 3)] == ["s0", "s1", "s2"]
    selected = load_config("tiny", ["data.source=shards", f"data.train_path={shards}", "data.select={id: s5}"])
    assert [s["id"] for s in first_samples(selected.data, "train")] == ["s5"]
    assert len(first_samples(load_config("scenes_dopd").data, "train", 2)) == 2  # a procedural task makes only those


def test_the_command_prints_one_line_and_exit_2(tmp_path, capsys):
    records = [{k: v for k, v in r.items() if k != "hint"} for r in RECORDS]
    path = write_lines(tmp_path / "train.jsonl", records)
    args = ["train", "tiny", "method=full_opd", "data.source=jsonl", f"data.train_path={path}",
            f"train.output_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "mmdistill: sample 'train.jsonl:1' has no field 'hint' needed by privileged.text\n"
    assert not (tmp_path / "run").exists()
    with pytest.raises(KeyError):  # --traceback: the error itself, with its traceback
        main([*args, "--traceback"])
