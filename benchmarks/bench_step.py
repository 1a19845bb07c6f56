"""Where a training step's time goes, per method, on a small text and a small VLM setup.

    python benchmarks/bench_step.py [--repeats 5] [--setups text vlm] [--methods opd dopd ar_opd ...]
                                    [--rollouts K] [--no-share-prefix]

Every method scores the SAME rollouts (same prompts, same sampled responses), so the
comparison isolates what a method adds: its extra view forwards and its loss. A step is
rollout + the views' forwards + the loss + backward + optimizer; the rollout is timed once per
repeat and added to every method's step; the methods run in a new random order each repeat.
Prints the split (ms, medians), tokens/s and the median over repeats of each step's ratio to
vanilla OPD in the same repeat; "views" is that ratio with only the views' forwards differing from
OPD's (the OPD step plus the method's views minus OPD's): the bound that no cheaper loss,
backward or optimizer step can go below. Issue 6's targets: DOPD <= 1.3x and AR-OPD <= 1.4x an
OPD step.

Setups: `text` = the shipped arithmetic student and teacher (configs/dopd.yaml: 32 prompts,
32 new tokens); `vlm` = configs/tiny_vlm.yaml's composite student and teacher on scenes
(16 prompts, 16 new tokens; the boxes as text and drawn on the privileged views' images);
`vlm_text` = the same with the boxes as text only (privileged.image.source=student, as in the
default job), where every view shows the same image and views of one model share the prefix.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch
from transformers.utils import logging as hf_logging

from mmdistill.adapters import build_adapter
from mmdistill.adapters.scoring import Views
from mmdistill.adapters.vision import DRAWN
from mmdistill.config import load_config, method_options
from mmdistill.core.batch import Batch
from mmdistill.data.sources import load_split
from mmdistill.methods.registry import build_method
from mmdistill.models.loading import load, max_positions
from mmdistill.models.teachers import Teacher

VLM = ["train.batch_size=16", "rollout.max_new_tokens=16", "data.scenes.image_size=64",
       "student.vision.tower.image_size=64", "student.vision.tower.kwargs.img_size=64",
       "teacher.model.vision.tower.image_size=64", "teacher.model.vision.tower.kwargs.img_size=64"]
SETUPS = {
    "text": ("dopd", ["train.batch_size=32", "rollout.max_new_tokens=32"]),
    "vlm": ("tiny_vlm", VLM),  # boxes as text and drawn on the privileged views' images
    "vlm_text": ("tiny_vlm", [*VLM, "privileged.image.source=student"]),  # boxes as text only (the default job's p)
}
PARTS = ("rollout", "views", "loss", "backward", "optimizer")


def undrawn(batch: Batch) -> Batch:
    """The batch with its per-step drawings (boxes drawn on images, shared by the views of one
    step) forgotten, so that each method pays for its own, as it would in training."""
    fresh: dict[int, dict] = {}
    samples = [dict(s, **{DRAWN: fresh.setdefault(id(s[DRAWN]), {})}) if DRAWN in s else s for s in batch.samples]
    return dataclasses.replace(batch, samples=samples)


def bench(setup: str, methods: list[str], repeats: int, share_prefix: bool, rollouts: int) -> None:
    name, overrides = SETUPS[setup]
    overrides = [*overrides, f"rollout.num_rollouts={rollouts}"]
    cfg = load_config(name, overrides)
    torch.manual_seed(0)
    student, proc = load(cfg.student, seed=0)
    teacher_model, t_proc = load(cfg.teacher.model, seed=1)
    teacher = Teacher("model", student, teacher_model)
    adapter = build_adapter(proc, cfg.privileged, max_positions(student), t_proc)
    samples = load_split(cfg.data, "train")[: cfg.train.batch_size // rollouts]  # same tokens per step for any K
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)

    rows: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PARTS} for m in methods}
    views_split: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    tokens = 0
    order = random.Random(0)
    for r in range(repeats + 1):  # the first round warms up
        t0 = time.perf_counter()
        batch = adapter.rollout(student, samples, cfg.rollout)
        rollout_s = time.perf_counter() - t0
        tokens = batch.num_tokens
        for m in order.sample(methods, len(methods)):  # a new order each round: no method always runs first
            method = build_method(m, **method_options(load_config(name, [*overrides, f"method={m}"])))
            views = Views(adapter, undrawn(batch), student, teacher.model, method.views, share_prefix)
            t0 = time.perf_counter()
            loss, _ = method.loss(views, batch)
            loss_s = time.perf_counter() - t0 - sum(views.seconds.values())
            t0 = time.perf_counter()
            loss.backward()
            backward_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_s = time.perf_counter() - t0
            if r == 0:
                continue
            for part, v in zip(PARTS, (rollout_s, sum(views.seconds.values()), loss_s, backward_s, optimizer_s)):
                rows[m][part].append(v)
            for view, v in views.seconds.items():
                views_split[m].setdefault(view, []).append(v)

    print(f"\n== {setup}: config {name}, {len(samples)} prompts x {rollouts} rollouts, share_prefix={share_prefix}, "
          f"{tokens} response tokens per step, {repeats} repeats (median ms)")
    print(f"{'method':<8}" + "".join(f"{p:>10}" for p in PARTS) + f"{'step':>10}{'tok/s':>9}{'x opd':>7}{'views':>7}"
          "  views (ms)")
    steps = {m: [sum(rows[m][p][r] for p in PARTS) for r in range(repeats)] for m in methods}
    for m in methods:
        med = {p: statistics.median(rows[m][p]) for p in PARTS}
        step = sum(med.values())
        # the median over rounds of each round's ratio: both steps of a ratio ran on the same rollouts,
        # seconds apart, so a machine that slows for a while slows both
        ratio = f"{statistics.median(a / b for a, b in zip(steps[m], steps['opd'])):.2f}" if "opd" in steps else "-"
        # the ratio if the method differed from OPD by its views' forwards alone: what no loss work can go below
        floor = "-"
        if "opd" in steps:
            paired = zip(steps["opd"], rows[m]["views"], rows["opd"]["views"])
            floor = f"{statistics.median((b + v - o) / b for b, v, o in paired):.2f}"
        split = ", ".join(f"{v}={1000 * statistics.median(t):.0f}" for v, t in views_split[m].items())
        print(f"{m:<8}" + "".join(f"{1000 * med[p]:>10.1f}" for p in PARTS)
              + f"{1000 * step:>10.1f}{tokens / step:>9.0f}{ratio:>7}{floor:>7}  {split}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--rollouts", type=int, default=1,
                    help="rollouts per prompt (rollout.num_rollouts); prompts = batch / K")
    ap.add_argument("--no-share-prefix", action="store_true", help="score every view alone (train.share_prefix=false)")
    ap.add_argument("--methods", nargs="+", default=["opd", "full_opd", "dopd", "ar_opd", "gkd", "sft"])
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for setup in args.setups:
        bench(setup, args.methods, args.repeats, not args.no_share_prefix, args.rollouts)


if __name__ == "__main__":
    main()
