"""The resumable shuffled SampleStream."""
from __future__ import annotations

import json

import pytest

from mmdistill.data.stream import SampleStream


def samples(n: int) -> list[dict]:
    return [{"id": f"s{i}", "prompt": f"p{i}"} for i in range(n)]


def ids(batch: list[dict]) -> list[str]:
    return [s["id"] for s in batch]


def draw(stream: SampleStream, n_batches: int) -> list[str]:
    return [i for _ in range(n_batches) for i in ids(stream.next())]


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
