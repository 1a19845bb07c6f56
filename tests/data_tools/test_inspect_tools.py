"""`python -m data_tools validate / inspect / stats` on real shard directories: exit codes, what
they print, and the PNGs inspect writes."""
from __future__ import annotations

import io
import json
import os
import tarfile

from PIL import Image

from data_tools.cli import main
from mmdistill.data import shards
from mmdistill.tasks import scenes


def dataset(tmp_path, name="ds", max_count=3) -> str:
    items = scenes.make_samples(4, 0, "train") + scenes.make_samples(2, 0, "val")
    items[-1] = {**items[-1], "teacher_images": [scenes.render(items[-1]["boxes"], 64)], "stage": 1}
    items.append({"id": "chat-0", "split": "val", "domain": "chat", "stage": 1,
                  "messages": [{"role": "user", "content": "hello"}], "response": "hi there"})
    out = str(tmp_path / name)
    with shards.ShardWriter(out, max_count=max_count, meta={"seed": 0}) as w:
        for s in items:
            w.write(s)
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_validate_ok(tmp_path, capsys):
    out = dataset(tmp_path)
    rc, text, _ = run(capsys, "validate", out)
    assert rc == 0, text
    assert "checked 7 samples in 3 shard(s)" in text
    assert "split:  train=4, val=3" in text and "stage:  0=5, 1=2" in text
    assert "domain: chat=1, scenes=6" in text and text.rstrip().endswith("OK")
    # the other spellings of the same shards
    for spec in (os.path.join(out, "manifest.json"), os.path.join(out, "shard-{000000..000002}.tar")):
        assert run(capsys, "validate", spec)[0] == 0


def test_validate_reports_bad_samples_and_exits_1(tmp_path, capsys):
    out = dataset(tmp_path)
    bad = str(tmp_path / "bad.tar")
    with tarfile.open(bad, "w") as t:
        rec = json.dumps({"schema": shards.SCHEMA, "version": 1, "id": "q1", "split": "train",
                          "num_images": 0, "num_teacher_images": 0}).encode()
        ti = tarfile.TarInfo("q1.json")
        ti.size = len(rec)
        t.addfile(ti, io.BytesIO(rec))
    rc, text, _ = run(capsys, "validate", out, bad)
    assert rc == 1
    assert f"BAD {bad}: sample 'q1': missing field 'prompt'" in text
    assert "checked 7 samples in 4 shard(s)" in text and "1 problem(s)" in text


def test_validate_truncated_shard(tmp_path, capsys):
    out = dataset(tmp_path)
    path = os.path.join(out, "shard-000001.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    rc, text, _ = run(capsys, "validate", out)
    assert rc == 1
    assert f"BAD {path}: corrupt or truncated tar" in text
    assert "size" in text and "sha256 differs" in text  # the manifest no longer matches either
    assert "split counts" not in text  # consequences of the bad shard are not reported twice


def test_validate_manifest_disagreements(tmp_path, capsys):
    out = dataset(tmp_path)
    mpath = os.path.join(out, "manifest.json")
    m = json.load(open(mpath))
    m["counts"]["split"]["ood"] = 2
    m["shards"][0]["sha256"] = "0" * 64
    json.dump(m, open(mpath, "w"))
    rc, text, _ = run(capsys, "validate", out)
    assert rc == 1
    assert "split 'ood' is listed (count 2) but has no samples" in text
    assert "shard-000000.tar: sha256 differs" in text and "split counts" in text


def test_validate_missing_and_duplicate(tmp_path, capsys):
    out = dataset(tmp_path)
    rc, text, _ = run(capsys, "validate", str(tmp_path / "nope.tar"))
    assert rc == 1 and "nope.tar: no such shard file" in text
    tar = os.path.join(out, "shard-000000.tar")
    rc, text, _ = run(capsys, "validate", out, tar)
    assert rc == 1 and "duplicate id 'scenes-train-0-0'" in text


def test_inspect_prints_and_writes_pngs(tmp_path, capsys):
    out = dataset(tmp_path, max_count=10)
    first = shards.iter_samples(out).__next__()
    pngs = tmp_path / "png"
    rc, text, _ = run(capsys, "inspect", out, "--n", "6", "--out", str(pngs))
    assert rc == 0
    assert text.count("sample '") == 6 and "  prompt: " in text and "  images: 1 (64x64)" in text
    assert f"box: {first['boxes'][0]['label']!r}" in text and "teacher_images: 1 (64x64)" in text
    drawn = Image.open(pngs / "scenes-train-0-0.img0.png").convert("RGB")
    assert drawn.size == (64, 64) and drawn.tobytes() != first["images"][0].tobytes()  # boxes drawn
    assert (pngs / "scenes-val-0-1.timg0.png").exists()
    assert "wrote 7 image(s)" in text
    rc, text, _ = run(capsys, "inspect", out)
    assert rc == 0 and text.count("sample '") == 3


def test_inspect_bad_shard_one_line_error(tmp_path, capsys):
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"\x00garbage" * 100)
    rc, text, err = run(capsys, "inspect", str(garbage))
    assert rc == 1 and err.startswith(f"error: {garbage}: ") and err.count("\n") == 1


