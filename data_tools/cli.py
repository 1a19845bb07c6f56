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


def _cmd_build_tokenizer(args: argparse.Namespace) -> int:
    from mmdistill.tokenizer_build import build_tokenizer

    tok = build_tokenizer(args.out, split_digits=not args.no_split_digits)
    print(f"wrote tokenizer (vocab {len(tok)}) to {args.out}")
    return 0


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

    t = sub.add_parser(
        "build-tokenizer",
        help="train the deterministic 512-token byte-level BPE tokenizer and save it",
        description="Train the byte-level BPE tokenizer (ChatML template) and save_pretrained it.",
    )
    t.add_argument("--out", required=True, help="output directory (e.g. assets/tokenizer)")
    t.add_argument("--no-split-digits", action="store_true", help="GPT-2 style: do not split digits one per token")
    t.set_defaults(func=_cmd_build_tokenizer)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
