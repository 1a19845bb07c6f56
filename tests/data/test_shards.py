"""Shard format v1: round trips, byte-identical rebuilds, shard splitting, the manifest, and every
bad input failing (or being skipped) with one line naming the shard and the sample."""
from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile

import pytest
from PIL import Image

from mmdistill.data import shards
from mmdistill.data.boxes import load_image
from mmdistill.data.shards import SCHEMA, ShardError, ShardWriter, decode_sample, encode_sample, iter_shard
from mmdistill.tasks import scenes
from tests.helpers import fifo, huge_png, tar_offsets


def jpeg_bytes(size=(40, 30), colour=(200, 40, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def text_sample(i: int = 0, **extra) -> dict:
    return {"id": f"chat/{i}.x", "split": "val", "domain": "chat", "stage": 2, "checker": "numeric",
            "system": "Be brief.", "messages": [{"role": "user", "content": f"What is {i}+1?"}],
            "answer": str(i + 1), "hint": "add one", "extra": {"source": "unit", "tags": [1, 2]}, **extra}


def samples() -> list[dict]:
    out = scenes.make_samples(3, 0, "train") + [text_sample()]
    out.append({"id": "photo-1", "split": "ood", "domain": "photos", "prompt": "What colour?",
                "images": [jpeg_bytes()], "teacher_images": [scenes.render([], 32)],
                "boxes": [{"label": "patch", "box": [2, 3, 20, 25]}], "answer": "pink"})
    return out


def same(a: dict, b: dict) -> None:
    """Equal as samples: images compared by pixels."""
    assert set(a) == set(b)
    for k in a:
        if k in ("images", "teacher_images"):
            assert [load_image(x, "a").tobytes() for x in a[k]] == [y.tobytes() for y in b[k]]
        else:
            assert json.loads(json.dumps(a[k])) == b[k], k


def build(tmp_path, items, name="ds", **kw) -> str:
    out = str(tmp_path / name)
    with ShardWriter(out, **kw) as w:
        for s in items:
            w.write(s)
    return out


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def write_tar(path, members) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return str(path)


def record(key="bad", **fields) -> bytes:
    rec = {"schema": SCHEMA, "version": 1, "id": key, "split": "train", "prompt": "p",
           "num_images": 0, "num_teacher_images": 0, **fields}
    return json.dumps({k: v for k, v in rec.items() if v is not None}).encode()


GOOD = [("good.json", record("good"))]


def raw_record(answer: bytes) -> bytes:
    """A record whose 'answer' is the given JSON text, as written (json.dumps could not write it)."""
    return record().replace(b'"prompt": "p"', b'"prompt": "p", "answer": ' + answer)


def nested(depth: int):
    value = "leaf"
    for _ in range(depth):
        value = [value]
    return value


# --- round trip, determinism, layout ---------------------------------------------------------

def test_roundtrip_scenes_text_and_jpeg(tmp_path):
    items = samples()
    out = build(tmp_path, items)
    got = list(shards.iter_samples(out))
    assert len(got) == len(items)
    for a, b in zip(items, got):
        same(a, b)
        assert all(im.mode == "RGB" for im in b.get("images", []) + b.get("teacher_images", []))
    names = dict(tar_members(os.path.join(out, "shard-000000.tar")))
    assert names["photo-1.img0.jpg"] == items[-1]["images"][0]  # JPEG kept byte for byte
    assert "photo-1.timg0.png" in names and "scenes-train-0-0.img0.png" in names
    assert "chat_0_x.json" in names  # '/' and '.' become '_'
    rec = json.loads(names["chat_0_x.json"])
    assert (rec["schema"], rec["version"], rec["num_images"], rec["num_teacher_images"]) == (SCHEMA, 1, 0, 0)


def test_member_order_and_metadata(tmp_path):
    out = build(tmp_path, samples())
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as t:
        ms = t.getmembers()
    assert [m.name for m in ms][-3:] == ["photo-1.json", "photo-1.img0.jpg", "photo-1.timg0.png"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in ms} == {(0, 0, 0, "", "", 0o644)}


def test_same_samples_give_identical_bytes(tmp_path):
    a = build(tmp_path, samples(), "a", max_count=2, meta={"seed": 0})
    b = build(tmp_path, samples(), "b", max_count=2, meta={"seed": 0})
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) == 4  # 3 shards + manifest
    for n in names:
        assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n
    assert not [n for n in names if n.endswith(".tmp")]


def test_encode_decode_members_directly():
    s = text_sample(3)
    members = encode_sample(s)
    assert list(members) == ["json"]
    same(s, decode_sample(members, "x"))
    s2 = scenes.make_samples(1, 1)[0]
    m2 = encode_sample(s2)
    assert list(m2) == ["json", "img0.png"]
    same(s2, decode_sample({**m2, "__key__": "k", "__url__": "u"}, "x"))  # webdataset dicts too


def test_webdataset_reads_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    out = build(tmp_path, samples())
    ds = wds.WebDataset(shards.shard_urls(out), shardshuffle=False, empty_check=False)
    got = [decode_sample(m, m["__key__"]) for m in ds]
    assert [g["id"] for g in got] == [s["id"] for s in samples()]


# --- splitting and the manifest --------------------------------------------------------------

def test_max_count_splits(tmp_path):
    items = scenes.make_samples(7, 0)
    out = build(tmp_path, items, max_count=3)
    m = shards.read_manifest(out)
    assert [s["samples"] for s in m["shards"]] == [3, 3, 1]
    assert [s["name"] for s in m["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [s["id"] for s in shards.iter_samples(out)] == [s["id"] for s in items]


def noise_sample(i: int) -> dict:
    """~5 KB of incompressible PNG, so a few samples fill a 20 KB shard."""
    im = Image.frombytes("RGB", (40, 40), random.Random(i).randbytes(40 * 40 * 3))
    return {"id": f"noise-{i}", "split": "train", "prompt": "p", "images": [im]}


def test_max_bytes_splits_without_splitting_a_sample(tmp_path):
    items = [noise_sample(i) for i in range(8)]
    limit = 20480
    out = build(tmp_path, items, max_bytes=limit)
    m = shards.read_manifest(out)
    assert len(m["shards"]) >= 3 and sum(s["samples"] for s in m["shards"]) == 8
    for s in m["shards"]:
        assert s["bytes"] <= limit and s["bytes"] == os.path.getsize(os.path.join(out, s["name"]))
    assert [s["id"] for s in shards.iter_samples(out)] == [s["id"] for s in items]
    # a sample larger than max_bytes gets a shard to itself
    tiny = build(tmp_path, items[:3], "tiny", max_bytes=512)
    assert [s["samples"] for s in shards.read_manifest(tiny)["shards"]] == [1, 1, 1]


def test_manifest_counts_and_meta(tmp_path):
    out = build(tmp_path, samples(), meta={"generator": "scenes", "seed": 0})
    m = shards.read_manifest(out)
    assert m["format"] == "mmdistill.shards" and m["version"] == 1 and m["total"] == 5
    assert m["counts"] == {"split": {"ood": 1, "train": 3, "val": 1}, "stage": {"0": 4, "2": 1},
                           "domain": {"chat": 1, "photos": 1, "scenes": 3}}
    assert m["meta"] == {"generator": "scenes", "seed": 0}
    s = m["shards"][0]
    assert s["sha256"] == shards.sha256_file(os.path.join(out, s["name"]))


def test_shard_urls_forms(tmp_path):
    out = build(tmp_path, scenes.make_samples(4, 0), max_count=1)
    tars = [os.path.join(out, f"shard-00000{i}.tar") for i in range(4)]
    assert shards.shard_urls(out) == tars
    assert shards.shard_urls(os.path.join(out, "manifest.json")) == tars
    assert shards.shard_urls(os.path.join(out, "shard-{000000..000003}.tar")) == tars
    assert shards.shard_urls(tars[2]) == [tars[2]]
    with pytest.raises(ShardError, match=r"shard-000004\.tar: no such shard file"):
        shards.shard_urls(os.path.join(out, "shard-{000000..000004}.tar"))
    os.remove(tars[1])
    with pytest.raises(ShardError, match=r"shard-000001\.tar: no such shard file \(listed in .*manifest\.json\)"):
        shards.shard_urls(out)
    with pytest.raises(ShardError, match="no such manifest"):
        shards.shard_urls(str(tmp_path))


# --- writer errors ---------------------------------------------------------------------------

def test_writer_rejects_duplicate_keys(tmp_path):
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 'a_b': duplicate key"):
        build(tmp_path, [text_sample(0, id="a.b"), text_sample(1, id="a_b")])
    assert not os.path.exists(tmp_path / "ds" / "manifest.json")  # a failed build never looks complete
    assert not [n for n in os.listdir(tmp_path / "ds") if n.endswith(".tmp")]


@pytest.mark.parametrize("bad, match", [
    ({"prompt": None}, r"sample 'w1': missing field 'prompt'"),
    ({"stage": -1}, r"sample 'w1': 'stage' must be an int >= 0"),
    ({"checker": "fuzzy"}, r"sample 'w1': unknown checker 'fuzzy'"),
    ({"extra": {1, 2}}, r"sample 'w1': field 'extra' is not JSON-serialisable"),
    ({"images": [b"not an image"]}, r"sample 'w1': images\[0\]: cannot decode image"),
    ({"images": ["/nonexistent/x.png"]}, r"sample 'w1': images\[0\]: cannot read image file"),
    ({"boxes": [{"label": "x", "box": [0, 0, 99, 99]}]}, r"sample 'w1': boxes\[0\]: 'box' .* outside image 0"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, r"sample 'w1': 'messages' has no 'user' message"),
])
def test_writer_checks_each_sample(tmp_path, bad, match):
    s = {"id": "w1", "split": "train", "prompt": "p", "images": [png_bytes()], **bad}
    s = {k: v for k, v in s.items() if v is not None}
    with pytest.raises(ShardError, match=r"ds[/\\]shard-000000\.tar: " + match) as e:
        build(tmp_path, [s])
    assert "\n" not in str(e.value)


def test_writer_refuses_stale_shards(tmp_path):
    build(tmp_path, scenes.make_samples(2, 0))
    with pytest.raises(ShardError, match="already holds shard-000000.tar"):
        build(tmp_path, scenes.make_samples(1, 0))
    out = build(tmp_path, scenes.make_samples(1, 0), overwrite=True)
    assert shards.read_manifest(out)["total"] == 1


# --- bad shards: raise with shard + key, or skip and count -----------------------------------

def _truncated(tmp_path):
    out = build(tmp_path, scenes.make_samples(6, 0))
    path = os.path.join(out, "shard-000000.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


BAD_TARS = {
    "truncated": (_truncated, [r"corrupt or truncated tar after sample 'scenes-train-0-\d'"]),
    "garbage": (lambda p: (p / "g.tar").write_bytes(os.urandom(3000)) and str(p / "g.tar"),
                [r"corrupt or truncated tar before its first good sample"]),
    "dotdot": (lambda p: write_tar(p / "e.tar", GOOD + [("../evil.json", record("evil"))]),
               [r"member '\.\./evil\.json': unsafe path"]),
    "absolute": (lambda p: write_tar(p / "a.tar", GOOD + [("/abs.json", record("abs"))]),
                 [r"member '/abs\.json': unsafe path"]),
    "no_prompt": (lambda p: write_tar(p / "n.tar", GOOD + [("bad.json", record(prompt=None))]),
                  [r"sample 'bad': missing field 'prompt'"]),
    "version2": (lambda p: write_tar(p / "v.tar", GOOD + [("bad.json", record(version=2))]),
                 [r"sample 'bad': record version 2 is newer than this mmdistill reads \(version 1\)"]),
    "bad_image": (lambda p: write_tar(p / "i.tar", GOOD + [("bad.json", record(num_images=1)),
                                                           ("bad.img0.png", b"\x89PNG garbage")]),
                  [r"sample 'bad': member 'img0\.png': cannot decode image"]),
    "count_mismatch": (lambda p: write_tar(p / "c.tar", GOOD + [("bad.json", record(num_images=2)),
                                                                ("bad.img0.png", png_bytes())]),
                       [r"sample 'bad': record says 2 images but the shard holds 1 \(img0\.png\)"]),
    "bad_json": (lambda p: write_tar(p / "j.tar", GOOD + [("bad.json", b"{not json")]),
                 [r"sample 'bad': record is not valid JSON"]),
    "duplicate": (lambda p: write_tar(p / "d.tar", GOOD + [("bad.json", record()), ("x.json", record("x")),
                                                          ("bad.json", record())]),
                  [r"sample 'bad': duplicate key"]),
    "empty": (lambda p: write_tar(p / "empty.tar", []), [r"has no samples"]),
    # hostile members: each must be that sample's one-line error (skippable), never an exception of its own
    "deep_json": (lambda p: write_tar(p / "deep.tar", GOOD + [("bad.json", b"[" * 100_000 + b"]" * 100_000)]),
                  [r"sample 'bad': record is not usable JSON \(nested too deeply to parse\)"]),
    "huge_int": (lambda p: write_tar(p / "int.tar", GOOD + [("bad.json", raw_record(b"9" * 5000))]),
                 [r"sample 'bad': record is not usable JSON \(Exceeds the limit \(4300 digits\)"]),
    "too_deep": (lambda p: write_tar(p / "deep100.tar", GOOD + [("bad.json", record(extra=nested(100)))]),
                 [r"sample 'bad': 'extra'(\[0\])+ is nested more than 64 levels deep"]),
    "nan": (lambda p: write_tar(p / "nan.tar", GOOD + [("bad.json", raw_record(b"NaN"))]),
            [r"sample 'bad': 'answer' is nan; numbers must be finite"]),
    "surrogate_prompt": (lambda p: write_tar(p / "sur.tar", GOOD + [("bad.json", record(prompt="\ud800 hi"))]),
                         [r"sample 'bad': 'prompt' is not valid text: '\\ud800' at character 0 is a lone surrogate"]),
    "surrogate_message": (lambda p: write_tar(p / "surm.tar", GOOD + [("bad.json", record(
        prompt=None, messages=[{"role": "user", "content": [{"type": "text", "text": "ok \udfff"}]}]))]),
                          [r"sample 'bad': 'messages'\[0\]\['content'\]\[0\]\['text'\] is not valid text"]),
    "surrogate_key": (lambda p: write_tar(p / "surk.tar", GOOD + [("bad.json", record(extra={"\ud83d": 1}))]),
                      [r"sample 'bad': key 'extra'\['\\ud83d'\] is not valid text"]),
    "huge_image": (lambda p: write_tar(p / "big.tar", GOOD + [("bad.json", record(num_images=1)),
                                                             ("bad.img0.png", huge_png())]),
                   [r"sample 'bad': member 'img0\.png': image of 12000x12000 = 144,000,000 pixels is larger than "
                    r"the cap of 64,000,000 pixels \(data\.max_image_pixels\); refused before decoding"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_shard_raises_naming_shard_and_sample(tmp_path, case):
    make, patterns = BAD_TARS[case]
    path = make(tmp_path)
    with pytest.raises(ShardError) as e:
        list(iter_shard(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for pat in patterns:
        assert re.search(pat, msg), msg


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_shard_skipped_and_counted(tmp_path, case):
    make, patterns = BAD_TARS[case]
    path = make(tmp_path)
    stats = {}
    got = list(iter_shard(path, on_bad="skip", stats=stats))
    assert stats["bad"] == 1 and len(stats["errors"]) == 1, stats
    assert stats["errors"][0].startswith(f"{path}: ")
    assert stats["samples"] == len(got)
    if case not in ("truncated", "garbage", "empty"):
        assert "good" in [g["id"] for g in got]
    if case == "truncated":
        assert 0 < len(got) < 6


def test_skip_counts_across_shards(tmp_path):
    a = write_tar(tmp_path / "a.tar", GOOD + [("bad.json", record(prompt=None))])
    b = write_tar(tmp_path / "b.tar", [("ok.json", record("ok"))])
    stats = {}
    got = list(shards.iter_samples([a, b], on_bad="skip", stats=stats))
    assert [g["id"] for g in got] == ["good", "ok"] and stats["bad"] == 1 and stats["samples"] == 2


def test_missing_extension_and_unknown_members(tmp_path):
    path = write_tar(tmp_path / "m.tar", GOOD + [("bad.json", record()), ("bad.wav", b"x")])
    with pytest.raises(ShardError, match=r"sample 'bad': unexpected member 'wav'"):
        list(iter_shard(path))


def test_manifest_errors(tmp_path):
    out = build(tmp_path, scenes.make_samples(1, 0))
    mpath = os.path.join(out, "manifest.json")
    m = json.load(open(mpath))
    json.dump({**m, "version": 2}, open(mpath, "w"))
    with pytest.raises(ShardError, match=r"manifest\.json: manifest version 2; this mmdistill reads version 1"):
        shards.read_manifest(out)
    json.dump({**m, "shards": [{"name": "../x.tar", "samples": 1, "bytes": 1, "sha256": ""}]}, open(mpath, "w"))
    with pytest.raises(ShardError, match=r"shards\[0\] must be"):
        shards.read_manifest(out)


def test_on_bad_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_bad"):
        list(iter_shard(tmp_path / "x.tar", on_bad="ignore"))


# --- hostile tars: damage that tarfile reads as a short archive --------------------------------

def _text_shard(tmp_path, n: int = 6) -> str:
    out = build(tmp_path, [text_sample(i, id=f"t{i}") for i in range(n)], max_count=100)
    return os.path.join(out, "shard-000000.tar")


def _zero_header(path: str, member: int) -> int:
    """Zero the 512-byte header block of the member-th member, byte by byte; its offset."""
    offset = tar_offsets(path)[member][1]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(512))
    return offset


def test_a_zeroed_header_block_mid_tar_is_an_error_naming_shard_and_offset(tmp_path):
    path = _text_shard(tmp_path)
    offset = _zero_header(path, 3)  # t3's only member: t0-t2 come before it, t4-t5 after
    with pytest.raises(ShardError) as e:
        list(iter_shard(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: corrupt or truncated tar after sample 't2': a zero block at byte {offset} "
                          "is followed by data") and "\n" not in msg
    assert "members of at least 2 more sample(s) ('t4', 't5')" in msg
    stats = {}
    got = [s["id"] for s in iter_shard(path, on_bad="skip", stats=stats)]
    assert got == ["t0", "t1", "t2"]  # what comes before the damage still arrives
    assert stats["bad"] == 2 and stats["lost"] == [2] and len(stats["errors"]) == 1  # t4, t5 counted


def test_concatenated_tars_do_not_hide_the_second(tmp_path):
    """`cat a.tar b.tar`: tarfile stops at a's end-of-archive blocks, so b's samples would vanish."""
    a = _text_shard(tmp_path / "a", 2)
    b = write_tar(tmp_path / "b.tar", [("x.json", record("x")), ("y.json", record("y"))])
    both = tmp_path / "both.tar"
    both.write_bytes(open(a, "rb").read() + open(b, "rb").read())
    stats = {}
    got = [s["id"] for s in iter_shard(both, on_bad="skip", stats=stats)]
    assert got == ["t0", "t1"] and stats["bad"] == 2
    assert "is followed by data" in stats["errors"][0] and "('x', 'y')" in stats["errors"][0]


def test_a_tar_cut_after_its_last_member_keeps_that_sample_and_says_it_is_cut(tmp_path):
    path = _text_shard(tmp_path, 3)
    end = tar_offsets(path)[-1][2]
    with open(path, "r+b") as f:
        f.truncate(end)  # every member whole, no end-of-archive blocks
    stats = {}
    got = [s["id"] for s in iter_shard(path, on_bad="skip", stats=stats)]
    assert got == ["t0", "t1", "t2"] and stats["bad"] == 1
    assert f"cut off at byte {end}: no end-of-archive marker" in stats["errors"][0]


def test_trailing_zeros_after_the_end_marker_are_fine(tmp_path):
    path = _text_shard(tmp_path, 2)
    with open(path, "ab") as f:
        f.write(bytes(4096))  # some tools pad to larger records
    assert [s["id"] for s in iter_shard(path)] == ["t0", "t1"]


def test_a_fifo_is_refused_as_a_shard_and_as_a_manifest(tmp_path):
    """os.mkfifo: opening it would block forever, so it is refused before it is opened."""
    pipe = fifo(tmp_path / "pipe.tar")
    with pytest.raises(ShardError, match=r"pipe\.tar: not a regular file \(a FIFO \(named pipe\)\)"):
        shards.shard_urls(pipe)
    with pytest.raises(ShardError, match=r"cannot open shard: not a regular file \(a FIFO"):
        list(iter_shard(pipe))
    (tmp_path / "ds").mkdir()
    fifo(tmp_path / "ds" / "manifest.json")
    with pytest.raises(ShardError, match=r"manifest\.json: cannot read manifest: not a regular file \(a FIFO"):
        shards.read_manifest(tmp_path / "ds")


def test_image_pixels_cap_is_checked_from_the_header_and_configurable(tmp_path):
    small_cap = {"id": "big", "split": "train", "prompt": "p", "images": [huge_png(300, 200)]}
    with pytest.raises(ShardError, match=r"images\[0\]: image of 300x200 = 60,000 pixels is larger than the cap of "
                                         r"50,000 pixels"):
        encode_sample(small_cap, "w", max_pixels=50_000)
    members = encode_sample(small_cap, "w", max_pixels=60_000)
    with pytest.raises(ShardError, match=r"member 'img0\.png': image of 300x200"):
        decode_sample(members, "r", max_pixels=59_999)
    assert decode_sample(members, "r", max_pixels=60_000)["images"][0].size == (300, 200)
