"""Sample records (arith / jsonl) and the resumable shuffled SampleStream."""
from __future__ import annotations

import json

import pytest

from mmdistill.config import load_config
from mmdistill.data.records import read_jsonl
from mmdistill.data.sources import load_split
from mmdistill.data.stream import SampleStream


def samples(n: int) -> list[dict]:
    return [{"id": f"s{i}", "prompt": f"p{i}"} for i in range(n)]


def ids(batch: list[dict]) -> list[str]:
    return [s["id"] for s in batch]


def draw(stream: SampleStream, n_batches: int) -> list[str]:
    return [i for _ in range(n_batches) for i in ids(stream.next())]


# --------------------------------------------------------------------------- SampleStream


def test_stream_is_deterministic():
    a, b = SampleStream(samples(10), 3, seed=5), SampleStream(samples(10), 3, seed=5)
    assert draw(a, 12) == draw(b, 12)


def test_stream_seed_matters():
    assert draw(SampleStream(samples(20), 5, seed=0), 4) != draw(SampleStream(samples(20), 5, seed=1), 4)


def test_stream_batches_have_batch_size():
    s = SampleStream(samples(7), 3, seed=0)
    for _ in range(10):
        assert len(s.next()) == 3
    s = SampleStream(samples(2), 5, seed=0)  # a batch larger than the data wraps epochs
    assert len(s.next()) == 5


@pytest.mark.parametrize("n, batch", [(10, 5), (10, 4), (7, 3), (12, 1), (5, 7)])
def test_stream_covers_every_sample_once_per_epoch(n, batch):
    s = SampleStream(samples(n), batch, seed=3)
    epochs = 4
    flat = []
    while len(flat) < n * epochs:
        flat += ids(s.next())
    all_ids = sorted(f"s{i}" for i in range(n))
    for e in range(epochs):
        assert sorted(flat[e * n:(e + 1) * n]) == all_ids, f"epoch {e}"


def test_stream_reshuffles_every_epoch():
    n = 20
    s = SampleStream(samples(n), n, seed=0)
    orders = [ids(s.next()) for _ in range(4)]
    assert orders[0] != [f"s{i}" for i in range(n)], "the first epoch is not shuffled"
    assert len({tuple(o) for o in orders}) == 4, "epochs repeat the same order"
    assert s.state_dict() == {"epoch": 3, "index": n}


def test_stream_state_is_two_ints_and_json():
    s = SampleStream(samples(10), 4, seed=1)
    draw(s, 3)
    state = s.state_dict()
    assert state == {"epoch": 1, "index": 2}
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 5, 9])
def test_stream_resume_continues_identically(consumed):
    data = samples(10)
    a = SampleStream(data, 4, seed=7)
    draw(a, consumed)
    state = json.loads(json.dumps(a.state_dict()))
    b = SampleStream(data, 4, seed=7)
    draw(b, 2)  # a stream at another position is moved, not appended to
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert draw(b, 8) == draw(a, 8)


def test_stream_empty_raises():
    with pytest.raises(ValueError, match="no samples"):
        SampleStream([], 4, seed=0)


def test_stream_returns_the_sample_records():
    data = samples(4)
    batch = SampleStream(data, 4, seed=0).next()
    assert all(any(rec is d for d in data) for rec in batch)


# --------------------------------------------------------------------------- read_jsonl


def write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_reads_records_and_sets_ids(tmp_path):
    f = write(tmp_path / "d.jsonl", [
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
    f = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "a"}), "", '{"prompt": "b",'])
    with pytest.raises(ValueError) as info:
        read_jsonl(f)
    assert f"{f}:3:" in str(info.value)
    assert "JSON" in str(info.value)


@pytest.mark.parametrize("bad", [{"answer": "1"}, [1, 2], "text", 3, None])
def test_read_jsonl_record_without_task_names_file_and_line(tmp_path, bad):
    f = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "a"}), json.dumps(bad), json.dumps({"prompt": "c"})])
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


# --------------------------------------------------------------------------- load_split


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
    tr = write(tmp_path / "train.jsonl", [json.dumps({"prompt": f"t{i}"}) for i in range(3)])
    te = write(tmp_path / "test.jsonl", [json.dumps({"prompt": "x"})])
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={tr}", f"data.test_path={te}"])
    assert [r["prompt"] for r in load_split(cfg.data, "train")] == ["t0", "t1", "t2"]
    assert [r["prompt"] for r in load_split(cfg.data, "test")] == ["x"]
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={tr}"])
    assert load_split(cfg.data, "test") == []  # no test_path: no held-out split
