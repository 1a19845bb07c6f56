"""Every local path a config names, checked before anything loads or a run directory is made.

mmdistill loads local directories and files only and never contacts the Hugging Face Hub: a
name that looks like a Hub repo id (`someorg/somemodel`) and is not a local directory is
reported as one line naming its key, not handed to transformers (which would spend a minute
of requests on it, or fail with a traceback about repo ids).
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmdistill.config.schema import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")  # how a Hub repo id looks
MODELS = ("student", "teacher.model")


def _missing(key: str, value: str, what: str) -> ConfigError:
    if REPO_ID.match(value):
        return ConfigError(f"config key '{key}' is '{value}', which is not a local {what}: mmdistill loads local "
                           f"directories and files only and never downloads (fetch it first, e.g. `huggingface-cli "
                           f"download {value} --local-dir DIR`, and give DIR)")
    return ConfigError(f"config key '{key}': '{value}' does not exist "
                       "(mmdistill loads local directories and files only)")


def check_dir(key: str, value: str | None) -> None:
    if not value:
        return
    path = Path(value)
    if not path.exists():
        raise _missing(key, value, "directory")
    if not path.is_dir():
        raise ConfigError(f"config key '{key}': '{value}' is a file; give the directory that holds it")


def check_file(key: str, value: str | None, base: str | None = None) -> None:
    if not value:
        return
    path = Path(base) / value if base else Path(value)
    if not path.exists():
        raise _missing(key, str(path), "file")
    if not path.is_file():
        raise ConfigError(f"config key '{key}': '{path}' is a directory; give the file")


def check_data(key: str, value: str | None, source: str) -> None:
    """A JSONL file, or shards: a directory, a manifest, a tar, or a brace pattern (whose
    directory must exist; each shard file is checked when the shards are listed)."""
    if not value:
        return
    if source == "shards" and "{" in value:
        folder = Path(value.split("{", 1)[0]).parent
        if not folder.is_dir():
            raise ConfigError(f"config key '{key}': the folder '{folder}' of the shard pattern '{value}' "
                              "does not exist")
        return
    if not Path(value).exists():
        raise ConfigError(f"config key '{key}': '{value}' does not exist")
    if source == "jsonl" and not Path(value).is_file():
        raise ConfigError(f"config key '{key}': '{value}' is a directory; data.source=jsonl reads a .jsonl file")


def check_model(cfg: DictConfig, key: str) -> None:
    """A model's directory, tokenizer, GGUF file, composite LM and tower weights."""
    model = OmegaConf.select(cfg, key)
    check_dir(f"{key}.path", model.path)
    check_dir(f"{key}.tokenizer", model.tokenizer)
    check_file(f"{key}.gguf_file", model.gguf_file, base=model.path)
    check_dir(f"{key}.vision.lm_path", model.vision.lm_path)
    check_file(f"{key}.vision.tower.weights", model.vision.tower.weights)


def check_paths(cfg: DictConfig, models: tuple[str, ...] | None = None, eval_splits: bool = False) -> None:
    """Raise ConfigError, one line naming the key, for the first local path the run would read
    that is not there. `models`: which model groups to check (default: the student, and the
    teacher when teacher.mode=model). Data paths are checked for data.source jsonl and shards;
    `eval_splits`: eval.splits too (`mmdistill eval`)."""
    if models is None:
        models = MODELS if cfg.teacher.mode == "model" else ("student",)
    for key in models:
        check_model(cfg, key)
    if cfg.teacher.mode == "served":
        check_dir("teacher.server.tokenizer", cfg.teacher.server.tokenizer)
    source = cfg.data.source
    if source in ("jsonl", "shards"):
        check_data("data.train_path", cfg.data.train_path, source)
        check_data("data.test_path", cfg.data.test_path, source)
        for i, stage in enumerate(cfg.train.stages):
            check_data(f"train.stages.{i}.train_path", stage.train_path, source)
            check_data(f"train.stages.{i}.test_path", stage.test_path, source)
    if eval_splits:
        for name, path in cfg.eval.splits.items():
            split_source = "shards" if "{" in str(path) or Path(str(path)).is_dir() else "jsonl"
            check_data(f"eval.splits.{name}", str(path), split_source)
