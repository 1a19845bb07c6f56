"""Shard datasets read back for a person: ``validate`` before a long run (every sample decoded,
the manifest held to the files), ``inspect`` to look at samples and their boxes, ``stats`` for
what a dataset holds. Each returns data and the lines to print, so the CLI stays thin."""
from __future__ import annotations

import json
import os
from collections import Counter

from mmdistill.data import boxes as annotate
from mmdistill.data import shards
from mmdistill.data.shards import ShardError

FIELD_ORDER = ("id", "split", "stage", "domain", "task", "checker", "system", "prompt", "messages",
               "hint", "reasoning", "answer", "response")


def _manifest_of(spec: str) -> tuple[str | None, dict | None]:
    if os.path.isdir(spec) or spec.endswith(".json"):
        path = os.path.join(spec, shards.MANIFEST) if os.path.isdir(spec) else spec
        return path, shards.read_manifest(path)
    return None, None


def _fmt_counts(counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "-"


def _prompt_chars(sample: dict) -> int:
    if isinstance(sample.get("prompt"), str):
        return len(sample["prompt"])
    total = 0
    for m in sample.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def _check_manifest(mpath: str, manifest: dict, per_shard: dict, counts: dict, clean: bool) -> list[str]:
    """Disagreements between a manifest and what its files hold; counts are compared only when
    every sample read (``clean``), since bad samples were reported already."""
    problems = []
    for entry in manifest["shards"]:
        url = os.path.join(os.path.dirname(mpath), entry["name"])
        got = per_shard.get(url)
        if got is None:
            continue
        if got["bytes"] != entry["bytes"]:
            problems.append(f"{url}: size {got['bytes']} bytes, manifest says {entry['bytes']}")
        if got["sha256"] != entry["sha256"]:
            problems.append(f"{url}: sha256 differs from {mpath}")
        if clean and got["samples"] != entry["samples"]:
            problems.append(f"{url}: {got['samples']} good samples, manifest says {entry['samples']}")
    if not clean:
        return problems
    total = sum(counts["split"].values())
    if total != manifest["total"]:
        problems.append(f"{mpath}: total {manifest['total']}, the shards hold {total} good samples")
    for field in shards.COUNT_FIELDS:
        listed = manifest["counts"].get(field)
        if not isinstance(listed, dict):
            problems.append(f"{mpath}: counts has no {field!r}")
            continue
        actual = {k: v for k, v in counts[field].items()}
        if field == "split":
            for split, n in listed.items():
                if not actual.get(split):
                    problems.append(f"{mpath}: split {split!r} is listed (count {n}) but has no samples")
        if listed != actual:
            problems.append(f"{mpath}: {field} counts {json.dumps(listed, sort_keys=True)} disagree with "
                            f"the shards' {json.dumps(dict(sorted(actual.items())))}")
    return problems


def validate(specs: list[str], max_pixels: int | None = shards.MAX_IMAGE_PIXELS) -> tuple[dict, list[str]]:
    """({"samples", "shards", "counts", "problems"}, lines): every sample decoded; bad samples,
    corrupt shards, missing files, duplicate ids and manifest disagreements are problems."""
    problems: list[str] = []
    counts = {f: Counter() for f in shards.COUNT_FIELDS}
    ids: dict[str, str] = {}
    n_samples = n_shards = 0
    for spec in specs:
        try:
            urls = shards.shard_urls(spec)
            mpath, manifest = _manifest_of(spec)
        except ShardError as e:
            problems.append(str(e))
            continue
        if not urls:
            problems.append(f"{spec}: the manifest lists no shards ({manifest['total'] if manifest else 0} samples): "
                            "the dataset is empty")
        local = {f: Counter() for f in shards.COUNT_FIELDS}
        per_shard, clean = {}, True
        for url in urls:
            n_shards += 1
            st: dict = {}
            for sample in shards.iter_shard(url, on_bad="skip", stats=st, max_pixels=max_pixels):
                for f in shards.COUNT_FIELDS:
                    local[f][shards.sample_count_key(sample, f)] += 1
                key = shards.sample_key(sample["id"])
                if sample["id"] in ids:
                    problems.append(f"{url}: sample {key!r}: duplicate id {sample['id']!r} "
                                    f"(also in {ids[sample['id']]})")
                ids[sample["id"]] = url
            problems.extend(st["errors"])
            clean = clean and not st["bad"]
            n_samples += st["samples"]
            per_shard[url] = {"samples": st["samples"], "bytes": os.path.getsize(url),
                              "sha256": shards.sha256_file(url)}
        for f in shards.COUNT_FIELDS:
            counts[f].update(local[f])
        if manifest is not None:
            problems.extend(_check_manifest(mpath, manifest, per_shard, local, clean))
    lines = [f"checked {n_samples} samples in {n_shards} shard(s)"]
    lines += [f"  {f + ':':7s} {_fmt_counts(counts[f])}" for f in shards.COUNT_FIELDS]
    lines += [f"BAD {p}" for p in problems]
    lines.append(f"{len(problems)} problem(s)" if problems else "OK")
    report = {"samples": n_samples, "shards": n_shards, "problems": problems,
              "counts": {f: dict(sorted(c.items())) for f, c in counts.items()}}
    return report, lines


def _short(value, width: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split()) if isinstance(value, str) else text
    return text if len(text) <= width else text[: width - 3] + "..."


def _sample_lines(i: int, url: str, sample: dict) -> list[str]:
    key = shards.sample_key(sample["id"])
    lines = [f"[{i}] {url} sample {key!r}"]
    fields = [f for f in FIELD_ORDER if f in sample] + sorted(
        f for f in sample if f not in FIELD_ORDER and f not in ("boxes", "images", "teacher_images"))
    lines += [f"  {f}: {_short(sample[f])}" for f in fields]
    for field in ("images", "teacher_images"):
        ims = sample.get(field) or []
        if ims:
            lines.append(f"  {field}: {len(ims)} ({', '.join(f'{im.width}x{im.height}' for im in ims)})")
    for b in sample.get("boxes") or []:
        lines.append(f"  box: {b['label']!r} {b['box']} image {b.get('image', 0)}")
    return lines


def inspect(specs: list[str], n: int = 3, out_dir: str | None = None) -> list[str]:
    """Lines describing the first ``n`` samples; with ``out_dir`` their images as PNGs, student
    images with their boxes drawn, teacher images as stored."""
    lines: list[str] = []
    written = 0
    i = 0
    for spec in specs:
        for url in shards.shard_urls(spec):
            if i >= n:
                break
            for sample in shards.iter_shard(url):
                if i >= n:
                    break
                i += 1
                lines += _sample_lines(i, url, sample)
                if out_dir is None:
                    continue
                os.makedirs(out_dir, exist_ok=True)
                key = shards.sample_key(sample["id"])
                for j, im in enumerate(sample.get("images") or []):
                    annotate.draw_boxes(im, sample.get("boxes") or [], image_index=j).save(
                        os.path.join(out_dir, f"{key}.img{j}.png"))
                    written += 1
                for j, im in enumerate(sample.get("teacher_images") or []):
                    im.save(os.path.join(out_dir, f"{key}.timg{j}.png"))
                    written += 1
    if out_dir is not None:
        lines.append(f"wrote {written} image(s) to {out_dir}")
    return lines


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def stats(specs: list[str]) -> tuple[dict, list[str]]:
    """(numbers, lines): counts per split/stage/domain/task, images per sample, mean prompt and
    response length in characters, shard sizes; bad samples are counted, not decoded."""
    fields = shards.COUNT_FIELDS + ("task",)
    counts = {f: Counter() for f in fields}
    images, teacher_images = Counter(), Counter()
    prompt_chars, response_chars = [], []
    sizes = {}
    st: dict = {}
    for spec in specs:
        for url in shards.shard_urls(spec):
            before = st.get("samples", 0)
            for sample in shards.iter_shard(url, on_bad="skip", stats=st):
                for f in fields:
                    counts[f][shards.sample_count_key(sample, f)] += 1
                images[len(sample.get("images") or [])] += 1
                teacher_images[len(sample.get("teacher_images") or [])] += 1
                prompt_chars.append(_prompt_chars(sample))
                if isinstance(sample.get("response"), str):
                    response_chars.append(len(sample["response"]))
            sizes[url] = {"bytes": os.path.getsize(url), "samples": st["samples"] - before}
    total_bytes = sum(s["bytes"] for s in sizes.values())
    report = {
        "samples": st.get("samples", 0), "bad": st.get("bad", 0),
        "counts": {f: dict(sorted(c.items())) for f, c in counts.items()},
        "images_per_sample": dict(sorted(images.items())),
        "teacher_images_per_sample": dict(sorted(teacher_images.items())),
        "mean_prompt_chars": _mean(prompt_chars),
        "mean_response_chars": _mean(response_chars), "with_response": len(response_chars),
        "shards": len(sizes), "bytes": total_bytes, "shard_sizes": sizes,
    }
    lines = [f"{report['samples']} samples in {len(sizes)} shard(s), {total_bytes} bytes"
             + (f"; {report['bad']} bad (run validate)" if report["bad"] else "")]
    lines += [f"  {f + ':':7s} {_fmt_counts(counts[f])}" for f in fields]
    lines.append(f"  images per sample: {_fmt_counts(images)}; teacher images: {_fmt_counts(teacher_images)}")
    lines.append(f"  mean prompt chars: {report['mean_prompt_chars']:.1f}; mean response chars: "
                 f"{report['mean_response_chars']:.1f} ({len(response_chars)} with a response)")
    if sizes:
        b = [s["bytes"] for s in sizes.values()]
        lines.append(f"  shard bytes: min {min(b)}, mean {_mean(b):.0f}, max {max(b)}")
    lines += [f"  {url}: {s['samples']} samples, {s['bytes']} bytes" for url, s in sizes.items()]
    return report, lines
