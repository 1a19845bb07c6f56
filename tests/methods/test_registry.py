"""The method registry: methods built by name, with their options."""
from __future__ import annotations

import pytest

from mmdistill.methods.opd import OPD
from mmdistill.methods.registry import METHODS, build_method
from mmdistill.methods.sft import SFT


def test_registry_builds_methods_with_options():
    assert isinstance(build_method("sft"), SFT)
    m = build_method("opd", estimator="topk", topk=16, target="teacher_full")
    assert isinstance(m, OPD) and m.topk == 16 and m.views == ("student", "teacher_full")
    assert isinstance(METHODS, dict) and {"sft", "opd"} <= set(METHODS)


def test_registry_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="opd.*sft|sft.*opd"):
        build_method("gkd-typo")
