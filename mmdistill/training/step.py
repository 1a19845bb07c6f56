"""One optimizer step, the same for every method and modality: sample responses (student rollouts,
or oracle responses for off-policy methods), let the method read the views it names and map them
to a loss, back-propagate each micro-batch, step the optimizer, move the self-teacher.

A method whose loss depends on statistics of the whole step's tokens (`step_statistics`: DOPD's
routing thresholds) first sees every micro-batch's `token_statistics`, gathered over all
processes, in `fit`; the views it read for them are kept for its loss."""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager

import torch
from accelerate.utils import gather_object

from mmdistill.adapters.scoring import Views
from mmdistill.core.batch import Batch
from mmdistill.losses.chunked import skip_diagnostics
from mmdistill.training.setup import Run
from mmdistill.training.stopping import stop_if_not_finite


def train_step(run: Run, step: int, diagnose: bool = True) -> dict | None:
    """The step's metrics row (loss parts averaged over ranks, token counts summed), or None when
    the data is exhausted before it starts. diagnose=False: a row nobody logs (train.log_every),
    so the losses skip their per-token diagnostics."""
    run.stream.enter(run.stream.stage_of(step))
    t0 = time.perf_counter()
    fetched = _fetch(run.stream, run.cfg.train.grad_accum)  # all first: the last one syncs the gradients
    if not fetched:
        return None
    timing: dict[str, float] = {}
    sampled = (_fit_step_statistics(run, step, fetched, timing) if getattr(run.method, "step_statistics", False)
               else None)
    parts: dict[str, float] = {}
    tokens, lengths, distinct = 0, [], 0.0
    for i, samples in enumerate(fetched):
        batch, views = sampled[i] if sampled else _sample(run, step, samples, timing)
        with skip_diagnostics(not diagnose):
            metrics = _loss_and_backward(run, step, batch, views, last=i == len(fetched) - 1, scale=len(fetched),
                                         timing=timing)
        for k, v in metrics.items():
            parts[k] = parts.get(k, 0.0) + v / len(fetched)
        tokens += batch.num_tokens
        lengths += batch.response_mask.sum(1).tolist()
        distinct += distinct_rate(batch) / len(fetched)
    with timed(timing, "time_optimizer"):
        lr = run.scheduler.get_last_lr()[0]
        clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = run.backend.optimizer_step(run.student, run.optimizer, clip)  # not applied if not finite
        if not run.backend.loss_scaling:  # fp16's scaler skips an overflowing step and lowers its scale: routine
            stop_if_not_finite(run.accelerator, step, grad_norm, run.run_dir, what="the gradient norm")
        run.scheduler.step()
        if run.teacher is not None:
            run.teacher.update(run.backend.parameters(run.plain))
    parts["rollout_distinct"] = distinct
    return _row(run, parts, lr, grad_norm, tokens, lengths, time.perf_counter() - t0, timing)


def _sample(run: Run, step: int, samples: list[dict], timing: dict[str, float]) -> tuple[Batch, Views]:
    """A micro-batch's responses and the (lazy) views of them."""
    with timed(timing, "time_rollout"):
        on_policy = draw_on_policy(run.method)
        batch = (run.adapter.rollout(run.plain, samples, run.cfg.rollout) if on_policy
                 else run.adapter.oracle_batch(samples))
    run.rollouts.log(step, batch)
    views = Views(run.adapter, batch, run.student, run.teacher.model if run.teacher else None, run.method.views,
                  run.cfg.train.share_prefix, init=run.init,
                  scopes={"teacher": run.teacher.scope if run.teacher else None, "student_init": run.init_scope})
    return batch, views


def _fit_step_statistics(run: Run, step: int, fetched: list[list[dict]], timing: dict[str, float]) -> list:
    """Every micro-batch sampled and its statistics views read first; the method fits to the
    statistics of all of them on all processes. One micro-batch on one process is its own step:
    the method then routes it by itself (fit(None)), and its views are read together as usual."""
    sampled = [_sample(run, step, samples, timing) for samples in fetched]
    if len(sampled) == 1 and run.accelerator.num_processes == 1:
        run.method.fit(None)
        return sampled
    t0 = time.perf_counter()
    found: dict[str, list[torch.Tensor]] = {}
    for batch, views in sampled:
        views.prefetch(run.method.statistics_views)
        for k, v in run.method.token_statistics(views, batch).items():
            found.setdefault(k, []).append(v.detach().cpu())
    mine = {k: torch.cat(v) for k, v in found.items()}
    everyone = gather_object([mine]) if run.accelerator.num_processes > 1 else [mine]
    run.method.fit({k: torch.cat([d[k] for d in everyone]) for k in mine})
    seen = sum(sum(views.seconds.values()) for _, views in sampled)
    timing["time_statistics"] = time.perf_counter() - t0 - seen  # without the views' forwards (time_view_*)
    return sampled


def _loss_and_backward(run: Run, step: int, batch: Batch, views: Views, last: bool, scale: int,
                       timing: dict[str, float]) -> dict[str, float]:
    before = sum(views.seconds.values())  # views already read for the step's statistics
    with run.backend.micro_batch(run.student, last=last):
        with timed(timing, "time_loss"):
            loss, metrics = run.method.loss(views, batch)
        stop_if_not_finite(run.accelerator, step, loss, run.run_dir)
        with timed(timing, "time_backward"):
            run.backend.backward(run.student, loss / scale)
    for name, seconds in views.seconds.items():
        timing[f"time_view_{name}"] = timing.get(f"time_view_{name}", 0.0) + seconds
    timing["time_loss"] -= sum(views.seconds.values()) - before  # the loss proper, without the views' forwards
    return metrics


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
    parts = dict(zip(parts, accelerator.reduce(torch.tensor(list(parts.values()), device=accelerator.device),
                                               "mean").tolist()))
    sums = accelerator.reduce(torch.tensor([tokens, len(lengths), sum(lengths)], device=accelerator.device), "sum")
    tokens, n_seq, len_sum = sums.tolist()
    bad = int(accelerator.reduce(torch.tensor(run.stream.bad_samples, device=accelerator.device), "sum"))
    return {**parts, "lr": lr, "grad_norm": float(grad_norm), "tokens": int(tokens), "tokens_per_s": tokens / seconds,
            "rollout_len": len_sum / n_seq, "step_s": seconds, **timing, "data_bad_samples": bad}


def distinct_rate(batch: Batch) -> float:
    """The share of distinct responses in a micro-batch: a student collapsing onto one answer
    shows it here first."""
    seen = {tuple(ids[mask].tolist()) for ids, mask in zip(batch.response_ids, batch.response_mask.bool())}
    return len(seen) / len(batch.samples)


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
