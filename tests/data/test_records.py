"""read_jsonl: sample records from a JSONL file, errors naming the file and line."""
from __future__ import annotations

import json

import pytest

from mmdistill.data.records import read_jsonl
from tests.helpers import write_lines


def test_read_jsonl_reads_records_and_sets_ids(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "a"}),
        "",
        json.dumps({"id": "mine", "messages": [{"role": "user", "content": "b"}]}),
        "   ",
    ])
    recs = read_jsonl(f)
    assert [r.get("prompt") for r in recs] == ["a", None]
    assert recs[0]["id"] == "d.jsonl:1"
    assert recs[1]["id"] == "mine"
    assert read_jsonl(str(f)) == recs


def test_read_jsonl_bad_json_names_file_and_line(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "a"}), "", '{"prompt": "b",'])
    with pytest.raises(ValueError) as info:
        read_jsonl(f)
    assert f"{f}:3:" in str(info.value)
    assert "JSON" in str(info.value)


@pytest.mark.parametrize("bad", [{"answer": "1"}, [1, 2], "text", 3, None])
def test_read_jsonl_record_without_task_names_file_and_line(tmp_path, bad):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "a"}), json.dumps(bad), json.dumps({"prompt": "c"})])
    with pytest.raises(ValueError) as info:
        read_jsonl(f)
    msg = str(info.value)
    assert f"{f}:2:" in msg
    assert "prompt" in msg and "messages" in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_jsonl_empty_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError) as info:
        read_jsonl(f)
    assert str(f) in str(info.value) and "no samples" in str(info.value)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")
