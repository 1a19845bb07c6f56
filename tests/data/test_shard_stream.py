"""The shard stream: disjoint ranks and workers, seeded order, exact resume, epochs, bad input."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings

import pytest

from mmdistill.config import load_config
from mmdistill.data.shard_stream import EmptySplit, ShardStream, read_all
from mmdistill.data.shards import ShardError, ShardWriter
from mmdistill.tasks.scenes import make_samples
from tests.helpers import metrics_rows, tar_offsets, write_shards


def text_samples(n: int, split: str = "train") -> list[dict]:
    return [{"id": f"{split}-{i}", "split": split, "domain": "toy", "stage": i % 2, "prompt": f"What is {i}?",
             "answer": str(i), "response": f"Answer: {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), text_samples(40), max_count=5)  # 8 shards


def drain(stream) -> list[str]:
    ids = []
    while True:
        try:
            ids += [s["id"] for s in stream.next()]
        except StopIteration:
            return ids


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_read_disjoint_samples_and_cover_all(shards, num_workers):
    per_rank = [drain(ShardStream(shards, 3, seed=0, rank=r, world_size=2, num_workers=num_workers, epochs=1))
                for r in range(2)]
    for ids in per_rank:
        assert len(ids) == len(set(ids))  # no sample twice within a rank
    assert not set(per_rank[0]) & set(per_rank[1])  # ranks never share a sample
    assert sorted(per_rank[0] + per_rank[1]) == sorted(s["id"] for s in text_samples(40))


def test_order_is_seeded_and_epochs_reshuffle(shards):
    a = drain(ShardStream(shards, 4, seed=1, epochs=2))
    b = drain(ShardStream(shards, 4, seed=1, epochs=2))
    c = drain(ShardStream(shards, 4, seed=2, epochs=2))
    assert a == b and a != c
    assert sorted(a[:40]) == sorted(a[40:]) and a[:40] != a[40:]  # every sample once per epoch, a new order


def test_a_finished_stream_stays_finished(shards):
    """After its epochs, every further call ends too (a training step may ask again), also after a resume."""
    stream = ShardStream(shards, 4, seed=0, epochs=1)
    assert len(drain(stream)) == 40
    for _ in range(2):
        with pytest.raises(StopIteration):
            stream.next()
    again = ShardStream(shards, 4, seed=0, epochs=1)
    again.load_state_dict(stream.state_dict())
    with pytest.raises(StopIteration):
        again.next()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(shards, num_workers):
    def make():
        return ShardStream(shards, 3, seed=3, num_workers=num_workers, shuffle_buffer=7)

    full = make()
    reference = [[s["id"] for s in full.next()] for _ in range(20)]  # crosses an epoch boundary
    for cut in (0, 5, 13, 14):
        first = make()
        for _ in range(cut):
            first.next()
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # what a checkpoint holds
        assert [[s["id"] for s in resumed.next()] for _ in range(20 - cut)] == reference[cut:], cut


def test_select_filters_and_an_empty_selection_is_an_error_not_a_hang(shards):
    ids = drain(ShardStream(shards, 4, seed=0, epochs=1, select={"stage": 1}))
    assert sorted(ids) == sorted(s["id"] for s in text_samples(40) if s["stage"] == 1)
    with pytest.raises(EmptySplit, match="no usable samples"):
        ShardStream(shards, 4, seed=0, select={"split": "test"}).next()
    with pytest.raises(EmptySplit):
        read_all(shards, select={"split": "test"})
    assert [s["id"] for s in read_all(shards, select={"stage": 0})][:2] == ["train-0", "train-2"]


def test_too_few_shards_for_the_readers(shards):
    with pytest.raises(ValueError, match="every reader needs at least one shard"):
        ShardStream(shards, 4, seed=0, world_size=4, num_workers=3)


def corrupt(src, dst):
    """A copy of the shard set whose second shard is cut off inside its last sample (its 5 samples
    take the first 5 KiB of the 10 KiB file; cut in half, only the end-of-archive marker would go)."""
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("s-*.tar"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 - 600])
    return victim


def test_corrupt_shard_raises_naming_it_or_is_skipped_and_counted(shards, tmp_path):
    victim = corrupt(shards, tmp_path / "bad")
    with pytest.raises(ShardError, match=victim.name):
        drain(ShardStream(tmp_path / "bad", 4, seed=0, epochs=1, shuffle_buffer=0))
    stream = ShardStream(tmp_path / "bad", 4, seed=0, epochs=1, on_bad="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = drain(stream)
    assert stream.bad_samples >= 1 and any(victim.name in str(w.message) for w in caught)
    assert 35 <= len(ids) < 40 and len(ids) == len(set(ids))


def test_bad_sample_is_skipped_and_counted_the_rest_arrive(tmp_path):
    samples = text_samples(6)
    write_shards(tmp_path / "ok", samples, max_count=6)
    shard = next((tmp_path / "ok").glob("s-*.tar"))
    # rewrite the shard with one record missing its prompt
    out = tmp_path / "broken"
    out.mkdir()
    with tarfile.open(shard) as src, tarfile.open(out / shard.name, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.startswith("train-2."):
                rec = json.loads(data)
                del rec["prompt"]
                data = json.dumps(rec).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    broken = out / shard.name
    with pytest.raises(ShardError, match="train-2"):
        drain(ShardStream(broken, 2, seed=0, epochs=1))
    stream = ShardStream(broken, 2, seed=0, epochs=1, on_bad="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = drain(stream)
    assert sorted(ids) == sorted(s["id"] for s in samples if s["id"] != "train-2") and stream.bad_samples == 1


def test_image_samples_stream_decoded(tmp_path):
    samples = make_samples(6, 0, "train", image_size=32)
    write_shards(tmp_path, samples, max_count=2)
    stream, got = ShardStream(tmp_path, 4, seed=0, epochs=1, num_workers=2), {}
    while True:
        try:
            got.update({s["id"]: s for s in stream.next()})
        except StopIteration:
            break
    for s in samples:
        g = got[s["id"]]
        assert g["images"][0].tobytes() == s["images"][0].tobytes() and g["boxes"] == s["boxes"]


def test_train_on_shards_resumes_exactly(tmp_path):
    """A run on shards (2 workers) resumed from its step-2 checkpoint logs what the uninterrupted run logged."""
    from mmdistill.training.loop import train

    write_shards(tmp_path / "train", make_samples(24, 0, "train", image_size=32, max_objects=3), max_count=4)
    write_shards(tmp_path / "test", make_samples(4, 0, "test", image_size=32, max_objects=3), max_count=4)
    base = ["data.source=shards", f"data.train_path={tmp_path / 'train'}", f"data.test_path={tmp_path / 'test'}",
            "data.num_workers=2", "data.shuffle_buffer=8", "train.max_steps=4", "train.checkpoint_every=2",
            "eval.num_samples=0"]
    full = train(load_config("tiny_vlm", [*base, f"train.output_dir={tmp_path / 'full'}"]))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    train(load_config("tiny_vlm", [*base, f"train.output_dir={resumed}", "train.resume=auto"]))
    rows = [metrics_rows(d) for d in (full, resumed)]
    for a, b in zip(rows[0][2:], rows[1][2:]):
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["tokens"] == b["tokens"]
        assert a["data_bad_samples"] == 0


# --- hostile inputs -----------------------------------------------------------------------------

def replace_member(shard, name: str, data) -> None:
    """Rewrite a real shard with member `name` holding `data` (bytes, or a function of the old bytes)."""
    with tarfile.open(shard) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(shard, "w") as dst:
        for m, content in members:
            if m.name == name:
                content = data(content) if callable(data) else data
                m.size = len(content)
            dst.addfile(m, io.BytesIO(content))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_json_member_nested_100000_deep_is_skipped_and_counted_in_workers_too(tmp_path, num_workers):
    """json.loads raises RecursionError on it: inside a DataLoader worker that was a crash naming no shard."""
    write_shards(tmp_path / "ds", text_samples(8), max_count=4)
    shard = sorted((tmp_path / "ds").glob("s-*.tar"))[1]
    replace_member(shard, "train-5.json", b"[" * 100_000 + b"]" * 100_000)
    stream = ShardStream(tmp_path / "ds", 3, seed=0, epochs=1, num_workers=num_workers, on_bad="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = drain(stream)
    assert sorted(ids) == sorted(f"train-{i}" for i in range(8) if i != 5) and stream.bad_samples == 1
    assert any(f"{shard.name}: sample 'train-5': record is not usable JSON" in str(w.message) for w in caught)
    with pytest.raises(ShardError) as e:
        drain(ShardStream(tmp_path / "ds", 3, seed=0, epochs=1, num_workers=num_workers))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{shard}: sample 'train-5': record is not usable JSON"), msg


def test_a_zeroed_header_counts_the_samples_it_hides(tmp_path):
    write_shards(tmp_path / "ds", text_samples(6), max_count=6)
    shard = next((tmp_path / "ds").glob("s-*.tar"))
    offset = tar_offsets(shard)[2][1]  # train-2's header: train-3..5 come after it
    data = bytearray(shard.read_bytes())
    data[offset: offset + 512] = bytes(512)
    shard.write_bytes(bytes(data))
    stream = ShardStream(tmp_path / "ds", 2, seed=0, epochs=1, on_bad="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = drain(stream)
    assert sorted(ids) == ["train-0", "train-1"] and stream.bad_samples == 3  # train-3, train-4, train-5
    stats = {}
    assert len(read_all(tmp_path / "ds", on_bad="skip", stats=stats)) == 2 and stats["bad"] == 3


def test_an_empty_manifest_says_the_dataset_is_empty(tmp_path):
    ShardWriter(tmp_path / "empty", prefix="s").close()  # every record was skipped: a manifest of no shards
    for make in (lambda: ShardStream(tmp_path / "empty", 4, seed=0), lambda: read_all(tmp_path / "empty")):
        with pytest.raises(ShardError, match=r"empty: the manifest lists no shards \(0 samples\): the dataset is "
                                             r"empty \(were all its records skipped"):
            make()


def test_bad_test_samples_are_counted_not_dropped_unsaid(tmp_path):
    write_shards(tmp_path / "test", text_samples(4, "test"), max_count=4)
    shard = next((tmp_path / "test").glob("s-*.tar"))
    lone = "What is \ud800?"  # a lone surrogate: valid JSON ("\\ud800"), no UTF-8 for it
    replace_member(shard, "test-1.json", lambda raw: json.dumps({**json.loads(raw), "prompt": lone}).encode())
    stats = {}
    got = read_all(tmp_path / "test", on_bad="skip", stats=stats)
    assert [s["id"] for s in got] == ["test-0", "test-2", "test-3"]
    assert stats["bad"] == 1 and "sample 'test-1'" in stats["errors"][0]


def test_the_image_pixel_cap_reaches_the_stream(tmp_path):
    write_shards(tmp_path / "ds", make_samples(4, 0, "train", image_size=32), max_count=4)  # 32 x 32 images
    stream = ShardStream(tmp_path / "ds", 2, seed=0, epochs=1, on_bad="skip", max_image_pixels=32 * 32 - 1)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(EmptySplit, match="4 bad sample"):
        warnings.simplefilter("always")
        drain(stream)
    assert "larger than the cap of 1,023 pixels" in str(caught[0].message)
    assert len(drain(ShardStream(tmp_path / "ds", 2, seed=0, epochs=1, max_image_pixels=32 * 32))) == 4
