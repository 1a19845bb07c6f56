"""Wall time and peak extra memory of loss + backward, chunked against naive, per method.

    python benchmarks/bench_objectives.py                      # vocab 151,936 x 4,096 positions, bf16
    python benchmarks/bench_objectives.py --positions 512      # quicker

Each (method, path) runs in a fresh subprocess so that its peak RSS is its own, after a warm-up
call on an 8-position slice. Inputs (every view's logits, filled in place so no temporary
inflates the baseline) are allocated first; the
reported "extra peak" is the process's peak RSS during loss + backward (VmHWM, reset just
before) minus the RSS with the inputs in place. It includes the gradient of the student logits,
which any path must produce.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_METHODS = ["opd", "gkd", "ar_opd", "dopd"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux resets the high-water mark VmHWM on writing 5 to clear_refs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(method_name: str, chunk_size: int, vocab: int, positions: int, batch: int, dtype: str, seed: int) -> dict:
    import torch

    from mmdistill.core.batch import Batch
    from mmdistill.methods.registry import build_method

    torch.manual_seed(seed)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    method = build_method(method_name, chunk_size=chunk_size)
    n = positions // batch
    views = {}
    for name in method.views:
        t = torch.empty(batch, n, vocab, dtype=torch_dtype)
        for b in range(batch):
            t[b].normal_(0.0, 3.0)
        views[name] = t
    views["student"].requires_grad_(True)
    ids = torch.randint(0, vocab, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[:, -max(1, n // 16):] = False  # some padding, as in real batches
    data = Batch(ids, mask, [{}] * batch)

    # warm-up on a slice (first calls pay for lazy set-up: kernels, thread pools), then discarded
    small = {k: v[:1, :8].detach().clone().requires_grad_(k == "student") for k, v in views.items()}
    method.loss(small, Batch(ids[:1, :8], mask[:1, :8], [{}]))[0].backward()
    del small

    base = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    loss, _ = method.loss(views, data)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {
        "method": method_name,
        "path": "naive" if chunk_size == 0 else "chunked",
        "seconds": round(seconds, 2),
        "extra_peak_gb": round((peak - base) / 2**30, 3),
        "inputs_gb": round(sum(v.numel() * v.element_size() for v in views.values()) / 2**30, 3),
        "loss": float(loss.detach()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--positions", type=int, default=4096, help="response positions in the batch")
    ap.add_argument("--batch", type=int, default=4, help="sequences the positions are split into")
    ap.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: automatic)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-naive", action="store_true", help="naive paths can need tens of GB at full size")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = ap.parse_args()

    if args.one:
        name, chunk = args.one.split(":")
        print(json.dumps(measure(name, None if chunk == "auto" else int(chunk), args.vocab, args.positions, args.batch,
                                 args.dtype, 0)))
        return 0

    print(f"vocab {args.vocab}, {args.positions} positions ({args.batch} x {args.positions // args.batch}), "
          f"{args.dtype} logits, chunk {args.chunk_size}, torch threads {os.cpu_count()}")
    print(f"{'method':<8} {'path':<8} {'seconds':>8} {'extra peak GB':>14} {'inputs GB':>10} {'loss':>10}")
    paths = ["auto" if args.chunk_size is None else str(args.chunk_size)] + ([] if args.skip_naive else ["0"])
    for name in args.methods:
        for chunk in paths:
            cmd = [sys.executable, __file__, "--one", f"{name}:{chunk}", "--vocab", str(args.vocab),
                   "--positions", str(args.positions), "--batch", str(args.batch), "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1]
                print(f"{name:<8} {'naive' if chunk == '0' else 'chunked':<8} failed: {reason}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{r['method']:<8} {r['path']:<8} {r['seconds']:>8.2f} {r['extra_peak_gb']:>14.3f} "
                  f"{r['inputs_gb']:>10.3f} {r['loss']:>10.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
