"""Samples/s of the shard stream on image samples (224 px JPEG), with 0, 1 and 2 workers.

    python benchmarks/bench_loader.py [--n 2000] [--workers 0 1 2] [--content noise|scenes]

Writes scenes samples (one 224x224 JPEG each, with photo-like noise by default; boxes, hints) to
temporary shards, then times ShardStream over one epoch: tar reading, JSON and schema checks, JPEG
decoding to PIL, the shuffle buffer and batching, i.e. everything the training loop receives.
Target: at least 500 samples/s with 2 workers on the 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmdistill.data.shard_stream import ShardStream
from mmdistill.data.shards import ShardWriter
from mmdistill.tasks.scenes import make_samples


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noisy(image, rng: np.random.Generator):
    """The scene under photo-like noise: JPEGs that are large and slow to decode, unlike flat shapes."""
    arr = np.asarray(image, dtype=np.int16) + rng.integers(-60, 60, size=(*image.size[::-1], 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_shards(out: Path, n: int, content: str) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(out, prefix="bench", max_count=250) as w:
        for s in make_samples(n, 0, "train", image_size=224, max_objects=6):
            images = [noisy(im, rng) if content == "noise" else im for im in s["images"]]
            w.write({**s, "images": [jpeg(im) for im in images]})


def measure(path: Path, workers: int, batch_size: int) -> tuple[float, int]:
    stream = ShardStream(path, batch_size, seed=0, num_workers=workers, epochs=1)
    n, t0 = 0, time.perf_counter()
    while True:
        try:
            n += len(stream.next())
        except StopIteration:
            return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--content", choices=["scenes", "noise"], default="noise",
                    help="noise (default): photo-like JPEGs, the honest case; scenes: flat shapes, cheap to decode")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_shards(Path(tmp), args.n, args.content)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.tar"))
        print(f"wrote {args.n} samples, {size / 2**20:.1f} MiB in {len(list(Path(tmp).glob('*.tar')))} shards "
              f"({time.perf_counter() - t0:.1f} s)")
        measure(Path(tmp), 0, args.batch_size)  # warm the page cache
        print(f"{'workers':>8} {'samples/s':>10} {'samples':>8}")
        for w in args.workers:
            rate, n = measure(Path(tmp), w, args.batch_size)
            print(f"{w:>8} {rate:>10.0f} {n:>8}")


if __name__ == "__main__":
    main()
