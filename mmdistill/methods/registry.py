"""The method registry: one line per objective, built by name from its config options."""
from __future__ import annotations

from mmdistill.methods.ar_opd import AROPD
from mmdistill.methods.base import Method
from mmdistill.methods.dopd import DOPD
from mmdistill.methods.gkd import GKD
from mmdistill.methods.opd import OPD
from mmdistill.methods.sft import SFT


def _privileged_opd(name: str, target: str):
    """Full / partial privileged OPD are vanilla OPD aimed at another view."""

    def build(**options) -> OPD:
        method = OPD(target=target, **options)
        method.name = name
        return method

    return build


METHODS: dict[str, object] = {
    "sft": SFT,
    "opd": OPD,
    "full_opd": _privileged_opd("full_opd", "teacher_full"),
    "partial_opd": _privileged_opd("partial_opd", "teacher_partial"),
    "gkd": GKD,
    "ar_opd": AROPD,
    "dopd": DOPD,
}


def build_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {sorted(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "Method", "build_method"]
