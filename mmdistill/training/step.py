"""One optimizer step, the same for every method and modality: sample responses (student rollouts,
or oracle responses for off-policy methods), let the method read the views it names and map them
to a loss, back-propagate each micro-batch, step the optimizer, move the self-teacher."""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager

import torch

from mmdistill.adapters.scoring import Views
from mmdistill.training.setup import Run
from mmdistill.training.stopping import stop_if_not_finite


def train_step(run: Run, step: int) -> dict | None:
    """The step's metrics row (loss parts averaged over ranks, token counts summed), or None when
    the data is exhausted before it starts."""
    run.stream.enter(run.stream.stage_of(step))
    t0 = time.perf_counter()
    micro_batches = _fetch(run.stream, run.cfg.train.grad_accum)  # all first: the last one syncs the gradients
    if not micro_batches:
        return None
    timing: dict[str, float] = {}
    parts: dict[str, float] = {}
    tokens, lengths = 0, []
    for i, samples in enumerate(micro_batches):
        batch, metrics = _micro_batch(run, step, samples, last=i == len(micro_batches) - 1, scale=len(micro_batches),
                                      timing=timing)
        for k, v in metrics.items():
            parts[k] = parts.get(k, 0.0) + v / len(micro_batches)
        tokens += batch.num_tokens
        lengths += batch.response_mask.sum(1).tolist()
    with timed(timing, "time_optimizer"):
        lr = run.scheduler.get_last_lr()[0]
        clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = run.backend.optimizer_step(run.student, run.optimizer, clip)
        run.scheduler.step()
        if run.teacher is not None:
            run.teacher.update(run.backend.parameters(run.plain))
    return _row(run, parts, lr, grad_norm, tokens, lengths, time.perf_counter() - t0, timing)


def _micro_batch(run: Run, step: int, samples: list[dict], last: bool, scale: int, timing: dict[str, float]):
    with timed(timing, "time_rollout"):
        on_policy = draw_on_policy(run.method)
        batch = run.adapter.rollout(run.plain, samples, run.cfg.rollout) if on_policy else run.adapter.oracle_batch(samples)
    run.rollouts.log(step, batch)
    with run.backend.micro_batch(run.student, last=last):
        views = Views(run.adapter, batch, run.student, run.teacher.model if run.teacher else None, run.method.views,
                      run.cfg.train.share_prefix, init=run.init)
        with timed(timing, "time_loss"):
            loss, metrics = run.method.loss(views, batch)
        stop_if_not_finite(run.accelerator, step, loss, run.run_dir)
        with timed(timing, "time_backward"):
            run.backend.backward(run.student, loss / scale)
    for name, seconds in views.seconds.items():
        timing[f"time_view_{name}"] = timing.get(f"time_view_{name}", 0.0) + seconds
    timing["time_loss"] -= sum(views.seconds.values())  # the loss proper, without the views' forwards
    return batch, metrics


def _fetch(stream, n: int) -> list[list[dict]]:
    out = []
    for _ in range(n):
        try:
            out.append(stream.next())
        except StopIteration:  # data.epochs passes are done
            break
    return out


def _row(run: Run, parts: dict, lr: float, grad_norm: float, tokens: int, lengths: list[int], seconds: float,
         timing: dict[str, float]) -> dict:
    accelerator = run.accelerator
    parts = dict(zip(parts, accelerator.reduce(torch.tensor(list(parts.values()), device=accelerator.device), "mean").tolist()))
    sums = accelerator.reduce(torch.tensor([tokens, len(lengths), sum(lengths)], device=accelerator.device), "sum")
    tokens, n_seq, len_sum = sums.tolist()
    bad = int(accelerator.reduce(torch.tensor(run.stream.bad_samples, device=accelerator.device), "sum"))
    return {**parts, "lr": lr, "grad_norm": float(grad_norm), "tokens": int(tokens), "tokens_per_s": tokens / seconds,
            "rollout_len": len_sum / n_seq, "step_s": seconds, **timing, "data_bad_samples": bad}


def draw_on_policy(method) -> bool:
    """Rollouts or oracle responses for this micro-batch. Methods that mix the two (GKD's
    lambda) declare `on_policy_fraction`; the draw uses the checkpointed Python RNG."""
    fraction = getattr(method, "on_policy_fraction", 1.0 if method.on_policy else 0.0)
    return fraction >= 1.0 or (fraction > 0.0 and random.random() < fraction)


@contextmanager
def timed(into: dict[str, float], key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - t0
