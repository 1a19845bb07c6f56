"""Method registry: one line per objective, built by name from config options."""
from __future__ import annotations

from mmdistill.methods.base import Method
from mmdistill.methods.opd import OPD
from mmdistill.methods.sft import SFT

METHODS: dict[str, type] = {
    "sft": SFT,
    "opd": OPD,
}


def build_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {sorted(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "Method", "build_method"]
