"""Streaming privileged samples from WebDataset shards into the training loop.

Each epoch the shard list is shuffled from (seed, epoch), split by rank and then by DataLoader
worker (webdataset's splitters), read tar by tar, filtered, passed through a seeded shuffle
buffer and batched. Everything is a function of (seed, epoch, rank, worker count), so the
position in the stream is two ints: the epoch and the batches consumed in it. A resumed run
rebuilds the epoch and skips that many batches, so it neither repeats nor skips data.

A bad sample (or a corrupt tar) raises with the shard and key named, or under
on_bad="skip" travels on as a marker that `next()` counts: workers are separate processes,
so the count has to ride with the data to reach the metrics. A corrupt stretch of a tar counts
the samples it made unreadable.
"""
from __future__ import annotations

import random
import warnings
from itertools import islice
from typing import Any, Iterator

import torch
import webdataset as wds

from mmdistill.data.boxes import MAX_IMAGE_PIXELS
from mmdistill.data.records import matches
from mmdistill.data.shards import ShardError, iter_shard, read_manifest, shard_urls

BAD = "__bad__"
LOST = "__lost__"  # how many samples a BAD marker stands for


class EmptySplit(ValueError):
    """A stream with nothing in it would otherwise spin forever."""


def _read(urls: Iterator[dict], select: dict[str, Any], on_bad: str,
          max_pixels: int | None = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """Decoded samples of each shard in turn; under skip, bad ones as markers."""
    for item in urls:
        url = item["url"]
        stats: dict = {"bad": 0, "errors": [], "lost": []}
        try:
            for sample in iter_shard(url, on_bad=on_bad, stats=stats, max_pixels=max_pixels):
                while stats["errors"]:
                    yield {BAD: stats["errors"].pop(0), LOST: stats["lost"].pop(0)}
                if matches(sample, select):
                    yield {**sample, "source": f"{url}#{sample['id']}"}
        except ShardError as exc:
            if on_bad != "skip":
                raise
            stats["errors"].append(str(exc))
            stats["lost"].append(1)
        for msg, lost in zip(stats["errors"], stats["lost"]):
            yield {BAD: msg, LOST: lost}


def _one_line_error(exc: ShardError) -> str:
    """The ShardError's own line: a DataLoader re-raises a worker's error with its traceback
    folded into the message ("Caught ShardError in DataLoader worker process 0. Original
    Traceback ..."), whose last line is the original."""
    text = str(exc)
    if "\n" not in text:
        return text
    marker = f"{ShardError.__module__}.{ShardError.__qualname__}: "
    last = [line for line in text.splitlines() if line.startswith(marker)]
    return last[-1][len(marker):] if last else " ".join(text.split())


def _urls(paths: list) -> list[str]:
    """Every shard of ``paths``; a manifest that lists none is an error saying so, not a reader
    count that comes up short."""
    urls = []
    for p in paths:
        found = shard_urls(p)
        if not found:
            total = read_manifest(p)["total"]  # only a manifest can list nothing
            raise ShardError(f"{p}: the manifest lists no shards ({total} samples): the dataset is empty "
                             "(were all its records skipped or filtered out when it was written?)")
        urls += found
    return urls


class ShardStream:
    """Endless (or `epochs`-long) batches of decoded samples for this rank.

    Shards are divided among ranks x workers; each of those needs at least one shard, else
    some would see no data at all (an error, not a silent imbalance).
    """

    def __init__(self, path: Any, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle_buffer: int = 1000, epochs: int = 0, select: dict | None = None,
                 on_bad: str = "raise", max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        paths = path if isinstance(path, (list, tuple)) else [path]
        self.urls = _urls(paths)
        readers = world_size * max(1, num_workers)
        if len(self.urls) < readers:
            raise ValueError(f"{len(self.urls)} shard(s) in {path} for {world_size} rank(s) x {max(1, num_workers)} "
                             f"worker(s): every reader needs at least one shard (write smaller shards)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.epochs = num_workers, shuffle_buffer, epochs
        self.select, self.on_bad, self.max_image_pixels = dict(select or {}), on_bad, max_image_pixels
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
        max_pixels = self.max_image_pixels
        stages = [
            wds.SimpleShardList(urls),
            lambda src: islice(src, rank, None, world_size),
            wds.split_by_worker,
            lambda src: _read(src, select, on_bad, max_pixels),
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
            except ShardError as exc:  # under raise; from a worker it comes back with its traceback folded in
                raise ShardError(_one_line_error(exc)) from None
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
                    self.bad_samples += s.get(LOST, 1)
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


def read_all(path: Any, select: dict | None = None, on_bad: str = "raise", stats: dict | None = None,
             max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> list[dict]:
    """Every matching sample of a shard set, in shard order (evaluation splits). Under skip the
    bad samples are counted in ``stats`` (``{"bad": n, "errors": [msg]}``), never dropped unsaid."""
    stats = {} if stats is None else stats
    stats.setdefault("bad", 0)
    stats.setdefault("errors", [])
    paths = path if isinstance(path, (list, tuple)) else [path]
    urls = [{"url": u} for u in _urls(paths)]
    out = []
    for s in _read(iter(urls), dict(select or {}), on_bad, max_image_pixels):
        if BAD in s:
            stats["bad"] += s[LOST]
            stats["errors"].append(s[BAD])
        else:
            out.append(s)
    if not out:
        skipped = f"; {stats['bad']} bad sample(s) skipped (first: {stats['errors'][0]})" if stats["bad"] else ""
        raise EmptySplit(f"no samples in {path}" + (f" matching {select}" if select else "") + skipped)
    return out
