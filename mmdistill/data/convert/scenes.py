"""The procedural scenes task as samples, and the scenes benchmark suite written in one go."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmdistill.data.convert.common import Located, check_stamp, samples_only, stamp, write_shards
from mmdistill.tasks import scenes

# --- 5. procedural scenes ---------------------------------------------------------------------

def scenes_records(n: int, seed: int = 0, split: str = "train", *, stage: int = 0, id_prefix: str = "",
                   **knobs) -> Located:
    """(where, sample) pairs of :func:`from_scenes`."""
    check_stamp(split, scenes.DOMAIN, stage)
    for s in scenes.make_samples(n, seed, split, **knobs):
        s = dict(s, id=id_prefix + s["id"], checker="scenes",
                 boxes=[dict(b, image=0) for b in s["boxes"]])
        yield f"scenes {s['id']}", stamp(s, split, scenes.DOMAIN, stage)


def from_scenes(n: int, seed: int = 0, split: str = "train", **kwargs) -> Iterator[dict]:
    """:func:`mmdistill.tasks.scenes.make_samples` as stamped samples: ``checker="scenes"``,
    ``stage``, boxes with their ``image`` index, ids prefixed with ``id_prefix``. Other keyword
    arguments are make_samples' knobs (image_size, min/max_objects, question_types, colors,
    shapes, exclude_combos, only_combos)."""
    return samples_only(scenes_records(n, seed, split, **kwargs))


HELD_OUT_COMBOS = ("red circle", "green square", "blue triangle")  # every colour and shape still seen in train
CL_STAGES = ("count", "attribute", "spatial")  # cl_stage1, 2, 3


@dataclass
class SuiteSizes:
    """Samples per part of the scenes suite (small by default: a smoke-sized benchmark)."""

    train: int = 1000
    test: int = 200
    ood: int = 200  # each of ood_objects and ood_combos
    cl_train: int = 300  # per continual-learning stage
    cl_test: int = 100


def scenes_suite_parts(seed: int, sizes: SuiteSizes, *, image_size: int = 64,
                       held_out=HELD_OUT_COMBOS, ood_objects=(5, 7), max_objects: int = 4) -> list[tuple[str, Located]]:
    """(folder, records) per part of the benchmark layout; see :func:`write_scenes_suite`."""
    held_out = list(held_out)
    base = {"image_size": image_size, "max_objects": max_objects, "exclude_combos": held_out}
    lo, hi = ood_objects
    parts = [
        ("train", scenes_records(sizes.train, seed, "train", id_prefix="train-", **base)),
        ("test", scenes_records(sizes.test, seed, "test", id_prefix="test-", **base)),
        ("ood_objects", scenes_records(sizes.ood, seed, "test", id_prefix="ood_objects-",
                                       **dict(base, min_objects=lo, max_objects=hi))),
        ("ood_combos", scenes_records(sizes.ood, seed, "test", id_prefix="ood_combos-", image_size=image_size,
                                      max_objects=max_objects, only_combos=held_out)),
    ]
    for stage, qtype in enumerate(CL_STAGES, 1):
        for split, n in (("train", sizes.cl_train), ("test", sizes.cl_test)):
            parts.append((f"cl_stage{stage}/{split}",
                          scenes_records(n, seed, split, stage=stage, id_prefix=f"cl_stage{stage}-",
                                         question_types=(qtype,), **base)))
    return parts


def write_scenes_suite(out_dir, seed: int = 0, sizes: SuiteSizes | None = None, *, image_size: int = 64,
                       held_out=HELD_OUT_COMBOS, ood_objects=(5, 7), max_objects: int = 4,
                       max_bytes: int = 64 * 2**20, max_count: int = 10_000, overwrite: bool = False) -> dict:
    """The scenes benchmark in one go, deterministic for ``seed``; each folder a shard dataset:

    * ``train`` / ``test``: in distribution (1..max_objects objects, every question type), the
      ``held_out`` colour-shape pairs never drawn;
    * ``ood_objects``: test images with more objects (``ood_objects``, default 5-7);
    * ``ood_combos``: test images made only of the held-out pairs;
    * ``cl_stage1`` / ``2`` / ``3`` (each with ``train`` and ``test``): count, then attribute,
      then spatial questions, stamped ``stage`` 1, 2, 3, for continual learning.

    Writes ``out_dir/suite.json`` (the parameters and counts per part) and returns it.
    """
    sizes = sizes or SuiteSizes()
    meta = {"converter": "scenes-suite", "seed": seed, "image_size": image_size, "held_out": list(held_out),
            "ood_objects": list(ood_objects), "max_objects": max_objects, "sizes": vars(sizes)}
    counts = {}
    for name, records in scenes_suite_parts(seed, sizes, image_size=image_size, held_out=held_out,
                                            ood_objects=ood_objects, max_objects=max_objects):
        manifest = write_shards(records, Path(out_dir) / name, max_bytes=max_bytes, max_count=max_count,
                                meta=dict(meta, part=name), overwrite=overwrite)
        counts[name] = manifest["total"]
    suite = dict(meta, parts=counts)
    with open(Path(out_dir) / "suite.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(suite, f, indent=2, sort_keys=True)
        f.write("\n")
    return suite


