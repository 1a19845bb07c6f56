"""``python -m data_tools``: write task data and build the tokenizer."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Sequence


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records one JSON object per line (utf-8), atomically via ``path + '.tmp'``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


def _cmd_arith(args: argparse.Namespace) -> int:
    from mmdistill.tasks import arith

    ops = tuple(args.ops)
    bad = [op for op in ops if op not in arith.OPS]
    if bad or not ops:
        print(f"error: --ops must be characters from {''.join(arith.OPS)!r}, got {args.ops!r}", file=sys.stderr)
        return 2
    ops = tuple(dict.fromkeys(ops))  # dedupe, keep order
    try:
        samples = arith.make_samples(args.n, args.seed, split=args.split, digits=args.digits, ops=ops)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = write_jsonl(args.out, samples)
    print(f"wrote {n} samples to {args.out}")
    return 0


def _cmd_chain(args: argparse.Namespace) -> int:
    from mmdistill.tasks import arith, chain

    ops = tuple(dict.fromkeys(args.ops))
    if not ops or set(ops) - set(arith.OPS):
        print(f"error: --ops must be characters from {''.join(arith.OPS)!r}, got {args.ops!r}", file=sys.stderr)
        return 2
    try:
        samples = chain.make_samples(args.n, args.seed, split=args.split, steps=args.steps, ops=ops)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = write_jsonl(args.out, samples)
    print(f"wrote {n} samples to {args.out}")
    return 0


def _cmd_build_tokenizer(args: argparse.Namespace) -> int:
    from mmdistill.models.tokenizer import build_tokenizer

    tok = build_tokenizer(args.out, split_digits=not args.no_split_digits)
    print(f"wrote tokenizer (vocab {len(tok)}) to {args.out}")
    return 0


# --- shard datasets: validate, inspect, stats ------------------------------------------------

def _shard_errors(fn):
    """A missing file or corrupt shard stops with one line, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from mmdistill.data.shards import ShardError

        try:
            return fn(args)
        except ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return run


@_shard_errors
def _cmd_validate(args: argparse.Namespace) -> int:
    from data_tools.inspect_tools import validate

    report, lines = validate(args.shards, args.max_image_pixels)
    print("\n".join(lines))
    return 1 if report["problems"] else 0


@_shard_errors
def _cmd_inspect(args: argparse.Namespace) -> int:
    from data_tools.inspect_tools import inspect

    if args.n < 1:
        print(f"error: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    print("\n".join(inspect(args.shards, args.n, args.out)))
    return 0


@_shard_errors
def _cmd_stats(args: argparse.Namespace) -> int:
    from data_tools.inspect_tools import stats

    report, lines = stats(args.shards)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else "\n".join(lines))
    return 1 if report["bad"] else 0


def _add_shard_commands(sub) -> None:
    shards_help = "shard dirs, manifest.json files, brace patterns (dir/shard-{000000..000003}.tar) or .tar files"
    v = sub.add_parser(
        "validate",
        help="decode every sample of a shard dataset; exit 1 on any bad sample or manifest mismatch",
        description="Read every sample of every shard, print counts per split/stage/domain and every "
                    "problem (shard, sample key, reason). Exit 1 if anything is bad.",
    )
    v.add_argument("shards", nargs="+", metavar="SHARDS", help=shards_help)
    _max_pixels_opt(v)
    v.set_defaults(func=_cmd_validate)

    i = sub.add_parser(
        "inspect",
        help="print the first samples of a shard dataset; --out writes their images with boxes drawn",
        description="Print the first N samples (fields, image sizes, boxes); with --out write PNGs of "
                    "the student images with boxes drawn, and the teacher images.",
    )
    i.add_argument("shards", nargs="+", metavar="SHARDS", help=shards_help)
    i.add_argument("--n", type=int, default=3, help="number of samples (default 3)")
    i.add_argument("--out", default=None, help="directory for KEY.img0.png / KEY.timg0.png")
    i.set_defaults(func=_cmd_inspect)

    s = sub.add_parser(
        "stats",
        help="counts per split/stage/domain/task, images per sample, text lengths, shard sizes",
        description="Summarise a shard dataset: counts per split/stage/domain/task, images per sample, "
                    "mean prompt/response length in characters, shard sizes.",
    )
    s.add_argument("shards", nargs="+", metavar="SHARDS", help=shards_help)
    s.add_argument("--json", action="store_true", help="print the numbers as JSON")
    s.set_defaults(func=_cmd_stats)


