"""Converters to shards: each source on a small real file, read back with iter_shard; bad records
named (file:line / record id) or skipped and counted; byte-identical shards on a rerun."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main
from mmdistill.data.convert.chat import from_chat_jsonl, from_llava_json
from mmdistill.data.convert.common import BadRecords, ConvertError
from mmdistill.data.convert.hf_disk import parse_mapping
from mmdistill.data.convert.reasoning_gym import from_reasoning_gym
from mmdistill.data.convert.scenes import HELD_OUT_COMBOS, SuiteSizes, write_scenes_suite
from mmdistill.data.shards import iter_samples, read_manifest
from mmdistill.tasks.reasoning_gym import REASONING_GYM_WITH_SOLUTIONS, reasoning_gym_score
from tests.helpers import fifo, huge_png, write_lines


def read_back(out) -> list[dict]:
    return list(iter_samples(out))


def shard_digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.tar"))}


def png(path: Path, size: tuple[int, int], color) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


SHAREGPT = {"id": "sg-1", "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "The square is red.\nAnswer: red"}],
    "image": "imgs/a.png", "hint": "Look at the square.",
    "boxes": [{"label": "square", "box": [1, 1, 5, 5], "image": 0}]}
OPENAI = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "2+2 was 4, so 3+3 is 6.\nAnswer: 6"}],
    "reasoning": "3+3=6", "answer": 6, "checker": "numeric"}


@pytest.fixture
def chat_file(tmp_path) -> Path:
    png(tmp_path / "imgs/a.png", (16, 12), (200, 0, 0))
    return write_lines(tmp_path / "chat.jsonl", [SHAREGPT, "", OPENAI])


def test_chat_jsonl_sharegpt_and_openai(chat_file, tmp_path):
    out = tmp_path / "out"
    assert main(["chat-jsonl", str(chat_file), "--out", str(out), "--split", "val", "--stage", "2",
                 "--domain", "mychat"]) == 0
    sg, oa = read_back(out)
    for s in (sg, oa):
        assert (s["split"], s["domain"], s["stage"]) == ("val", "mychat", 2)
    assert sg["id"] == "sg-1" and sg["system"] == "Be brief."
    assert sg["messages"] == [{"role": "user", "content": [{"type": "image"},
                                                            {"type": "text", "text": "What colour is the square?"}]}]
    assert sg["response"] == "The square is red.\nAnswer: red" and sg["answer"] == "red"  # from "Answer:"
    assert sg["hint"] == "Look at the square." and sg["boxes"][0]["label"] == "square" and sg["checker"] == "exact"
    assert [im.size for im in sg["images"]] == [(16, 12)]
    assert oa["id"] == "chat.jsonl:3"  # line 2 is blank, not a record
    assert [m["role"] for m in oa["messages"]] == ["user", "assistant", "user"]
    assert oa["answer"] == "6" and oa["reasoning"] == "3+3=6" and oa["checker"] == "numeric"
    assert "images" not in oa and read_manifest(out)["meta"]["converter"] == "chat-jsonl"


def test_chat_jsonl_image_root(tmp_path):
    png(tmp_path / "elsewhere/imgs/a.png", (8, 8), (0, 0, 255))
    src = write_lines(tmp_path / "c.jsonl", [SHAREGPT])
    with pytest.raises(ConvertError, match=r"c\.jsonl:1: image file 'imgs/a.png' not found"):
        list(from_chat_jsonl(src))
    (s,) = from_chat_jsonl(src, image_root=tmp_path / "elsewhere")
    assert s["images"] == [str(tmp_path / "elsewhere/imgs/a.png")]


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
     r"bad\.jsonl:2: needs a user turn then a final assistant turn"),
    (json.dumps({"conversations": [{"from": "alien", "value": "x"}]}),
     r"bad\.jsonl:2: turn 0 has unknown role 'alien'"),
    (json.dumps({"id": "a", "messages": OPENAI["messages"]}),
     r"bad\.jsonl:2: duplicate id 'a' .*first at .*bad\.jsonl:1"),
    (json.dumps({"messages": OPENAI["messages"], "answer": [1]}),
     r"bad\.jsonl:2: .*'answer' must be a string or number"),
    # hostile lines: each one line naming file:line, skippable; before, tracebacks naming nothing
    ("[" * 100_000 + "]" * 100_000, r"bad\.jsonl:2: not usable JSON \(nested too deeply to parse\)"),
    ('{"messages": [], "answer": ' + "7" * 5000 + "}", r"bad\.jsonl:2: not usable JSON \(Exceeds the limit"),
    (json.dumps({"messages": [{"role": "user", "content": "x \ud800"}, {"role": "assistant", "content": "y"}]}),
     r"bad\.jsonl:2: .*'messages'\[0\]\['content'\] is not valid text: '\\ud800' at character 2 is a lone surrogate"),
])
def test_chat_jsonl_bad_record_named_or_counted(tmp_path, capsys, bad_line, message):
    good = {"id": "a", "messages": OPENAI["messages"]}
    src = write_lines(tmp_path / "bad.jsonl", [good, bad_line, dict(good, id="b")])
    out = tmp_path / "out"
    assert main(["chat-jsonl", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (out / "manifest.json").exists()  # a failed build never looks complete
    assert main(["chat-jsonl", str(src), "--out", str(tmp_path / "skip"), "--on-bad", "skip"]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 samples" in captured.out and "skipped 1 bad record(s)" in captured.err
    assert [s["id"] for s in read_back(tmp_path / "skip")] == ["a", "b"]


def test_bad_records_counts():
    bad = BadRecords("skip")
    bad.reject("f:1: x")
    assert (bad.count, bad.errors) == (1, ["f:1: x"])
    with pytest.raises(ValueError):
        BadRecords("ignore")


def llava_dir(tmp_path: Path) -> Path:
    png(tmp_path / "llava/images/cat.png", (20, 10), (10, 200, 10))
    png(tmp_path / "llava/images/sub/dog.png", (10, 20), (10, 10, 200))
    data = [
        {"id": "cat-1", "image": "cat.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "dog-1", "image": "sub/dog.png", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Brown."},
            {"from": "human", "value": "Look again: <image> Is it a dog?"}, {"from": "gpt", "value": "Yes"}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "llava/data.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path / "llava"


def test_llava_json(tmp_path):
    root = llava_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["llava", str(root / "data.json"), "--image-root", str(root / "images"), "--out", str(out),
                 "--max-count", "2"]) == 0
    assert len(read_manifest(out)["shards"]) == 2
    cat, dog, text = read_back(out)
    assert cat["messages"] == [{"role": "user",
                                "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]}]
    assert cat["response"] == cat["answer"] == "A cat." and cat["images"][0].size == (20, 10)
    assert dog["messages"][0] == {"role": "user", "content": "Describe it."}
    assert dog["messages"][2]["content"] == [{"type": "text", "text": "Look again:"}, {"type": "image"},
                                             {"type": "text", "text": "Is it a dog?"}]
    assert dog["response"] == "Yes" and dog["images"][0].size == (10, 20)
    assert "images" not in text and {s["domain"] for s in (cat, dog, text)} == {"llava"}


def test_llava_missing_image_and_placeholder_count(tmp_path):
    root = llava_dir(tmp_path)
    data = json.loads((root / "data.json").read_text())
    data[1]["image"] = "nope.png"
    (root / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConvertError, match=r"bad\.json\[1\] \(id 'dog-1'\): image file 'nope.png' not found"):
        list(from_llava_json(root / "bad.json", root / "images"))
    data[1]["image"] = ["sub/dog.png", "cat.png"]  # two images, one placeholder
    (root / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConvertError, match=r"\(id 'dog-1'\): 1 image placeholder\(s\) for 2 image\(s\)"):
        list(from_llava_json(root / "bad.json", root / "images"))
    skip = BadRecords("skip")
    assert [s["id"] for s in from_llava_json(root / "bad.json", root / "images", bad=skip)] == ["cat-1", "text-1"]
    assert skip.count == 1


def test_parse_mapping():
    assert parse_mapping("prompt=question, answer=label") == {"prompt": "question", "answer": "label"}
    for bad in ("prompt", "nonsense=x", "prompt=a,prompt=b"):
        with pytest.raises(ValueError):
            parse_mapping(bad)


def test_hf_disk_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets",
                                   reason="the 'datasets' package is not installed (pip install 'mmdistill[data]')")
    features = datasets.Features({"question": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "image": datasets.Image(), "why": datasets.Value("string")})
    images = [Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"question": [f"Is {i} even?" for i in range(3)], "label": [1, 0, 1],
                                     "image": images, "why": ["0 % 2 == 0", "1 % 2 == 1", "2 % 2 == 0"]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq/part-0.parquet"))
    mapping = "prompt=question,answer=label,images=image,reasoning=why"
    for src, extra in (("saved", []), ("dict", ["--split", "test"]), ("pq", [])):
        out = tmp_path / f"out-{src}"
        assert main(["hf-disk", str(tmp_path / src), "--map", mapping, "--out", str(out), *extra]) == 0, src
        got = read_back(out)
        assert [s["answer"] for s in got] == ["yes", "no", "yes"]  # ClassLabel names
        assert [s["images"][0].size for s in got] == [(8, 8), (9, 8), (10, 8)]
        assert got[1]["response"] == "1 % 2 == 1\nAnswer: no" and got[0]["prompt"] == "Is 0 even?"
        assert got[0]["id"] == f"{src}-{got[0]['split']}-0" and got[0]["domain"] == "hf"
    assert main(["hf-disk", str(tmp_path / "dict"), "--map", mapping, "--out", str(tmp_path / "x")]) == 1  # no 'train'
    assert main(["hf-disk", str(tmp_path / "saved"), "--out", str(tmp_path / "y")]) == 1  # no prompt column
    assert main(["hf-disk", str(tmp_path / "saved"), "--map", "prompt=nope", "--out", str(tmp_path / "z")]) == 1


def test_reasoning_gym_tasks_with_solutions(tmp_path):
    pytest.importorskip("reasoning_gym",
                        reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    assert 3 <= len(REASONING_GYM_WITH_SOLUTIONS) <= 5
    out = tmp_path / "rg"
    assert main(["reasoning-gym", "--n", "5", "--seed", "3", "--out", str(out), "--stage", "1"]) == 0
    got = read_back(out)
    assert len(got) == 5 * len(REASONING_GYM_WITH_SOLUTIONS)
    for s in got:
        task = s["task"]
        assert s["checker"] == f"reasoning_gym:{task}" and (s["split"], s["stage"]) == ("train", 1)
        assert s["hint"].strip() and s["reasoning"].strip(), task
        assert s["response"] == s["reasoning"] + "\nAnswer: " + s["answer"]
        assert reasoning_gym_score(task, s["response"], s) == 1.0, (task, s["response"])  # from the stored sample
        assert reasoning_gym_score(task, "Answer: 12345678", s) < 1.0


def test_reasoning_gym_task_config_from_the_command_line(tmp_path, capsys):
    """--set KEY=VALUE reaches the task's reasoning-gym config (here: one-digit, two-term sums)."""
    pytest.importorskip("reasoning_gym",
                        reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    out = tmp_path / "easy"
    args = ["reasoning-gym", "--tasks", "chain_sum", "--n", "8", "--out", str(out)]
    assert main([*args, "--set", "min_digits=1", "--set", "max_digits=1", "--set", "min_terms=2",
                 "--set", "max_terms=2"]) == 0
    for s in read_back(out):
        expr = s["prompt"].rsplit(":", 1)[1].strip().rstrip("=").strip()
        numbers = expr.replace("+", " ").replace("-", " ").split()
        assert len(numbers) == 2 and all(len(n) == 1 for n in numbers), s["prompt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["meta"]["config"] == {"min_digits": 1, "max_digits": 1, "min_terms": 2, "max_terms": 2}
    with pytest.raises(SystemExit, match="--set wants KEY=VALUE, got 'max_digits'"):
        main([*args[:-1], str(tmp_path / "bad"), "--set", "max_digits"])


def test_reasoning_gym_splits_and_other_tasks():
    pytest.importorskip("reasoning_gym",
                        reason="the 'reasoning-gym' package is not installed (pip install 'mmdistill[data]')")
    train = {s["prompt"] for s in from_reasoning_gym("chain_sum", 60, seed=0, split="train")}
    test = {s["prompt"] for s in from_reasoning_gym("chain_sum", 20, seed=0, split="test")}
    assert len(train) == 60 and len(test) == 20 and not train & test
    a = [s["prompt"] for s in from_reasoning_gym("leg_counting", 5, seed=0)]
    assert a == [s["prompt"] for s in from_reasoning_gym("leg_counting", 5, seed=0)]
    assert a != [s["prompt"] for s in from_reasoning_gym("leg_counting", 5, seed=1)]
    (plain,) = from_reasoning_gym("word_sorting", 1, seed=0)  # no worked solution known
    assert "hint" not in plain and plain["response"] == "Answer: " + plain["answer"]
    assert reasoning_gym_score("word_sorting", plain["response"], plain) == 1.0
    with pytest.raises(ConvertError, match="no_such_task"):
        list(from_reasoning_gym("no_such_task", 1))


SUITE_SIZES = SuiteSizes(train=24, test=8, ood=8, cl_train=6, cl_test=4)


def labels(samples) -> set[str]:
    return {b["label"] for s in samples for b in s["boxes"]}


def test_scenes_suite_layout(tmp_path):
    out = tmp_path / "suite"
    assert main(["scenes-suite", "--out", str(out), "--seed", "1", "--n-train", "24", "--n-test", "8", "--n-ood", "8",
                 "--n-cl-train", "6", "--n-cl-test", "4"]) == 0
    parts = (["train", "test", "ood_objects", "ood_combos"]
             + [f"cl_stage{k}/{s}" for k in (1, 2, 3) for s in ("train", "test")])
    assert json.loads((out / "suite.json").read_text())["parts"] == {
        p: {"train": 24, "test": 8}.get(p, 8 if p.startswith("ood") else 6 if p.endswith("train") else 4)
        for p in parts}
    data = {p: read_back(out / p) for p in parts}
    assert {s["split"] for s in data["train"]} == {"train"} and {s["split"] for s in data["test"]} == {"test"}
    assert all(s["checker"] == "scenes" and s["domain"] == "scenes" for p in parts for s in data[p])
    held = set(HELD_OUT_COMBOS)
    assert not labels(data["train"]) & held and not labels(data["test"]) & held
    assert labels(data["ood_combos"]) <= held
    assert all(5 <= len(s["boxes"]) <= 7 for s in data["ood_objects"])
    for k, qtype in enumerate(("count", "attribute", "spatial"), 1):
        for split in ("train", "test"):
            got = data[f"cl_stage{k}/{split}"]
            assert {(s["task"], s["stage"], s["split"]) for s in got} == {(qtype, k, split)}
    ids = [s["id"] for p in parts for s in data[p]]
    assert len(ids) == len(set(ids))  # parts can be mixed into one dataset


def test_scenes_command(tmp_path, capsys):
    out = tmp_path / "sc"
    assert main(["scenes", "--out", str(out), "--n", "6", "--seed", "2", "--split", "test", "--question-types",
                 "count,attribute", "--only-combos", "red circle,blue square", "--stage", "3"]) == 0
    got = read_back(out)
    assert len(got) == 6 and {s["task"] for s in got} <= {"count", "attribute"}
    assert labels(got) <= {"red circle", "blue square"} and {s["stage"] for s in got} == {3}
    assert all(b["image"] == 0 for s in got for b in s["boxes"])
    capsys.readouterr()
    assert main(["scenes", "--out", str(tmp_path / "x"), "--n", "2", "--exclude-combos", "pink circle"]) == 1
    assert capsys.readouterr().err.startswith("error: exclude_combos: 'pink circle' is not 'color shape'")


def test_deterministic_shards(tmp_path, chat_file):
    for run in ("a", "b"):
        assert main(["chat-jsonl", str(chat_file), "--out", str(tmp_path / run / "chat"), "--max-count", "1"]) == 0
        write_scenes_suite(tmp_path / run / "suite", seed=4, sizes=SUITE_SIZES)
    a, b = shard_digests(tmp_path / "a"), shard_digests(tmp_path / "b")
    assert a == b and len(a) == 2 + 10
    assert (tmp_path / "a/suite/suite.json").read_bytes() == (tmp_path / "b/suite/suite.json").read_bytes()


def test_existing_shards_need_overwrite(tmp_path, chat_file, capsys):
    out = tmp_path / "out"
    assert main(["chat-jsonl", str(chat_file), "--out", str(out)]) == 0
    assert main(["chat-jsonl", str(chat_file), "--out", str(out)]) == 1
    assert "already holds" in capsys.readouterr().err
    assert main(["chat-jsonl", str(chat_file), "--out", str(out), "--overwrite"]) == 0


def test_hf_messages_and_image_lists(tmp_path):
    datasets = pytest.importorskip("datasets",
                                   reason="the 'datasets' package is not installed (pip install 'mmdistill[data]')")
    rows = {"messages": [[{"role": "system", "content": "Terse."}, {"role": "user", "content": "Same size?"},
                          {"role": "assistant", "content": "Answer: no"}],
                         [{"role": "user", "content": "Same size?"}, {"role": "assistant", "content": "Answer: yes"}]],
            "images": [[Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))], [Image.new("RGB", (6, 6))] * 2],
            "id": ["m0", "m1"], "checker": ["choice", "choice"]}
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.Sequence(datasets.Image()), "id": datasets.Value("string"),
                                  "checker": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    assert main(["hf-disk", str(tmp_path / "ds"), "--out", str(out), "--domain", "pairs"]) == 0  # identity mapping
    m0, m1 = read_back(out)
    assert m0["system"] == "Terse." and m0["messages"] == [{"role": "user", "content": "Same size?"}]
    assert (m0["response"], m0["answer"], m1["answer"], m0["checker"]) == ("Answer: no", "no", "yes", "choice")
    assert [im.size for im in m0["images"]] == [(4, 4), (5, 4)] and len(m1["images"]) == 2


