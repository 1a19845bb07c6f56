"""Per-step metrics to metrics.jsonl (one JSON object per line) and tensorboard."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    """Opening at `start_step` drops rows logged after it (by a run killed after its last
    checkpoint, or a previous run in the same directory), so the file never repeats a step."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if self.path.exists() and start_step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", 0) <= start_step:
                    kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