# --- converters: chat JSONL, LLaVA, HF datasets, reasoning-gym, scenes -> shards ---------------

def _convert_opts(p: argparse.ArgumentParser, split_choices: Sequence[str] | None = None) -> None:
    """Options every converter shares: where and how the shards are written, and the stamps."""
    p.add_argument("--out", required=True, help="output shard directory (gets PREFIX-000000.tar ... and manifest.json)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default shard)")
    p.add_argument("--max-shard-mb", type=float, default=64.0, help="start a new shard past this size (default 64)")
    p.add_argument("--max-count", type=int, default=10_000, help="at most this many samples per shard (default 10000)")
    p.add_argument("--split", default="train", choices=split_choices,
                   help="split stamped on every sample (default train)")
    p.add_argument("--stage", type=int, default=0, help="continual-learning stage stamped on every sample (default 0)")
    p.add_argument("--on-bad", default="raise", choices=["raise", "skip"],
                   help="a bad record stops the conversion naming it (raise, default) or is skipped and counted")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    _max_pixels_opt(p)


def _max_pixels_opt(p: argparse.ArgumentParser) -> None:
    from mmdistill.data.boxes import MAX_IMAGE_PIXELS

    p.add_argument("--max-image-pixels", type=_positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"an image with more pixels is a bad record, refused from its header before decoding "
                        f"(default {MAX_IMAGE_PIXELS}, as data.max_image_pixels)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _write_converted(args: argparse.Namespace, records, meta: dict) -> int:
    """Write (where, sample) records as shards; every failure is one line naming the record."""
    from mmdistill.data.convert.common import write_shards

    try:
        manifest = write_shards(records(), args.out, prefix=args.prefix, max_bytes=int(args.max_shard_mb * 2**20),
                                max_count=args.max_count, meta=meta, overwrite=args.overwrite, bad=args.bad,
                                max_image_pixels=args.max_image_pixels)
    except (ValueError, OSError) as e:  # ConvertError and ShardError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shard(s) to {args.out}")
    if args.bad.count:
        print(f"skipped {args.bad.count} bad record(s):", file=sys.stderr)
        for msg in args.bad.errors:
            print(f"  {msg}", file=sys.stderr)
        if args.bad.count > len(args.bad.errors):
            print(f"  ... and {args.bad.count - len(args.bad.errors)} more", file=sys.stderr)
    return 0


def _converter(fn):
    """Give the command its BadRecords (from --on-bad) and turn argument errors into one line."""
    def run(args: argparse.Namespace) -> int:
        from mmdistill.data.convert.common import BadRecords

        args.bad = BadRecords(args.on_bad)
        try:
            return fn(args)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def _names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


@_converter
def _cmd_chat_jsonl(args: argparse.Namespace) -> int:
    from mmdistill.data.convert.chat import chat_jsonl_records
    from mmdistill.data.convert.common import convert_meta

    def records():
        for path in args.files:
            yield from chat_jsonl_records(path, args.split, args.domain, image_root=args.image_root, stage=args.stage,
                                          checker=args.checker, bad=args.bad)

    return _write_converted(args, records, convert_meta("chat-jsonl", files=args.files, image_root=args.image_root,
                                                        split=args.split, domain=args.domain, stage=args.stage))


@_converter
def _cmd_llava(args: argparse.Namespace) -> int:
    from mmdistill.data.convert.chat import llava_records
    from mmdistill.data.convert.common import convert_meta

    def records():
        for path in args.files:
            yield from llava_records(path, args.image_root, args.split, args.domain, stage=args.stage,
                                     checker=args.checker, bad=args.bad)

    return _write_converted(args, records, convert_meta("llava", files=args.files, image_root=args.image_root,
                                                        split=args.split, domain=args.domain, stage=args.stage))


@_converter
def _cmd_hf_disk(args: argparse.Namespace) -> int:
    from mmdistill.data.convert.common import convert_meta
    from mmdistill.data.convert.hf_disk import hf_disk_records, parse_columns, parse_mapping

    mapping = parse_mapping(args.map)
    drop = parse_columns(args.drop)
    records = lambda: hf_disk_records(args.path, args.split, mapping, domain=args.domain,  # noqa: E731
                                      source_split=args.source_split, stage=args.stage, checker=args.checker,
                                      bad=args.bad, drop=drop)
    return _write_converted(args, records, convert_meta("hf-disk", path=args.path, map=mapping, split=args.split,
                                                        source_split=args.source_split, domain=args.domain,
                                                        stage=args.stage, **({"drop": drop} if drop else {})))


@_converter
def _cmd_reasoning_gym(args: argparse.Namespace) -> int:
    from mmdistill.data.convert.common import convert_meta
    from mmdistill.data.convert.reasoning_gym import reasoning_gym_records
    from mmdistill.tasks.reasoning_gym import REASONING_GYM_WITH_SOLUTIONS

    tasks = _names(args.tasks) or list(REASONING_GYM_WITH_SOLUTIONS)
    config = _task_config(args.set)

    def records():
        for task in tasks:
            yield from reasoning_gym_records(task, args.n, args.seed, args.split, domain=args.domain,
                                             stage=args.stage, bad=args.bad, **config)

    return _write_converted(args, records, convert_meta("reasoning-gym", tasks=tasks, n=args.n, seed=args.seed,
                                                        split=args.split, domain=args.domain, stage=args.stage,
                                                        **({"config": config} if config else {})))


def _task_config(items: list[str]) -> dict:
    """--set KEY=VALUE pairs, each value read as a YAML scalar (3 -> int, 0.5 -> float, true -> bool)."""
    import yaml

    config = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"reasoning-gym: --set wants KEY=VALUE, got {item!r}")
        config[key] = yaml.safe_load(value)
    return config