def test_stats(tmp_path, capsys):
    out = dataset(tmp_path)
    rc, text, _ = run(capsys, "stats", out)
    assert rc == 0
    assert text.startswith("7 samples in 3 shard(s)")
    assert "task:   (none)=1," in text and "images per sample: 0=1, 1=6" in text
    rc, text, _ = run(capsys, "stats", out, "--json")
    report = json.loads(text)
    items = list(shards.iter_samples(out))
    prompts = [len(s.get("prompt", "hello")) for s in items]
    assert report["mean_prompt_chars"] == sum(prompts) / len(prompts)
    assert report["counts"]["split"] == {"train": 4, "val": 3}
    assert report["teacher_images_per_sample"] == {"0": 6, "1": 1}
    assert report["shards"] == 3 and report["bytes"] == sum(os.path.getsize(u) for u in shards.shard_urls(out))


def test_mmdistill_data_forwards(tmp_path, capsys):
    from mmdistill.cli import main as mm_main

    out = dataset(tmp_path)
    assert mm_main(["data", "validate", out]) == 0
    assert "checked 7 samples" in capsys.readouterr().out


# --- hostile shards: validate reports them as problems, never OK, never a traceback ---------------

def _one_tar(tmp_path, members) -> str:
    path = str(tmp_path / "one.tar")
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def _record(key: str, **fields) -> bytes:
    return json.dumps({"schema": shards.SCHEMA, "version": 1, "id": key, "split": "train", "prompt": "p",
                       "num_images": 0, "num_teacher_images": 0, **fields}).encode()


def test_validate_a_single_tar_with_a_zeroed_header_block_is_not_ok(tmp_path, capsys):
    """Without its manifest: the tar alone must show the damage (it used to say OK, 3 samples)."""
    path = _one_tar(tmp_path, [(f"q{i}.json", _record(f"q{i}")) for i in range(6)])
    offset = 3 * 1024  # q3's header: each member is one header block and one data block
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(512))
    rc, text, _ = run(capsys, "validate", path)
    assert rc == 1 and "checked 3 samples in 1 shard(s)" in text and not text.rstrip().endswith("OK")
    assert (f"BAD {path}: corrupt or truncated tar after sample 'q2': a zero block at byte {offset} is followed by "
            "data at byte 3584") in text and "('q4', 'q5')" in text


def test_validate_hostile_json_members_are_problems_not_tracebacks(tmp_path, capsys):
    path = _one_tar(tmp_path, [("ok.json", _record("ok")), ("deep.json", b"[" * 100_000 + b"]" * 100_000),
                               ("int.json", _record("int").replace(b'"p"', b'"p", "answer": ' + b"5" * 5000)),
                               ("sur.json", _record("sur", prompt="\ud800"))])
    rc, text, err = run(capsys, "validate", path)
    assert rc == 1 and err == "" and "checked 1 samples" in text and "3 problem(s)" in text
    assert f"BAD {path}: sample 'deep': record is not usable JSON (nested too deeply to parse)" in text
    assert f"BAD {path}: sample 'int': record is not usable JSON (Exceeds the limit (4300 digits)" in text
    assert f"BAD {path}: sample 'sur': 'prompt' is not valid text: '\\ud800' at character 0" in text


def test_validate_an_empty_manifest_says_what_is_wrong(tmp_path, capsys):
    shards.ShardWriter(tmp_path / "empty").close()
    rc, text, _ = run(capsys, "validate", str(tmp_path / "empty"))
    assert rc == 1 and "the manifest lists no shards (0 samples): the dataset is empty" in text


def test_validate_caps_image_pixels(tmp_path, capsys):
    out = dataset(tmp_path)  # 64 x 64 scenes
    rc, text, _ = run(capsys, "validate", out, "--max-image-pixels", str(64 * 64 - 1))
    assert rc == 1 and "image of 64x64 = 4,096 pixels is larger than the cap of 4,095 pixels" in text
    assert run(capsys, "validate", out, "--max-image-pixels", str(64 * 64))[0] == 0
