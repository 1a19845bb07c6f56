"""Every local path a config names is checked before anything loads (config/paths.py): one line
naming the key; a Hub-like repo id is never looked up, only named as not local."""
from __future__ import annotations

import pytest

from mmdistill.config import REPO_ROOT, ConfigError, check_paths, load_config
from tests.helpers import write_lines, write_shards

ASSETS = REPO_ROOT / "assets"


def path_error(overrides, **kw) -> str:
    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError) as info:
        check_paths(cfg, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def jsonl(tmp_path):
    return write_lines(tmp_path / "train.jsonl", [{"prompt": "1+1?", "answer": "2", "hint": "one plus one"}])


@pytest.mark.parametrize("key, value", [
    ("student.path", "/nope/model"),
    ("student.tokenizer", "/nope/tokenizer"),
    ("teacher.model.path", "/nope/teacher"),
    ("teacher.model.tokenizer", "/nope/tokenizer"),
    ("student.vision.lm_path", "/nope/lm"),
])
def test_a_missing_model_directory_names_its_key(key, value):
    extra = ["student.vision.tower.name=vit_tiny_patch16_224"] if "vision" in key else []
    msg = path_error([f"{key}={value}", *extra])
    assert msg == f"config key '{key}': '{value}' does not exist (mmdistill loads local directories and files only)"


@pytest.mark.parametrize("key", ["student.path", "teacher.model.path", "student.tokenizer"])
def test_a_hub_repo_id_is_named_as_not_local_and_never_looked_up(key):
    msg = path_error([f"{key}=someorg/somemodel"])
    assert msg.startswith(f"config key '{key}' is 'someorg/somemodel', which is not a local directory: "
                          "mmdistill loads local directories and files only and never downloads")


def test_a_model_path_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert "is a file; give the directory that holds it" in path_error([f"student.path={f}"])


def test_a_gguf_file_is_looked_for_inside_the_model_directory(tmp_path):
    msg = path_error([f"student.path={tmp_path}", "student.gguf_file=model.Q4.gguf"])
    assert msg.startswith(f"config key 'student.gguf_file': '{tmp_path / 'model.Q4.gguf'}' does not exist")
    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    check_paths(load_config("tiny", [f"student.path={tmp_path}", "student.gguf_file=model.Q4.gguf"]))


def test_missing_tower_weights_are_named():
    msg = path_error(["student.vision.tower.name=vit_tiny_patch16_224", "student.vision.tower.weights=/nope/tower.pt"])
    assert msg.startswith("config key 'student.vision.tower.weights': '/nope/tower.pt' does not exist")


def test_a_self_teacher_has_no_teacher_paths_to_check():
    cfg = load_config("tiny", ["teacher.mode=frozen_student", "teacher.model.path=/nope/teacher"])
    check_paths(cfg)


@pytest.mark.parametrize("key", ["data.train_path", "data.test_path", "train.stages.0.train_path",
                                 "train.stages.0.test_path"])
def test_a_missing_data_file_names_its_key(key, jsonl):
    overrides = ["data.source=jsonl", f"data.train_path={jsonl}"]
    if key.startswith("train.stages"):
        overrides.append("train.stages=[{name: a, steps: 2}]")
    overrides.append(f"{key}=/nope/data.jsonl")
    assert path_error(overrides) == f"config key '{key}': '/nope/data.jsonl' does not exist"


def test_jsonl_data_must_be_a_file(tmp_path):
    msg = path_error(["data.source=jsonl", f"data.train_path={tmp_path}"])
    assert msg.endswith("is a directory; data.source=jsonl reads a .jsonl file")


def test_shards_a_directory_and_a_brace_pattern(tmp_path):
    records = [{"id": f"s{i}", "split": "train", "prompt": "1+1?", "answer": "2"} for i in range(3)]
    shards = write_shards(tmp_path / "shards", records)
    check_paths(load_config("tiny", ["data.source=shards", f"data.train_path={shards}"]))
    check_paths(load_config("tiny", ["data.source=shards", f"data.train_path={shards}/s-{{000000..000000}}.tar"]))
    msg = path_error(["data.source=shards", "data.train_path=/nope/shards/s-{000000..000003}.tar"])
    assert msg == ("config key 'data.train_path': the folder '/nope/shards' of the shard pattern "
                   "'/nope/shards/s-{000000..000003}.tar' does not exist")


def test_eval_splits_are_checked_when_asked(jsonl):
    overrides = [f"eval.splits={{ood: /nope/ood.jsonl, test: {jsonl}}}"]
    check_paths(load_config("tiny", overrides))  # training does not read them
    assert path_error(overrides, eval_splits=True) == "config key 'eval.splits.ood': '/nope/ood.jsonl' does not exist"


def test_the_shipped_assets_pass():
    cfg = load_config("arith_opd")
    assert cfg.student.path and cfg.teacher.model.path
    check_paths(cfg, eval_splits=True)
