"""What a run writes as it goes: per-step metrics to metrics.jsonl (one JSON object per line) and
accelerate's trackers (train.report_to), rollout samples, the progress bar."""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mmdistill.config.loading import flat


class MetricsLogger:
    """Opening at `start_step` drops rows logged after it (by a run killed after its last
    checkpoint, or a previous run in the same directory), so the file never repeats a step."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        _keep_until(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def start_trackers(accelerator, cfg, run_dir: Path, start_step: int) -> None:
    """The trackers of train.report_to (make_accelerator gave them to accelerate), started on this
    run: tensorboard writes into RUN_DIR/tensorboard and, on resume, drops the events logged after
    the checkpoint, as metrics.jsonl does; every tracker gets the resolved config, flattened."""
    if not accelerator.log_with:
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
              for k, v in flat(OmegaConf.to_container(cfg, resolve=True)).items()}
    tensorboard = {"purge_step": start_step + 1} if start_step else {}
    try:
        accelerator.init_trackers(cfg.train.tracker_project, config=config, init_kwargs={"tensorboard": tensorboard})
    except Exception as exc:  # each tracker's own errors (mlflow's store, wandb's login): one line naming the key
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"config key 'train.report_to' {list(cfg.train.report_to)}: a tracker did not start: "
                         f"{first}") from exc


def _keep_until(path: Path, start_step: int) -> None:
    """Drop rows logged after `start_step` (by a run killed after its last checkpoint)."""
    kept = []
    if path.exists() and start_step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if row.get("step", 0) <= start_step:
                kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


class RolloutLog:
    """Every `every` steps, what this rank's student wrote: prompt, response, and where its
    images came from (file paths, or shard#key). One file per rank: ranks see different data."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, every: int, adapter):
        self.every, self.adapter, self._file = every, adapter, None
        if every:
            path = Path(run_dir) / "rollouts" / f"rank_{rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            _keep_until(path, start_step)
            self._file = open(path, "a", encoding="utf-8")

    def log(self, step: int, batch) -> None:
        if not self._file or step % self.every:
            return
        for sample, ids, mask in zip(batch.samples, batch.response_ids, batch.response_mask):
            row = {
                "step": step,
                "id": sample.get("id"),
                "prompt": sample.get("prompt") or sample.get("messages"),
                "response": self.adapter.tok.decode(ids[mask].tolist(), skip_special_tokens=True),
                "on_policy": batch.on_policy,
            }
            images = sample.get("image_paths") or ([sample["source"]] if sample.get("images") and sample.get("source")
                                                   else None)
            if images:
                row["images"] = images
            self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


class Progress:
    """The metrics rows (main process, every `train.log_every` steps and the last) and the
    progress bar (local main process) of a run that starts after step `start`."""

    def __init__(self, run_dir: Path, cfg, accelerator, start: int, total: int):
        self.every, self.total, self.accelerator = cfg.train.log_every, total, accelerator
        self.logger = MetricsLogger(run_dir, start) if accelerator.is_main_process else None
        start_trackers(accelerator, cfg, run_dir, start)
        self.bar = tqdm(total=total, initial=start, desc=f"train {cfg.method.name}",
                        disable=not (cfg.train.progress and accelerator.is_local_main_process))

    def logs(self, step: int) -> bool:
        """Whether `step`'s row is written (the same answer on every rank)."""
        return step % self.every == 0 or step == self.total

    def step(self, step: int, row: dict) -> None:
        if self.logger and self.logs(step):
            self.logger.log(step, row)
            self.accelerator.log(row, step=step)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.logger:
            self.logger.close()
