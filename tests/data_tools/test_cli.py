"""`python -m data_tools arith`: the samples it writes equal make_samples', in a subprocess and in process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mmdistill.tasks.arith import make_samples
from tests.helpers import REPO


def test_cli_writes_same_samples(tmp_path):
    out = tmp_path / "sub" / "arith.jsonl"
    cmd = [sys.executable, "-m", "data_tools", "arith", "--out", str(out), "--n", "40",
           "--seed", "5", "--split", "test", "--digits", "3", "--ops", "+-*"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not Path(str(out) + ".tmp").exists()
    lines = out.read_text(encoding="utf-8").splitlines()
    got = [json.loads(line) for line in lines]
    assert got == make_samples(40, seed=5, split="test", digits=3, ops=("+", "-", "*"))

    bad = subprocess.run(cmd[:-1] + ["+/"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0

    h = subprocess.run([sys.executable, "-m", "data_tools", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "arith" in h.stdout and "build-tokenizer" in h.stdout


def test_cli_main_in_process(tmp_path):
    from data_tools.cli import main

    out = tmp_path / "a.jsonl"
    assert main(["arith", "--out", str(out), "--n", "7", "--seed", "2", "--ops", "-"]) == 0
    got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert got == make_samples(7, seed=2, split="train", digits=2, ops=("-",))
