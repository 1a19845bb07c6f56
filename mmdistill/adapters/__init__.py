"""Modality adapters: build each view's input and score a shared response under it."""
from mmdistill.adapters.text import TextAdapter

__all__ = ["TextAdapter"]
