"""What a run is built from: hostile training and held-out data is found before the first step,
and under data.on_bad_sample=skip every bad sample skipped is counted and said."""
from __future__ import annotations

import json
import re

import pytest

from mmdistill.config import load_config
from mmdistill.data.shards import ShardError
from mmdistill.training.loop import train
from tests.helpers import metrics_rows, write_lines


def jsonl_data(tmp_path):
    good = [{"prompt": f"What is {i}+1?", "answer": str(i + 1), "response": f"Answer: {i + 1}"} for i in range(8)]
    train_file = write_lines(tmp_path / "train.jsonl", [*good[:4], {"prompt": 5, "answer": "6"}, *good[4:]])
    test_file = write_lines(tmp_path / "test.jsonl", [*good[:3], {"messages": "What is 9+1?", "answer": "10"}])
    return train_file, test_file


def test_bad_jsonl_lines_stop_the_run_before_its_first_step(tmp_path):
    train_file, test_file = jsonl_data(tmp_path)
    cfg = load_config("tiny", [f"train.output_dir={tmp_path / 'run'}", "data.source=jsonl",
                               f"data.train_path={train_file}", f"data.test_path={test_file}", "train.max_steps=1"])
    with pytest.raises(ShardError, match=rf"^{train_file}:5: 'prompt' must be a string, got int$"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_skipped_training_and_held_out_samples_are_counted_and_said(tmp_path, capsys):
    train_file, test_file = jsonl_data(tmp_path)
    cfg = load_config("tiny", [f"train.output_dir={tmp_path / 'run'}", "data.source=jsonl", "data.on_bad_sample=skip",
                               f"data.train_path={train_file}", f"data.test_path={test_file}", "train.max_steps=1",
                               "eval.num_samples=3", "method=sft"])
    with pytest.warns(UserWarning, match=rf"skipped bad sample: {train_file}:5: 'prompt' must be a string"):
        run_dir = train(cfg)
    out = capsys.readouterr().out
    assert (f"warning: held-out split {test_file}: skipped 1 bad sample(s) (data.on_bad_sample=skip); first: "
            f"{test_file}:4: 'messages' must be a non-empty list") in out
    assert re.search(r"held-out accuracy before: \d\.\d{3} \(3 samples, 1 bad skipped\)", out), out
    assert re.search(r"held-out accuracy after:  \d\.\d{3} \(3 samples, 1 bad skipped\)", out), out
    assert metrics_rows(run_dir)[0]["data_bad_samples"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["test_bad_samples"] == 1
