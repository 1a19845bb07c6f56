"""The tree stays clean under `ruff check` with pyproject.toml's rules (E, F, W, I; 120 columns).
Skipped where ruff is not installed (it is in the `dev` extra)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from mmdistill.config import REPO_ROOT


def ruff_binary() -> str | None:
    """The ruff of this environment's `ruff` package, else one on PATH."""
    try:
        from ruff.__main__ import find_ruff_bin
    except ImportError:
        return shutil.which("ruff")
    try:
        return str(find_ruff_bin())
    except FileNotFoundError:
        return shutil.which("ruff")


def test_ruff_check_passes_on_the_repository():
    ruff = ruff_binary()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]' brings it)")
    r = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, ("ruff check found problems (the rules: pyproject.toml's [tool.ruff]):\n"
                               + r.stdout + r.stderr)
