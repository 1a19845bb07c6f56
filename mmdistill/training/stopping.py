"""A run that stops early stops on every rank at the same step.

Three causes: a loss that is not finite (stop before the backward: nothing of the step is
applied), a gradient norm that is not finite (the backend skipped the optimizer step: nothing
of it is applied either; a finite loss can have one, e.g. at a huge learning rate), and a
scheduler's signal, SIGTERM or SIGUSR1 (SLURM sends SIGTERM at the time limit and, with
`--signal=USR1@SECONDS`, a warning before it; preemption sends SIGTERM): the run finishes its
step, writes a checkpoint and exits, so `train.resume=auto` loses nothing. A rank deciding
alone would leave the others waiting in a collective for it, so each decision is agreed over
all ranks first (one small collective per step).
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from mmdistill.training.checkpoint import newest_line

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """The run stopped on a signal after checkpointing; `code` is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


def stop_if_not_finite(accelerator, step: int, value: torch.Tensor | float, run_dir: Path,
                       what: str = "the loss") -> None:
    """Raise FloatingPointError on every rank when any rank's `value` (the loss, the gradient
    norm) is NaN or infinite."""
    value = torch.as_tensor(value).detach()
    bad = accelerator.gather(torch.tensor([0.0 if torch.isfinite(value) else 1.0], device=accelerator.device))
    ranks = [r for r, b in enumerate(bad.tolist()) if b]
    if ranks:
        raise FloatingPointError(f"step {step}: {what} is not finite on rank(s) {ranks} (this rank's: {value.item()}); "
                                 f"the step was not applied; {newest_line(run_dir)}")


class SignalStop:
    """Catches SIGTERM and SIGUSR1 while the loop runs (the handlers before are restored after);
    `agreed` says, on every rank alike, whether any rank caught one. Outside the main thread
    signals cannot be caught, and nothing is installed."""

    def __init__(self):
        self.signum = 0
        self._before: dict[int, object] = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._before[s] = signal.signal(s, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)

    def _catch(self, signum: int, frame) -> None:
        self.signum = signum

    def agreed(self, accelerator) -> int:
        """The signal any rank caught (the largest number if several), 0 if none. What was caught
        is never overwritten by the agreement: a signal that lands while a rank waits in the
        collective (most of a step's end, when the ranks are uneven) is agreed on at the next step
        instead of being lost (it was, about one run in ten under load: the run went on to the end)."""
        if accelerator.num_processes > 1:
            caught = torch.tensor([self.signum], device=accelerator.device)
            return int(accelerator.reduce(caught, "max").item())
        return self.signum


def stopped_by(signum: int, step: int, run_dir: Path) -> Stopped:
    """The exception for a signal the ranks agreed on, after the step they checkpointed."""
    return Stopped(f"stopped by {signal.Signals(signum).name} after step {step}; {newest_line(run_dir)}", signum)
