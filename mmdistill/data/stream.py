"""Resumable shuffled streams of training batches: one per data source, and the stages of a
continual-learning run in turn."""
from __future__ import annotations

import random
import warnings

from omegaconf import DictConfig, OmegaConf

from mmdistill.data.boxes import MAX_IMAGE_PIXELS
from mmdistill.data.shard_stream import ShardStream
from mmdistill.data.sources import load_split


def train_stream(cfg: DictConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """Batches of training samples: shards are streamed, the other sources shuffled in memory.
    A JSONL file's bad lines skipped under data.on_bad_sample=skip are warned about and counted
    (data_bad_samples) once, on rank 0: every rank reads the whole file."""
    if cfg.source == "shards":
        return ShardStream(cfg.train_path, batch_size, seed, rank=rank, world_size=world_size,
                           num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, epochs=cfg.epochs,
                           select=cfg.select, on_bad=cfg.on_bad_sample,
                           max_image_pixels=cfg.get("max_image_pixels", MAX_IMAGE_PIXELS))
    stats: dict = {}
    stream = SampleStream(load_split(cfg, "train", stats), batch_size, seed)
    if rank == 0:
        for msg in stats["errors"]:
            warnings.warn(f"skipped bad sample: {msg}", stacklevel=2)
        stream.bad_samples = stats["bad"]
    return stream


class SampleStream:
    """Endless batches, reshuffled every epoch from (seed, epoch): its position is two ints,
    so a resumed run continues on exactly the samples it would have seen."""

    def __init__(self, samples: list[dict], batch_size: int, seed: int):
        if not samples:
            raise ValueError("the training split has no samples")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.epoch, self.index = 0, 0
        self.bad_samples = 0  # records skipped when the samples were read (data_bad_samples)
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            batch.append(self.samples[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)


def stages_of(cfg: DictConfig) -> list[tuple[str, int, DictConfig]]:
    """(name, steps, data config) per stage: train.stages, or the whole run as one stage."""
    if not cfg.train.stages:
        return [("train", cfg.train.max_steps, cfg.data)]
    out = []
    for stage in cfg.train.stages:
        data = OmegaConf.merge(cfg.data, {"select": {**cfg.data.select, **stage.select}})
        for key in ("train_path", "test_path"):
            if stage[key]:
                data[key] = stage[key]
        out.append((stage.name, stage.steps, data))
    return out


class StagedStream:
    """The training batches of each stage in turn. Its position is the stage and that stage's
    stream position, so a resumed continual run continues inside the right stage."""

    def __init__(self, stages: list[tuple[str, int, DictConfig]], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.stages, self.batch_size, self.seed, self.rank, self.world_size = stages, batch_size, seed, rank, world_size
        self.ends = [sum(steps for _, steps, _ in stages[: i + 1]) for i in range(len(stages))]
        self.index = 0
        self.stream = self._open(0)

    def _open(self, i: int):
        return train_stream(self.stages[i][2], self.batch_size, self.seed + i, self.rank, self.world_size)

    def stage_of(self, step: int) -> int:
        return next(i for i, end in enumerate(self.ends) if step <= end)

    def enter(self, index: int) -> None:
        if index != self.index:
            self.index, self.stream = index, self._open(index)

    def next(self) -> list[dict]:
        return self.stream.next()

    @property
    def bad_samples(self) -> int:
        return getattr(self.stream, "bad_samples", 0)

    def state_dict(self) -> dict:
        return {"stage": self.index, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["stage"])
        self.stream = self._open(self.index)
        self.stream.load_state_dict(state["stream"])
