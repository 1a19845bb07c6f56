"""Modality adapters: build each view's input and score a shared response under it."""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from mmdistill.adapters.text import TextAdapter
from mmdistill.adapters.vision import VisionAdapter


def build_adapter(student_proc: Any, privileged: Any, max_length: int, teacher_proc: Any = None) -> TextAdapter:
    """A tokenizer on both sides gives the text adapter; a processor on either, the vision one."""
    procs = [p for p in (student_proc, teacher_proc) if p is not None]
    text = all(isinstance(p, PreTrainedTokenizerBase) for p in procs)
    cls = TextAdapter if text else VisionAdapter
    return cls(student_proc, privileged, max_length, teacher=teacher_proc)


__all__ = ["TextAdapter", "VisionAdapter", "build_adapter"]
