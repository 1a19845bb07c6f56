"""Held-out accuracy during a run: before and after training, and in a continual-learning run
after every stage, on every stage's test split."""
from __future__ import annotations

import json
import os
from pathlib import Path

from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig

from mmdistill.data.sources import load_split, skipped_line
from mmdistill.evaluation.evaluate import accuracy, decoding
from mmdistill.models.weights import collective
from mmdistill.reporting.continual import continual_metrics, write_continual


def heldout_accuracy(accelerator, adapter, model, test: list[dict], cfg: DictConfig) -> float:
    """On the main process (the replicas hold the same weights); a sharded model's forward needs
    every rank (FSDP, ZeRO-3), so then all of them score the same samples."""
    scores = accelerator.is_main_process or collective(model)
    result = [accuracy(adapter, model, test, cfg.eval.batch_size, cfg.eval.max_new_tokens, decoding(cfg.rollout))
              if scores else None]
    return broadcast_object_list(result)[0]


class Continual:
    """The continual-learning record: baseline[j] (before training) and R[i][j], the accuracy on
    stage j's test split after training stage i, kept in continual.json as it grows so a resumed
    run keeps the rows of the stages it finished."""

    def __init__(self, run_dir: Path, stages, cfg: DictConfig, accelerator):
        self.path, self.cfg, self.accelerator = run_dir / "continual.json", cfg, accelerator
        n = cfg.eval.num_samples or None
        self.names = [name for name, _, _ in stages]
        self.tests = []
        for name, _, data in stages:
            stats: dict = {}
            self.tests.append(load_split(data, "test", stats)[:n])
            warning = skipped_line(stats, f"continual stage '{name}' test split")
            if warning:
                accelerator.print(warning)
        for name, test in zip(self.names, self.tests):
            if not test:
                raise ValueError(f"continual stage '{name}' has no test samples (set its test_path or select)")
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.baseline, self.R = saved.get("baseline"), saved.get("R", [])

    def scores(self, adapter, model) -> list[float]:
        return [heldout_accuracy(self.accelerator, adapter, model, test, self.cfg) for test in self.tests]

    def set_row(self, stage: int, row: list[float]) -> None:
        self.R = self.R[:stage] + [row]  # a stage re-run after a resume replaces its row
        self._write()

    def _write(self) -> None:
        if self.accelerator.is_main_process:
            data = {"stages": self.names, "baseline": self.baseline, "R": self.R}
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.path)

    def finish(self) -> dict:
        """ACC, BWT, FWT (reporting.continual), with continual.md and the heatmap."""
        data = {"stages": self.names, "baseline": self.baseline, "R": self.R}
        if self.accelerator.is_main_process:
            write_continual(data, self.path.parent)
        return {**data, **continual_metrics(self.R, self.baseline)}
