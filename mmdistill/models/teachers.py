"""Where the teacher's log-probs come from: a separate model or a self-teacher."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmdistill.models import lora
from mmdistill.models.served import ServedTeacher
from mmdistill.models.weights import load_weights, untied_state_dict


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

    A LoRA student's self-teachers are the student itself, under `scope()`: the frozen one with
    the adapters off (the model as loaded), the EMA one with a second adapter holding the EMA of
    the trained adapter (the base weights never change, so theirs is the EMA of the whole model).
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
        elif mode in ("frozen_student", "ema") and lora.has_lora(student):
            self._model = student
            self._pairs = lora.add_ema_adapter(student) if mode == "ema" else {}
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
    def lora(self) -> bool:
        """A self-teacher that is the LoRA student under another adapter setting."""
        return self._model is self._student

    def scope(self) -> contextlib.AbstractContextManager:
        """What the teacher's forwards run under: the adapter setting of a LoRA self-teacher."""
        if not self.lora:
            return contextlib.nullcontext()
        if self.mode == "ema":
            return lora.adapter_on(self._student, lora.EMA)
        return lora.adapters_off(self._student)

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
        if self.lora:  # the adapter only: the base weights are the same tensors (data-parallel only)
            for t, s in self._pairs.values():
                t.lerp_(s.detach().to(t.dtype), 1.0 - self.ema_decay)
            return
        for t, s in zip(self._model.parameters(), student_parameters):
            t.lerp_(s.detach().to(t.dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.owns_weights:
            return {}
        return self._ema_adapter() if self.lora else self._model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.owns_weights and self.lora:
            with torch.no_grad():
                for n, t in self._ema_adapter().items():
                    t.copy_(state[n])
        elif self.owns_weights:
            self._model.load_state_dict(state)

    def _ema_adapter(self) -> dict[str, torch.Tensor]:
        return {n: t for n, (t, _) in self._pairs.items()}

    def save(self, file: Path) -> None:
        """The weights a checkpoint holds (owns_weights): the EMA model, or a LoRA EMA's adapter,
        named as the trained adapter's."""
        weights = lora.copies(self._ema_adapter()) if self.lora else untied_state_dict(self._model)
        save_file(weights, str(file), metadata={"format": "pt"})

    def load(self, file: Path) -> None:
        if self.lora:
            lora.load_into(self._ema_adapter(), file)
        else:
            load_weights(self._model, file)


def init_policy(student: torch.nn.Module, teacher: Teacher | None
                ) -> tuple[torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The initial student, frozen (views student_init, student_init_priv), and what its
    forwards run under: a LoRA student with its adapters off; else a frozen_student teacher's
    copy, or a new one."""
    if lora.has_lora(student):
        return student, lambda: lora.adapters_off(student)
    if teacher is not None and teacher.mode == "frozen_student":
        return teacher.model, contextlib.nullcontext
    return frozen_copy(student), contextlib.nullcontext
