"""Where the teacher's log-probs come from: a separate model or a self-teacher."""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from mmdistill.models.served import ServedTeacher


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin.eval()


class Teacher:
    """Holds pi_T for one run.

    mode "model": a separate frozen model; "frozen_student": the initial student, frozen;
    "ema": an EMA of the student (theta_T <- d * theta_T + (1 - d) * theta after each optimizer
    step); "live": the student itself, scored under no_grad; "served": a model behind a
    completions server (`served`, models/served.py), whose views come back as top-k log-probs.
    """

    def __init__(self, mode: str, student: torch.nn.Module, model: torch.nn.Module | None = None,
                 ema_decay: float = 0.99, served: ServedTeacher | None = None):
        self.mode, self.ema_decay = mode, ema_decay
        self.served = served
        if mode == "served":
            if served is None:
                raise ValueError("teacher.mode=served needs a ServedTeacher")
            self._model = None
        elif mode == "model":
            if model is None:
                raise ValueError("teacher.mode=model needs a teacher model")
            self._model = frozen_copy(model) if any(p.requires_grad for p in model.parameters()) else model.eval()
        elif mode in ("frozen_student", "ema"):
            self._model = frozen_copy(student)
        elif mode == "live":
            self._model = None
        else:
            raise ValueError(f"teacher.mode '{mode}' unknown; allowed: model, frozen_student, ema, live, served")
        self._student = student

    @property
    def model(self) -> torch.nn.Module | ServedTeacher:
        if self.served is not None:
            return self.served
        return self._student if self._model is None else self._model

    @property
    def owns_weights(self) -> bool:
        """Whether the teacher's weights are trained state that a checkpoint must hold."""
        return self.mode == "ema"

    @torch.no_grad()
    def update(self, student_parameters: Iterable[torch.Tensor]) -> None:
        """After an optimizer step. The student's parameters in order, each whole while it is read
        (a sharded student's come gathered one by one: Backend.parameters)."""
        if self.mode != "ema":
            return
        for t, s in zip(self._model.parameters(), student_parameters):
            t.lerp_(s.detach().to(t.dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._model.state_dict() if self.owns_weights else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.owns_weights:
            self._model.load_state_dict(state)
