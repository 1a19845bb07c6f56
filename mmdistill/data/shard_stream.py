"""Streaming privileged samples from WebDataset shards into the training loop.

Each epoch the shard list is shuffled from (seed, epoch), split by rank and then by DataLoader
worker (webdataset's splitters), read tar by tar, filtered, passed through a seeded shuffle
buffer and batched. Everything is a function of (seed, epoch, rank, worker count), so the
position in the stream is two ints: the epoch and the batches consumed in it. A resumed run
rebuilds the epoch and skips that many batches, so it neither repeats nor skips data.

A bad sample (or a corrupt tar) raises with the shard and key named, or under
on_bad="skip" travels on as a marker that `next()` counts: workers are separate processes,
so the count has to ride with the data to reach the metrics.
"""
from __future__ import annotations

import random
import warnings
from itertools import islice
from typing import Any, Iterator

import torch
import webdataset as wds

from mmdistill.data.records import matches
from mmdistill.data.shards import ShardError, iter_shard, shard_urls

BAD = "__bad__"


class EmptySplit(ValueError):
    """A stream with nothing in it would otherwise spin forever."""


def _read(urls: Iterator[dict], select: dict[str, Any], on_bad: str) -> Iterator[dict]:
    """Decoded samples of each shard in turn; under skip, bad ones as markers."""
    for item in urls:
        url = item["url"]
        stats: dict = {"bad": 0, "errors": []}
        try:
            for sample in iter_shard(url, on_bad=on_bad, stats=stats):
                while stats["errors"]:
                    yield {BAD: stats["errors"].pop(0)}
                if matches(sample, select):
                    yield {**sample, "source": f"{url}#{sample['id']}"}
        except ShardError as exc:
            if on_bad != "skip":
                raise
            stats["errors"].append(str(exc))
        for msg in stats["errors"]:
            yield {BAD: msg}


class ShardStream:
    """Endless (or `epochs`-long) batches of decoded samples for this rank.

    Shards are divided among ranks x workers; each of those needs at least one shard, else
    some would see no data at all (an error, not a silent imbalance).
    """

    def __init__(self, path: Any, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle_buffer: int = 1000, epochs: int = 0, select: dict | None = None,
                 on_bad: str = "raise"):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        paths = path if isinstance(path, (list, tuple)) else [path]
        self.urls = [u for p in paths for u in shard_urls(p)]
        readers = world_size * max(1, num_workers)
        if len(self.urls) < readers:
            raise ValueError(f"{len(self.urls)} shard(s) in {path} for {world_size} rank(s) x {max(1, num_workers)} "
                             f"worker(s): every reader needs at least one shard (write smaller shards)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.epochs = num_workers, shuffle_buffer, epochs
        self.select, self.on_bad = dict(select or {}), on_bad
        self.epoch, self.batches = 0, 0
        self.bad_samples = 0
        self._it: Iterator[list[dict]] | None = None
        self._fresh = True

    def _pipeline(self, epoch: int) -> wds.DataPipeline:
        urls = list(self.urls)
        random.Random(f"{self.seed}|{epoch}").shuffle(urls)
        # Stages capture values, never self: a stream <-> loader cycle would leave worker shutdown to
        # the garbage collector, which then waits out the workers' timeouts.
        rank, world_size, select, on_bad = self.rank, self.world_size, self.select, self.on_bad
        stages = [
            wds.SimpleShardList(urls),
            lambda src: islice(src, rank, None, world_size),
            wds.split_by_worker,
            lambda src: _read(src, select, on_bad),
        ]
        if self.shuffle_buffer > 1:
            seed = (self.seed * 1_000_003 + epoch) * 1009 + self.rank
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed))
        return wds.DataPipeline(*stages, wds.batched(self.batch_size, collation_fn=list, partial=True))

    def _start(self, epoch: int, skip: int) -> None:
        pipeline = self._pipeline(epoch)
        if self.num_workers:
            # Its own generator: a DataLoader draws worker seeds from the global RNG otherwise, and
            # a resumed run (which starts its loader at another step) would sample differently.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._it = iter(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                                                        generator=generator))
        else:
            self._it = iter(pipeline)
        for _ in range(skip):
            next(self._it)
        self._fresh = skip == 0  # nothing handed out yet in this epoch

    def next(self) -> list[dict]:
        """The next batch; StopIteration after `epochs` epochs (0 = never), and on every call after."""
        while True:
            if self.epochs and self.epoch >= self.epochs:
                raise StopIteration
            if self._it is None:
                self._start(self.epoch, self.batches)
            try:
                batch = next(self._it)
            except StopIteration:
                if self._fresh:
                    raise EmptySplit(
                        f"no usable samples in {len(self.urls)} shard(s) ({self.urls[0]} ...) for rank {self.rank}"
                        + (f" matching {self.select}" if self.select else "")
                        + (f"; {self.bad_samples} bad sample(s) skipped" if self.bad_samples else "")
                    ) from None
                self.epoch, self.batches, self._it = self.epoch + 1, 0, None
                continue
            self.batches += 1
            for s in batch:
                if BAD in s:
                    self.bad_samples += 1
                    warnings.warn(f"skipped bad sample: {s[BAD]}", stacklevel=2)
            good = [s for s in batch if BAD not in s]
            if good:
                self._fresh = False
                return good

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "bad_samples": self.bad_samples}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.bad_samples = int(state.get("bad_samples", 0))
        self._it = None


def read_all(path: Any, select: dict | None = None, on_bad: str = "raise") -> list[dict]:
    """Every matching sample of a shard set, in shard order (evaluation splits)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    urls = [{"url": u} for p in paths for u in shard_urls(p)]
    out = [s for s in _read(iter(urls), dict(select or {}), on_bad) if BAD not in s]
    if not out:
        raise EmptySplit(f"no samples in {path}" + (f" matching {select}" if select else ""))
    return out
