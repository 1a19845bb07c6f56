"""Fixtures the tests share; plain helper functions are in tests/helpers.py."""
from __future__ import annotations

import pytest

from mmdistill.config import load_config
from mmdistill.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def cfg():
    """configs/tiny.yaml. A module that needs other overrides defines its own `cfg`; `tok`
    then follows it."""
    return load_config("tiny")


@pytest.fixture(scope="module")
def tok(cfg):
    """The student's tokenizer (the shipped one, for the tiny configs)."""
    return load_tokenizer(cfg.student)
