"""Where a split's samples come from: a built-in procedural task, a JSONL file or shards."""
from __future__ import annotations

from omegaconf import DictConfig

from mmdistill.data.records import matches, read_jsonl
from mmdistill.data.shard_stream import read_all
from mmdistill.tasks import arith, chain, scenes


def load_split(cfg: DictConfig, split: str) -> list[dict]:
    """Every sample of a split, as records; data.select applies to every source."""
    samples = _load_split(cfg, split)
    if cfg.get("select"):
        samples = [s for s in samples if matches(s, cfg.select)]
    return samples


def _load_split(cfg: DictConfig, split: str) -> list[dict]:
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
    if cfg.source == "shards":
        return read_all(path, on_bad=cfg.on_bad_sample)
    return read_jsonl(path)
