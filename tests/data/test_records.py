"""read_jsonl: sample records from a JSONL file, errors naming the file and line."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from mmdistill.data.records import read_jsonl
from mmdistill.data.shards import ShardError
from tests.helpers import fifo, huge_png, write_lines


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


# --- hostile lines: the checks shard records get, each error one line naming file:line ----------

GOOD_LINE = json.dumps({"prompt": "a", "answer": "1"})
BAD_LINES = {
    "prompt_int": (json.dumps({"prompt": 3}), r"'prompt' must be a string, got int"),
    "prompt_null": (json.dumps({"prompt": None}), r"'prompt' must be a string, got NoneType"),
    "messages_string": (json.dumps({"messages": "hi"}), r"'messages' must be a non-empty list"),
    "surrogate": (json.dumps({"prompt": "x \ud800"}), r"'prompt' is not valid text: '\\ud800' at character 2 is a lone "
                                                       r"surrogate"),
    "deep": ("[" * 100_000 + "]" * 100_000, r"not usable JSON \(nested too deeply to parse\)"),
    "huge_int": ('{"prompt": "a", "answer": ' + "1" * 5000 + "}", r"not usable JSON \(Exceeds the limit"),
    "nan": ('{"prompt": "a", "answer": NaN}', r"'answer' is nan; numbers must be finite"),
    "stage": (json.dumps({"prompt": "a", "stage": "two"}), r"'stage' must be an int >= 0"),
    "images_string": (json.dumps({"prompt": "a", "images": "x.png"}), r"'images' must be a list of image paths"),
    "missing_image": (json.dumps({"prompt": "a", "images": ["nope.png"]}), r"images\[0\]: cannot read image file "
                                                                            r"'.*nope\.png': no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_is_one_error_naming_file_and_line_or_skipped_and_counted(tmp_path, case):
    line, pattern = BAD_LINES[case]
    f = write_lines(tmp_path / "d.jsonl", [GOOD_LINE, line, GOOD_LINE])
    with pytest.raises(ShardError) as info:
        read_jsonl(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}:2: ") and "\n" not in msg and re.search(pattern, msg), msg
    stats = {}
    assert [r["id"] for r in read_jsonl(f, on_bad="skip", stats=stats)] == ["d.jsonl:1", "d.jsonl:3"]
    assert stats["bad"] == 1 and stats["errors"] == [msg]


def test_a_line_that_is_not_utf8_names_its_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n{"prompt": "c"}\n')  # latin-1, not UTF-8
    with pytest.raises(ShardError, match=rf"^{re.escape(str(f))}:2: not UTF-8 \(b'\\xe9' at byte 16\)$"):
        read_jsonl(f)
    stats = {}
    assert [r["prompt"] for r in read_jsonl(f, on_bad="skip", stats=stats)] == ["a", "c"] and stats["bad"] == 1


def test_only_bad_lines_is_no_samples_saying_why(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": 1}), json.dumps({"prompt": 2})])
    with pytest.raises(ShardError, match=r"no samples \(2 bad line\(s\) skipped; first: .*d\.jsonl:1: 'prompt'"):
        read_jsonl(f, on_bad="skip")


def test_images_are_checked_when_read_fifo_size_and_boxes(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "ok.png")
    (tmp_path / "big.png").write_bytes(huge_png())
    fifo(tmp_path / "pipe.png")
    f = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "a", "images": ["ok.png"], "boxes": [{"label": "x", "box": [0, 0, 8, 6]}]},
        {"prompt": "b", "images": ["pipe.png"]},
        {"prompt": "c", "images": ["big.png"]},
        {"prompt": "d", "images": ["ok.png"], "boxes": [{"label": "x", "box": [0, 0, 80, 6]}]},
        {"prompt": "e", "teacher_images": ["ok.png"], "id": 7},
    ])
    stats = {}
    got = read_jsonl(f, on_bad="skip", stats=stats)
    assert [r["prompt"] for r in got] == ["a", "e"] and got[0]["images"] == [str(tmp_path / "ok.png")]
    assert got[1]["id"] == "7"  # ids are strings, as in shards
    assert stats["bad"] == 3
    assert re.search(r"d\.jsonl:2: images\[0\]: cannot read image file '.*pipe\.png': not a regular file \(a FIFO",
                     stats["errors"][0])
    assert re.search(r"d\.jsonl:3: images\[0\]: image of 12000x12000 = 144,000,000 pixels is larger than the cap",
                     stats["errors"][1])
    assert re.search(r"d\.jsonl:4: boxes\[0\]: 'box' .* lies outside image 0", stats["errors"][2])
    assert len(read_jsonl(f, on_bad="skip", max_pixels=None)) == 3  # no cap: the big one passes (not decoded)


def test_a_fifo_as_the_data_file_is_refused_not_waited_on(tmp_path):
    pipe = fifo(tmp_path / "train.jsonl")
    with pytest.raises(ShardError, match=r"train\.jsonl: cannot read a JSONL file here: not a regular file \(a FIFO"):
        read_jsonl(pipe)


def test_select_takes_a_list_from_the_config():
    """data.select='{stage: [1, 2]}' reaches the filter as a ListConfig, not a list: it once matched nothing."""
    from omegaconf import OmegaConf

    from mmdistill.config import load_config
    from mmdistill.data.records import matches

    select = load_config("tiny", ["data.select={stage: [1, 2]}"]).data.select
    assert [s for s in (0, 1, 2, 3) if matches({"stage": s}, select)] == [1, 2]
    assert matches({"task": "ab"}, OmegaConf.create({"task": "ab"})) and not matches({"task": "a"}, {"task": "ab"})
