"""The Python API: what `mmdistill train` and `mmdistill eval` do, as calls, and the parts a user
composes into their own loop (docs/api.md). Everything here is importable from `mmdistill`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from mmdistill.adapters import build_adapter
from mmdistill.adapters.scoring import Views
from mmdistill.config import ConfigError, check_paths, load_config, method_options
from mmdistill.core.batch import Batch
from mmdistill.evaluation.evaluate import run_eval
from mmdistill.methods.registry import build_method
from mmdistill.models.loading import load, max_positions
from mmdistill.training import loop


def _config(config: DictConfig | str | Path, overrides: Sequence[str]) -> DictConfig:
    if isinstance(config, DictConfig):
        if overrides:
            raise ConfigError("overrides go with a config name or path; a loaded config is changed with "
                              "load_config(config, overrides)")
        return config
    return load_config(config, list(overrides))


def train(config: DictConfig | str | Path, overrides: Sequence[str] = ()) -> Path:
    """`mmdistill train CONFIG OVERRIDES...` in this process (no launcher: under `accelerate launch`
    every process calls it). Returns the run directory. Bad input raises ConfigError (a config or a
    path, before anything loads) or ValueError/OSError (data, a model, a checkpoint)."""
    cfg = _config(config, overrides)
    check_paths(cfg)
    return loop.train(cfg)


def evaluate(config: DictConfig | str | Path, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict:
    """`mmdistill eval`: the model named by eval.model (a run's student when `run_dir` is given)
    scored on every split of eval.splits. Returns the result `mmdistill eval` writes as JSON."""
    cfg = _config(config, overrides)
    result, _ = run_eval(cfg, Path(run_dir) if run_dir is not None else None)
    return result


def student_and_adapter(cfg: DictConfig):
    """The config's student and its adapter (the one token-level interface over text and vision):
    what a custom loop needs to sample rollouts and score views."""
    model, proc = load(cfg.student, seed=cfg.train.seed)
    return model, build_adapter(proc, cfg.privileged, max_positions(model))


__all__ = ["Batch", "ConfigError", "Views", "build_adapter", "build_method", "evaluate", "load", "load_config",
           "method_options", "student_and_adapter", "train"]