def _scenes_knobs(args: argparse.Namespace) -> dict:
    from mmdistill.tasks import scenes

    knobs = {"image_size": args.image_size, "min_objects": args.min_objects, "max_objects": args.max_objects,
             "question_types": tuple(_names(args.question_types)) or scenes.QUESTION_TYPES,
             "colors": tuple(_names(args.colors)) or scenes.COLORS,
             "shapes": tuple(_names(args.shapes)) or scenes.SHAPES,
             "exclude_combos": _names(args.exclude_combos)}
    if args.only_combos:
        knobs["only_combos"] = _names(args.only_combos)
    return knobs


@_converter
def _cmd_scenes(args: argparse.Namespace) -> int:
    from mmdistill.data.convert.common import convert_meta
    from mmdistill.data.convert.scenes import scenes_records

    knobs = _scenes_knobs(args)
    records = lambda: scenes_records(args.n, args.seed, args.split, stage=args.stage,  # noqa: E731
                                     id_prefix=args.id_prefix, **knobs)
    return _write_converted(args, records, convert_meta("scenes", n=args.n, seed=args.seed, split=args.split,
                                                        stage=args.stage, id_prefix=args.id_prefix,
                                                        **{k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in knobs.items()}))


def _cmd_scenes_suite(args: argparse.Namespace) -> int:
    from mmdistill.data.convert.scenes import SuiteSizes, write_scenes_suite

    try:
        lo, _, hi = args.ood_objects.partition("-")
        ood = (int(lo), int(hi or lo))
        sizes = SuiteSizes(args.n_train, args.n_test, args.n_ood, args.n_cl_train, args.n_cl_test)
        suite = write_scenes_suite(args.out, args.seed, sizes, image_size=args.image_size,
                                   held_out=_names(args.held_out), ood_objects=ood, max_objects=args.max_objects,
                                   max_bytes=int(args.max_shard_mb * 2**20), max_count=args.max_count,
                                   overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, n in suite["parts"].items():
        print(f"wrote {n} samples to {os.path.join(args.out, name)}")
    return 0


def _add_convert_commands(sub) -> None:
    c = sub.add_parser(
        "chat-jsonl",
        help="chat JSONL (ShareGPT conversations or OpenAI messages) -> shards",
        description="Convert chat JSONL files: the last (assistant) turn becomes the response, earlier turns the "
                    "prompt; hint/reasoning/answer/boxes/task/checker come from the record; images/image paths "
                    "are relative to the file or --image-root.",
    )
    c.add_argument("files", nargs="+", metavar="FILE", help=".jsonl files, one record per line")
    c.add_argument("--image-root", default=None, help="resolve image paths here (default: each file's folder)")
    c.add_argument("--domain", default="chat", help="domain stamped on every sample (default chat)")
    c.add_argument("--checker", default="exact", help="checker for records without one (default exact)")
    _convert_opts(c)
    c.set_defaults(func=_cmd_chat_jsonl)

    ll = sub.add_parser(
        "llava",
        help="LLaVA-style JSON (id, image, conversations with <image>) -> shards",
        description="Convert LLaVA-style JSON lists: <image> placeholders become image parts in their turn; "
                    "images are read from --image-root (a missing file names the record).",
    )
    ll.add_argument("files", nargs="+", metavar="FILE", help="LLaVA .json files (a JSON list each)")
    ll.add_argument("--image-root", default=None, help="folder the 'image' paths are relative to (default: the file's)")
    ll.add_argument("--domain", default="llava", help="domain stamped on every sample (default llava)")
    ll.add_argument("--checker", default="exact", help="checker for records without one (default exact)")
    _convert_opts(ll)
    ll.set_defaults(func=_cmd_llava)

    h = sub.add_parser(
        "hf-disk",
        help="a Hugging Face dataset saved with save_to_disk, or parquet -> shards (needs mmdistill[data])",
        description="Convert a save_to_disk dataset (or one split of a DatasetDict) or parquet file(s). Columns "
                    "named like sample fields are taken as they are; --map maps others.",
    )
    h.add_argument("path", help="save_to_disk folder, .parquet file or folder of .parquet files")
    h.add_argument("--map", default=None, help="FIELD=COLUMN pairs, e.g. prompt=question,answer=label,images=image")
    h.add_argument("--drop", default=None, metavar="COL,...",
                   help="columns to leave out on purpose; any other column that maps to no sample field is an error")
    h.add_argument("--source-split", default=None, help="the DatasetDict split to read (default: --split)")
    h.add_argument("--domain", default="hf", help="domain stamped on every sample (default hf)")
    h.add_argument("--checker", default="exact", help="checker for rows without one (default exact)")
    _convert_opts(h)
    h.set_defaults(func=_cmd_hf_disk)

    r = sub.add_parser(
        "reasoning-gym",
        help="reasoning-gym tasks (with hints and worked solutions where known) -> shards (needs mmdistill[data])",
        description="Generate N samples per reasoning-gym task; splits never share a question.",
    )
    r.add_argument("--tasks", default=None,
                   help="comma-separated task names (default: the tasks with worked solutions)")
    r.add_argument("--n", type=int, required=True, help="samples per task")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--domain", default="reasoning_gym", help="domain stamped on every sample (default reasoning_gym)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the task's reasoning-gym config (repeatable), "
                        "e.g. --set max_digits=1 --set max_terms=3")
    _convert_opts(r, split_choices=["train", "val", "test"])
    r.set_defaults(func=_cmd_reasoning_gym)

    s = sub.add_parser(
        "scenes",
        help="procedural scenes (coloured shapes, questions, privileged boxes) -> shards",
        description="Write seeded scenes samples as shards; knobs make out-of-distribution and "
                    "continual-learning splits.",
    )
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--min-objects", type=int, default=1)
    s.add_argument("--max-objects", type=int, default=4)
    s.add_argument("--question-types", default=None, help="comma-separated: count,attribute,spatial (default all)")
    s.add_argument("--colors", default=None, help="comma-separated colours (default red,green,blue,yellow)")
    s.add_argument("--shapes", default=None, help="comma-separated shapes (default circle,square,triangle)")
    s.add_argument("--exclude-combos", default=None,
                   help='colour-shape pairs never drawn, e.g. "red circle,blue square"')
    s.add_argument("--only-combos", default=None, help="draw only these colour-shape pairs")
    s.add_argument("--id-prefix", default="", help="prefix for sample ids (keeps ids unique when datasets are mixed)")
    _convert_opts(s, split_choices=["train", "val", "test"])
    s.set_defaults(func=_cmd_scenes)

    su = sub.add_parser(
        "scenes-suite",
        help="the whole scenes benchmark: train, test, ood_objects, ood_combos, cl_stage1..3 (train+test)",
        description="Write DIR/train, DIR/test, DIR/ood_objects, DIR/ood_combos and DIR/cl_stage{1,2,3}/{train,test} "
                    "as shard datasets plus DIR/suite.json; deterministic for --seed.",
    )
    su.add_argument("--out", required=True, help="output folder")
    su.add_argument("--seed", type=int, default=0)
    su.add_argument("--n-train", type=int, default=1000)
    su.add_argument("--n-test", type=int, default=200)
    su.add_argument("--n-ood", type=int, default=200, help="samples in each of ood_objects and ood_combos")
    su.add_argument("--n-cl-train", type=int, default=300, help="train samples per continual-learning stage")
    su.add_argument("--n-cl-test", type=int, default=100, help="test samples per continual-learning stage")
    su.add_argument("--image-size", type=int, default=64)
    su.add_argument("--max-objects", type=int, default=4, help="objects per in-distribution image (1..N)")
    su.add_argument("--ood-objects", default="5-7", help="objects per ood_objects image, LO-HI (default 5-7)")
    su.add_argument("--held-out", default="red circle,green square,blue triangle",
                    help="colour-shape pairs kept out of every split but ood_combos")
    su.add_argument("--max-shard-mb", type=float, default=64.0)
    su.add_argument("--max-count", type=int, default=10_000)
    su.add_argument("--overwrite", action="store_true", help="replace shards already there")
    su.set_defaults(func=_cmd_scenes_suite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description="mmdistill data tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser(
        "arith",
        help="write seeded arithmetic samples (with privileged hints/solutions) as JSONL",
        description="Write arithmetic samples as JSONL (atomic: FILE.tmp then rename).",
    )
    a.add_argument("--out", required=True, help="output .jsonl file")
    a.add_argument("--n", type=int, required=True, help="number of samples")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--split", default="train", choices=["train", "val", "test"])
    a.add_argument("--digits", type=int, default=2, help="operands have at most this many digits")
    a.add_argument("--ops", default="+", help='operators to mix, e.g. "+-*" (default "+")')
    a.set_defaults(func=_cmd_arith)

    c = sub.add_parser(
        "chain",
        help="write seeded arithmetic chains (multi-step, with worked solutions and step hints) as JSONL",
        description="Write arithmetic chains as JSONL (atomic: FILE.tmp then rename).",
    )
    c.add_argument("--out", required=True, help="output .jsonl file")
    c.add_argument("--n", type=int, required=True, help="number of samples")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--split", default="train", choices=["train", "val", "test"])
    c.add_argument("--steps", type=int, default=2,
                   help="operations per chain (more than training saw: out of distribution)")
    c.add_argument("--ops", default="+-*",
                   help='operators to draw from, e.g. "+" for one continual stage (default "+-*")')
    c.set_defaults(func=_cmd_chain)

    t = sub.add_parser(
        "build-tokenizer",
        help="train the deterministic 512-token byte-level BPE tokenizer and save it",
        description="Train the byte-level BPE tokenizer (ChatML template) and save_pretrained it.",
    )
    t.add_argument("--out", required=True, help="output directory (e.g. assets/tokenizer)")
    t.add_argument("--no-split-digits", action="store_true", help="GPT-2 style: do not split digits one per token")
    t.set_defaults(func=_cmd_build_tokenizer)

    _add_shard_commands(sub)
    _add_convert_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
