"""SignalStop: a signal caught while the ranks agree is not lost (the lost-update race of
assigning the agreement back to what the handler writes)."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import torch

from mmdistill.training.stopping import SignalStop


class _Ranks:
    """Two ranks' max-reduce; the signal handler runs while this rank waits in it."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, stop: SignalStop, other: int = 0, during: int = 0):
        self.stop, self.other, self.during = stop, other, during

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        assert op == "max"
        if self.during:
            self.stop._catch(self.during, None)  # what the handler does, mid-collective
            self.during = 0
        return torch.maximum(t, torch.tensor([self.other]))


def test_a_signal_caught_during_the_agreement_is_agreed_on_at_the_next_step():
    stop = SignalStop()
    ranks = _Ranks(stop, during=signal.SIGTERM)
    assert stop.agreed(ranks) == 0  # this step's contribution was taken before the signal
    assert stop.agreed(ranks) == signal.SIGTERM  # not lost: the next step stops


def test_every_rank_stops_on_a_signal_any_rank_caught_and_one_process_reads_its_own():
    stop = SignalStop()
    assert stop.agreed(_Ranks(stop, other=signal.SIGUSR1)) == signal.SIGUSR1
    assert stop.agreed(_Ranks(stop)) == 0
    alone = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    stop._catch(signal.SIGTERM, None)
    assert stop.agreed(alone) == signal.SIGTERM
