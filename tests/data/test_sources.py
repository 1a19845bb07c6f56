"""load_split: a config's train and test samples, generated (arith) or read from JSONL."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from mmdistill.config import ConfigError, load_config
from mmdistill.data.boxes import MAX_IMAGE_PIXELS
from mmdistill.data.shards import ShardError
from mmdistill.data.sources import load_split, skipped_line
from mmdistill.data.stream import train_stream
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


def test_bad_jsonl_lines_under_skip_are_counted_for_both_splits(tmp_path):
    tr = write_lines(tmp_path / "train.jsonl", [{"prompt": "t0"}, '{"prompt": null}', {"prompt": "t2"}])
    te = write_lines(tmp_path / "test.jsonl", [{"prompt": "x"}, {"messages": "y"}])
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={tr}", f"data.test_path={te}"])
    with pytest.raises(ShardError, match=r"train\.jsonl:2: 'prompt' must be a string, got NoneType"):
        load_split(cfg.data, "train")
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={tr}", f"data.test_path={te}",
                             "data.on_bad_sample=skip"])
    stats = {}
    assert [r["prompt"] for r in load_split(cfg.data, "test", stats)] == ["x"] and stats["bad"] == 1
    assert skipped_line(stats, "held-out split").startswith(
        f"warning: held-out split: skipped 1 bad sample(s) (data.on_bad_sample=skip); first: {te}:2: 'messages'")
    assert skipped_line({"bad": 0, "errors": []}, "x") is None
    # the training stream counts them (data_bad_samples) on rank 0 only: every rank reads the whole file
    with pytest.warns(UserWarning, match=r"skipped bad sample: .*train\.jsonl:2"):
        stream = train_stream(cfg.data, 2, seed=0)
    assert stream.bad_samples == 1 and train_stream(cfg.data, 2, seed=0, rank=1, world_size=2).bad_samples == 0


def test_max_image_pixels_config_key(tmp_path):
    assert load_config().data.max_image_pixels == MAX_IMAGE_PIXELS == 64_000_000
    with pytest.raises(ConfigError, match=r"'data\.max_image_pixels' is 0; must be in \(0, inf\)"):
        load_config(None, ["data.max_image_pixels=0"])
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "images": ["a.png"]})])
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={f}", "data.max_image_pixels=99"])
    with pytest.raises(ShardError, match=r"image of 10x10 = 100 pixels is larger than the cap of 99 pixels"):
        load_split(cfg.data, "train")