# --- hostile sources ------------------------------------------------------------------------------

def test_chat_jsonl_line_that_is_not_utf8_is_its_bad_record(tmp_path, capsys):
    good = json.dumps({"id": "a", "messages": OPENAI["messages"]}).encode()
    src = tmp_path / "latin.jsonl"
    src.write_bytes(good + b"\n" + good.replace(b'"a"', b'"caf\xe9"') + b"\n" + good.replace(b'"a"', b'"b"') + b"\n")
    assert main(["chat-jsonl", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {src}:2: not UTF-8 (b'\\xe9' at byte 12)\n", err
    assert main(["chat-jsonl", str(src), "--out", str(tmp_path / "skip"), "--on-bad", "skip"]) == 0
    assert "skipped 1 bad record(s)" in capsys.readouterr().err
    assert [s["id"] for s in read_back(tmp_path / "skip")] == ["a", "b"]


@pytest.mark.parametrize("path, message", [
    ("../secret.png", r"image path '\.\./secret\.png' leaves the image root \(.*root\) with '\.\.'"),
    ("imgs/../../secret.png", r"image path 'imgs/\.\./\.\./secret\.png' leaves the image root"),
    ("ABSOLUTE", r"image path '.*secret\.png' is absolute; image paths must be relative to the image root"),
])
def test_converters_refuse_images_outside_the_image_root(tmp_path, path, message):
    secret = png(tmp_path / "secret.png", (4, 4), (1, 2, 3))  # readable by the user, outside --image-root
    png(tmp_path / "root/imgs/a.png", (4, 4), (0, 0, 0))
    path = str(secret) if path == "ABSOLUTE" else path
    src = write_lines(tmp_path / "root/c.jsonl", [dict(SHAREGPT, image=path)])
    with pytest.raises(ConvertError, match=r"c\.jsonl:1: " + message):
        list(from_chat_jsonl(src))
    llava = tmp_path / "root/l.json"
    llava.write_text(json.dumps([{"id": "l1", "image": path, "conversations": SHAREGPT["conversations"][1:]}]))
    with pytest.raises(ConvertError, match=r"l\.json\[0\] \(id 'l1'\): " + message):
        list(from_llava_json(llava))
    skip = BadRecords("skip")
    assert list(from_chat_jsonl(src, bad=skip)) == [] and skip.count == 1
    ok = write_lines(tmp_path / "root/ok.jsonl", [dict(SHAREGPT, image="imgs/../imgs/a.png")])  # stays inside
    assert len(list(from_chat_jsonl(ok))) == 1


def test_converters_refuse_fifos_as_images_and_as_files(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    fifo(tmp_path / "imgs" / "a.png")
    src = write_lines(tmp_path / "c.jsonl", [SHAREGPT])
    with pytest.raises(ConvertError, match=r"c\.jsonl:1: image file 'imgs/a\.png' cannot be read: not a regular file "
                                           r"\(a FIFO \(named pipe\)\)"):
        list(from_chat_jsonl(src))
    pipe = fifo(tmp_path / "pipe.jsonl")
    assert main(["chat-jsonl", str(pipe), "--out", str(tmp_path / "out")]) == 1
    assert "pipe.jsonl: cannot read it as a data file: not a regular file (a FIFO" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="not a regular file"):
        list(from_llava_json(fifo(tmp_path / "pipe.json")))


def test_converters_refuse_a_huge_image_before_decoding_it(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(huge_png())  # 12000 x 12000 in 18 KB
    src = write_lines(tmp_path / "c.jsonl", [SHAREGPT])
    assert main(["chat-jsonl", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}:1: ") and err.count("\n") == 1
    assert "image of 12000x12000 = 144,000,000 pixels is larger than the cap of 64,000,000 pixels" in err
    (tmp_path / "imgs/a.png").write_bytes(huge_png(40, 30))
    assert main(["chat-jsonl", str(src), "--out", str(tmp_path / "low"), "--max-image-pixels", "1000"]) == 1
    assert "image of 40x30 = 1,200 pixels is larger than the cap of 1,000 pixels" in capsys.readouterr().err
    assert main(["chat-jsonl", str(src), "--out", str(tmp_path / "ok"), "--max-image-pixels", "1200"]) == 0


def test_llava_file_nested_too_deep_is_one_line(tmp_path):
    src = tmp_path / "deep.json"
    src.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConvertError, match=r"deep\.json: not usable JSON \(nested too deeply to parse\)"):
        list(from_llava_json(src))


def test_hf_disk_refuses_to_drop_columns_silently(tmp_path, capsys):
    datasets = pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    datasets.Dataset.from_dict({"question": ["1+1?", "2+2?"], "answer": ["2", "4"], "solution": ["1+1=2", "2+2=4"],
                                "source": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()  # the progress bar of save_to_disk
    out = tmp_path / "out"
    assert main(["hf-disk", str(tmp_path / "ds"), "--map", "prompt=question", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "column(s) 'solution', 'source' map to no sample field and would be lost" in err
    assert "--drop solution,source" in err and not (out / "manifest.json").exists()
    assert main(["hf-disk", str(tmp_path / "ds"), "--map", "prompt=question,reasoning=solution", "--drop", "source",
                 "--out", str(out)]) == 0
    got = read_back(out)
    assert [s["reasoning"] for s in got] == ["1+1=2", "2+2=4"] and read_manifest(out)["meta"]["drop"] == ["source"]
    assert main(["hf-disk", str(tmp_path / "ds"), "--map", "prompt=question", "--drop", "nope",
                 "--out", str(tmp_path / "x")]) == 1
    assert "--drop names column(s) ['nope'] not in the dataset" in capsys.readouterr().err
