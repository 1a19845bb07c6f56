"""Where a split's samples come from: a built-in procedural task, a JSONL file or shards."""
from __future__ import annotations

from omegaconf import DictConfig

from mmdistill.data.boxes import MAX_IMAGE_PIXELS
from mmdistill.data.records import matches, read_jsonl
from mmdistill.data.shard_stream import read_all
from mmdistill.tasks import arith, chain, scenes


def load_split(cfg: DictConfig, split: str, stats: dict | None = None) -> list[dict]:
    """Every sample of a split, as records; data.select applies to every source. Under
    data.on_bad_sample=skip the bad samples skipped are counted in ``stats`` (``{"bad": n,
    "errors": [msg]}``): :func:`skipped_line` says so in one line."""
    stats = {} if stats is None else stats
    stats.setdefault("bad", 0)
    stats.setdefault("errors", [])
    samples = _load_split(cfg, split, stats)
    if cfg.get("select"):
        samples = [s for s in samples if matches(s, cfg.select)]
    return samples


def skipped_line(stats: dict, what: str) -> str | None:
    """``"warning: <what>: skipped 2 bad sample(s) (data.on_bad_sample=skip); first: ..."``, or
    None when nothing was skipped."""
    if not stats.get("bad"):
        return None
    return (f"warning: {what}: skipped {stats['bad']} bad sample(s) (data.on_bad_sample=skip); "
            f"first: {stats['errors'][0] if stats.get('errors') else '?'}")


def _load_split(cfg: DictConfig, split: str, stats: dict) -> list[dict]:
    if cfg.source == "arith":
        n = cfg.arith.num_train if split == "train" else cfg.arith.num_test
        return arith.make_samples(n, cfg.arith.seed, split=split, digits=cfg.arith.digits, ops=tuple(cfg.arith.ops))
    if cfg.source == "chain":
        n = cfg.chain.num_train if split == "train" else cfg.chain.num_test
        return chain.make_samples(n, cfg.chain.seed, split=split, steps=cfg.chain.steps,
                                  ops=tuple(dict.fromkeys(cfg.chain.ops)))
    if cfg.source == "scenes":
        sc = cfg.scenes
        return scenes.make_samples(sc.num_train if split == "train" else sc.num_test, sc.seed, split=split,
                                   image_size=sc.image_size, min_objects=sc.min_objects, max_objects=sc.max_objects,
                                   question_types=tuple(sc.question_types))
    path = cfg.train_path if split == "train" else cfg.test_path
    if not path:
        return []
    max_pixels = cfg.get("max_image_pixels", MAX_IMAGE_PIXELS)
    if cfg.source == "shards":
        return read_all(path, on_bad=cfg.on_bad_sample, stats=stats, max_image_pixels=max_pixels)
    return read_jsonl(path, on_bad=cfg.on_bad_sample, stats=stats, max_pixels=max_pixels)
