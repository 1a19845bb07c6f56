"""load_split: a config's train and test samples, generated (arith) or read from JSONL."""
from __future__ import annotations

import json

from mmdistill.config import load_config
from mmdistill.data.sources import load_split
from tests.helpers import write_lines


def test_load_split_arith():
    cfg = load_config(None, ["data.arith.num_train=20", "data.arith.num_test=6"])
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    assert len(train) == 20 and len(test) == 6
    assert all("prompt" in r and "answer" in r for r in train + test)
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"test"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert load_split(cfg.data, "train") == train  # deterministic


def test_load_split_arith_seed_changes_samples():
    a = load_config(None, ["data.arith.num_train=20", "data.arith.seed=0"])
    b = load_config(None, ["data.arith.num_train=20", "data.arith.seed=1"])
    assert [r["prompt"] for r in load_split(a.data, "train")] != [r["prompt"] for r in load_split(b.data, "train")]


def test_load_split_jsonl(tmp_path):
    tr = write_lines(tmp_path / "train.jsonl", [json.dumps({"prompt": f"t{i}"}) for i in range(3)])
    te = write_lines(tmp_path / "test.jsonl", [json.dumps({"prompt": "x"})])
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={tr}", f"data.test_path={te}"])
    assert [r["prompt"] for r in load_split(cfg.data, "train")] == ["t0", "t1", "t2"]
    assert [r["prompt"] for r in load_split(cfg.data, "test")] == ["x"]
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={tr}"])
    assert load_split(cfg.data, "test") == []  # no test_path: no held-out split
