"""Lazy, cached view logits: a method reads only the views it names."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Iterator

import torch

from mmdistill.adapters.prefix import score_views
from mmdistill.core.batch import Batch
from mmdistill.core.views import VIEW_SPEC
from mmdistill.models.served import Pending, ServedTeacher


def _prompts_of(policy: str) -> str:
    """Whose processor renders a policy's prompts: the initial student is a student."""
    return "teacher" if policy == "teacher" else "student"


class Views(Mapping):
    """views[name] -> [B, N, V] next-token logits aligned with batch.response_ids (unnormalised
    log-probs: methods apply log_softmax); only "student" is scored with gradient. A served
    teacher's views are SparseLogProbs (core/batch.py), requested when the Views are made.

    `wanted` names the views the method will read (its `views`): those of one model are scored
    together on the first read, over the prompt prefix they share (prefix.py). `init` is
    the frozen copy of the initial student, for the views of policy "student_init".

    `scopes`: per policy, what its forwards run under. A LoRA student's self-teacher and initial
    student are the student itself, with its adapters off or switched (models/lora.py)."""

    def __init__(self, adapter, batch: Batch, student: torch.nn.Module, teacher: torch.nn.Module | None,
                 wanted: tuple[str, ...] = (), share_prefix: bool = True, init: torch.nn.Module | None = None,
                 scopes: Mapping[str, Callable[[], contextlib.AbstractContextManager] | None] | None = None):
        self.adapter, self.batch, self.student, self.teacher, self.init = adapter, batch, student, teacher, init
        self.scopes = {k: v for k, v in (scopes or {}).items() if v is not None}
        self.wanted, self.share_prefix = tuple(wanted), share_prefix
        self._cache: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}  # forward time of each view scored (the step's time split)
        self._pending: dict[str, Pending] = {}
        if isinstance(teacher, ServedTeacher):  # requests out now: the student's forwards run meanwhile
            for name in self.wanted:
                if VIEW_SPEC[name][0] == "teacher":
                    self._pending[name] = self._submit(name)

    def _submit(self, name: str) -> Pending:
        if self.adapter.has_images(self.batch.samples):
            raise ValueError(f"view '{name}': teacher.mode=served scores text prompts only, and these samples "
                             "have images")
        prompts = self.adapter.prompt_ids(self.batch.samples, VIEW_SPEC[name][1], "teacher")
        mask = self.batch.response_mask.bool()
        responses = [ids[m].tolist() for ids, m in zip(self.batch.response_ids, mask)]
        return self.teacher.submit(prompts, responses, self.batch.response_ids.shape[1])

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in VIEW_SPEC:
            raise KeyError(f"unknown view '{name}'; views: {', '.join(VIEW_SPEC)}")
        if name not in self._cache:
            policy = VIEW_SPEC[name][0]
            model = {"student": self.student, "teacher": self.teacher, "student_init": self.init}[policy]
            if model is None:
                needs = "a teacher" if policy == "teacher" else "a frozen copy of the initial student (Views(init=...))"
                raise ValueError(f"view '{name}' needs {needs}, and this run has none")
            if isinstance(model, ServedTeacher):
                t0 = time.perf_counter()
                self._cache[name] = (self._pending.pop(name, None) or self._submit(name)).result()
                self.seconds[name] = time.perf_counter() - t0  # the wait, not the server's time
                return self._cache[name]
            group = [name] + [v for v in self.wanted
                              if v != name and v not in self._cache and VIEW_SPEC[v][0] == policy]
            t0 = time.perf_counter()  # a view scored alone also pays for a shared attempt that fell back
            with self.scopes.get(policy, contextlib.nullcontext)():
                if not (self.share_prefix and self._score_shared(model, policy, group)):
                    self._cache[name] = self.adapter.logits(model, self.batch, VIEW_SPEC[name][1],
                                                            grad=(name == "student"), policy=_prompts_of(policy))
                    self.seconds[name] = time.perf_counter() - t0
        return self._cache[name]

    def prefetch(self, names: tuple[str, ...]) -> None:
        """Score these views now, grouped by model over their shared prefix, and no others: for a
        method that reads some views before the step's losses (the student's, with gradient, comes
        later, alone)."""
        wanted, self.wanted = self.wanted, tuple(names)
        try:
            for name in names:
                self[name]
        finally:
            self.wanted = wanted

    def _score_shared(self, model: torch.nn.Module, policy: str, group: list[str]) -> bool:
        logits, seconds = score_views(self.adapter, model, self.batch, [VIEW_SPEC[v][1] for v in group],
                                      [v == "student" for v in group], _prompts_of(policy))
        if logits is None:
            return False
        self.seconds[f"{policy}_prefix"] = seconds["prefix"]
        for i, (v, x) in enumerate(zip(group, logits)):
            self._cache[v], self.seconds[v] = x, seconds[str(i)]
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(VIEW_SPEC)

    def __len__(self) -> int:
        return len(VIEW_SPEC)
