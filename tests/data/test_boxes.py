"""Image privileged information: decoding errors, box checks, box text, drawing, partial views."""
from __future__ import annotations

import io
import math
import random
import re
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from mmdistill.data.boxes import (
    MAX_IMAGE_PIXELS,
    PARTIAL_MODES,
    boxes_text,
    check_boxes,
    draw_boxes,
    image_size,
    load_image,
    normalised,
    partial_boxes,
)
from tests.helpers import fifo, huge_png

WHERE = "sample 'scenes-train-3' images[0]"


def png_bytes(size=(48, 32), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    chans = {"RGB": 3, "RGBA": 4}[mode]
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], chans), dtype=np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def grey(size=(64, 64), value=128) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


# --- load_image ------------------------------------------------------------------------------

def test_load_image_accepts_every_form(tmp_path):
    data = png_bytes()
    ref = Image.open(io.BytesIO(data)).convert("RGB")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for obj in (data, bytearray(data), path, str(path), {"bytes": data}, {"path": str(path)},
                {"bytes": None, "path": path}, ref):
        im = load_image(obj, WHERE)
        assert im.mode == "RGB" and im.size == (48, 32)
        assert im.tobytes() == ref.tobytes()
    assert load_image(ref, WHERE) is not ref


def test_load_image_converts_to_rgb_without_touching_input():
    rgba = Image.open(io.BytesIO(png_bytes(mode="RGBA")))
    rgba.load()
    before = rgba.tobytes()
    im = load_image(rgba, WHERE)
    assert im.mode == "RGB" and rgba.mode == "RGBA" and rgba.tobytes() == before
    assert load_image(grey().convert("L"), WHERE).mode == "RGB"


def _assert_decode_error(obj):
    with pytest.raises(ValueError) as e:
        load_image(obj, WHERE)
    msg = str(e.value)
    assert msg.startswith(f"{WHERE}: cannot decode image"), msg
    assert "\n" not in msg


def test_load_image_errors_name_where(tmp_path):
    data = png_bytes()
    truncated = data[: len(data) // 2]
    # truncation is only caught by a full decode: the header still opens lazily
    Image.open(io.BytesIO(truncated))
    cut = tmp_path / "cut.png"
    cut.write_bytes(truncated)
    for obj in (b"not an image", b"", truncated, {"bytes": truncated}, cut, str(cut),
                tmp_path / "missing.png", {"path": str(tmp_path / "missing.png")}, {}, {"bytes": None},
                12, None):
        _assert_decode_error(obj)
    lazy = Image.open(io.BytesIO(truncated))
    _assert_decode_error(lazy)


def test_a_huge_image_small_on_disk_is_refused_from_its_header(tmp_path):
    """12000 x 12000 in 18 KB of PNG: decoded as RGB it would take 432 MB; the cap is read from the header."""
    data = huge_png()
    assert len(data) < 50_000 and MAX_IMAGE_PIXELS < 12000 * 12000
    (tmp_path / "big.png").write_bytes(data)
    for obj in (data, {"bytes": data}, tmp_path / "big.png", str(tmp_path / "big.png")):
        with pytest.raises(ValueError) as e:
            load_image(obj, WHERE)
        assert str(e.value) == (f"{WHERE}: image of 12000x12000 = 144,000,000 pixels is larger than the cap of "
                                "64,000,000 pixels (data.max_image_pixels); refused before decoding")
    with pytest.raises(ValueError, match="larger than the cap"):
        image_size(tmp_path / "big.png", WHERE)
    assert image_size(tmp_path / "big.png", WHERE, max_pixels=None) == (12000, 12000)
    small = huge_png(40, 30)
    assert load_image(small, WHERE, max_pixels=1200).size == (40, 30)
    with pytest.raises(ValueError, match=r"image of 40x30 = 1,200 pixels is larger than the cap of 1,199 pixels"):
        load_image(small, WHERE, max_pixels=1199)
    with pytest.raises(ValueError, match="larger than the cap of 1,199 pixels"):  # a decoded image is held to it too
        load_image(Image.new("RGB", (40, 30)), WHERE, max_pixels=1199)


def test_an_image_path_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    pipe = fifo(tmp_path / "pipe.png")
    for call in (lambda: load_image(pipe, WHERE), lambda: image_size(pipe, WHERE)):
        with pytest.raises(ValueError, match=rf"{re.escape(WHERE)}: cannot read image file '.*pipe\.png': "
                                             r"not a regular file \(a FIFO \(named pipe\)\)"):
            call()
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match=r"not a regular file \(a directory\)"):
        load_image(tmp_path / "dir.png", WHERE)


# --- check_boxes / normalised ----------------------------------------------------------------

def test_check_boxes_returns_clean_copies():
    boxes = [{"label": "red circle", "box": [1, 2, 30, 40]},
             {"label": "", "box": [0.0, 0.0, 64.6, 64], "image": 1, "score": 0.9}]
    got = check_boxes(boxes, [(64, 64), (64, 64)], WHERE)
    assert got == [{"label": "red circle", "box": [1.0, 2.0, 30.0, 40.0], "image": 0},
                   {"label": "", "box": [0.0, 0.0, 64.0, 64.0], "image": 1, "score": 0.9}]
    assert boxes[1]["box"] == [0.0, 0.0, 64.6, 64] and "image" not in boxes[0]
    assert check_boxes([], [(10, 10)], WHERE) == []
    # a degenerate (zero-area) box is allowed
    assert check_boxes([{"label": "x", "box": [5, 5, 5, 5]}], [(10, 10)], WHERE)[0]["box"] == [5.0] * 4


GOOD = {"label": "ok", "box": [0, 0, 10, 10]}


@pytest.mark.parametrize("bad", [
    "red circle",
    {"box": [0, 0, 5, 5]},
    {"label": 3, "box": [0, 0, 5, 5]},
    {"label": "a"},
    {"label": "a", "box": [0, 0, 5]},
    {"label": "a", "box": [0, 0, 5, 5, 5]},
    {"label": "a", "box": "0 0 5 5"},
    {"label": "a", "box": [0, 0, "5", 5]},
    {"label": "a", "box": [0, 0, True, 5]},
    {"label": "a", "box": [0, 0, float("nan"), 5]},
    {"label": "a", "box": [0, 0, float("inf"), 5]},
    {"label": "a", "box": [6, 0, 5, 5]},
    {"label": "a", "box": [0, 6, 5, 5]},
    {"label": "a", "box": [0, 0, 70, 5]},
    {"label": "a", "box": [0, 0, 5, 66.5]},
    {"label": "a", "box": [-3, 0, 5, 5]},
    {"label": "a", "box": [0, 0, 5, 5], "image": 1},
    {"label": "a", "box": [0, 0, 5, 5], "image": -1},
    {"label": "a", "box": [0, 0, 5, 5], "image": "0"},
])
def test_check_boxes_errors_name_where_and_index(bad):
    with pytest.raises(ValueError) as e:
        check_boxes([GOOD, bad], [(64, 64)], WHERE)
    msg = str(e.value)
    assert msg.startswith(f"{WHERE} boxes[1]: ") and "\n" not in msg, msg


def test_check_boxes_where_ending_in_boxes_is_not_repeated():
    with pytest.raises(ValueError, match=r"^sample 'x' boxes\[0\]: 'label'"):
        check_boxes([{"box": [0, 0, 1, 1]}], [(4, 4)], "sample 'x' boxes")


def test_check_boxes_not_a_list():
    with pytest.raises(ValueError, match=re.escape(WHERE)):
        check_boxes(GOOD, [(64, 64)], WHERE)


def test_normalised():
    assert normalised([10, 5, 30, 25], (40, 50)) == [0.25, 0.1, 0.75, 0.5]
    assert normalised({"label": "x", "box": [0, 0, 40, 50]}, (40, 50)) == [0.0, 0.0, 1.0, 1.0]


# --- boxes_text ------------------------------------------------------------------------------

def test_boxes_text_hand_computed():
    sizes = [(100, 50)]
    boxes = [{"label": "red circle", "box": [12, 15, 25, 22.5]},
             {"label": "blue square", "box": [50, 5, 70, 16.5]}]
    assert boxes_text(boxes, sizes) == "red circle [0.12, 0.30, 0.25, 0.45]; blue square [0.50, 0.10, 0.70, 0.33]"
    assert boxes_text(boxes, sizes, labels=False) == "[0.12, 0.30, 0.25, 0.45]; [0.50, 0.10, 0.70, 0.33]"
    assert boxes_text(boxes[:1], sizes, digits=3) == "red circle [0.120, 0.300, 0.250, 0.450]"
    assert boxes_text(boxes[:1], sizes, digits=0) == "red circle [0, 0, 0, 0]"
    assert boxes_text([], sizes) == ""
    assert boxes_text([{"label": "", "box": [0, 0, 100, 50]}], sizes) == "[0.00, 0.00, 1.00, 1.00]"


def test_boxes_text_several_images_are_numbered_from_one():
    sizes = [(100, 50), (200, 100)]
    boxes = [{"label": "cat", "box": [20, 10, 40, 30], "image": 1},
             {"label": "dog", "box": [0, 0, 50, 25]}]
    assert boxes_text(boxes, sizes) == "image 2: cat [0.10, 0.10, 0.20, 0.30]; image 1: dog [0.00, 0.00, 0.50, 0.50]"


def test_boxes_text_numbers_round_trip():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [(rng.randint(1, 500), rng.randint(1, 500)) for _ in range(rng.randint(1, 3))]
        boxes = []
        for _ in range(rng.randint(0, 5)):
            i = rng.randrange(len(sizes))
            w, h = sizes[i]
            x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
            y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
            boxes.append({"label": f"obj{len(boxes)}", "box": [x0, y0, x1, y1], "image": i})
        text = boxes_text(boxes, sizes, digits=3)
        parts = text.split("; ") if text else []
        assert len(parts) == len(boxes)
        for part, b in zip(parts, boxes):
            m = re.fullmatch(r"(?:image (\d+): )?(\w+) \[([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\]", part)
            assert m, part
            assert (m.group(1) is not None) == (len(sizes) > 1)
            if m.group(1):
                assert int(m.group(1)) == b["image"] + 1
            assert m.group(2) == b["label"]
            w, h = sizes[b["image"]]
            want = [b["box"][0] / w, b["box"][1] / h, b["box"][2] / w, b["box"][3] / h]
            got = [float(m.group(k)) for k in range(3, 7)]
            assert all(abs(g - x) <= 0.0005 + 1e-12 for g, x in zip(got, want)), (got, want)


def test_boxes_text_validates():
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        boxes_text([{"label": "a", "box": [0, 0, 500, 5]}], [(64, 64)])


# --- draw_boxes ------------------------------------------------------------------------------

def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (np.asarray(a, dtype=np.int16) != np.asarray(b, dtype=np.int16)).any(axis=2)


def band(shape, box, width) -> np.ndarray:
    """Pixels within one pixel of the drawn outline of ``box``."""
    h, w = shape
    x0, y0, x1, y1 = (round(v) for v in box)
    x1, y1 = min(x1, w - 1), min(y1, h - 1)
    yy, xx = np.mgrid[0:h, 0:w]
    outer = (xx >= x0 - 1) & (xx <= x1 + 1) & (yy >= y0 - 1) & (yy <= y1 + 1)
    inner = (xx > x0 + width) & (xx < x1 - width) & (yy > y0 + width) & (yy < y1 - width)
    return outer & ~inner


BOXES = [{"label": "red circle", "box": [5, 20, 25, 40]},
         {"label": "blue square", "box": [30, 30, 60, 62]},
         {"label": "red circle", "box": [40, 2, 52, 14]}]


@pytest.mark.parametrize("width", [1, 2, 3])
def test_draw_changes_only_outline_neighbourhood(width):
    rng = np.random.default_rng(width)
    base = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    before = base.tobytes()
    out = draw_boxes(base, BOXES, labels=False, width=width)
    assert base.tobytes() == before and out is not base and out.size == base.size
    diff = changed(base, out)
    allowed = np.zeros_like(diff)
    for b in BOXES:
        m = band(diff.shape, b["box"], width)
        allowed |= m
        assert diff[m].sum() > 0
    assert not (diff & ~allowed).any()
    # every outline is drawn: the four corners of each box take its colour
    arr = np.asarray(out)
    for b in BOXES:
        x0, y0, x1, y1 = b["box"]
        x1, y1 = min(x1, 63), min(y1, 63)
        corners = {tuple(arr[y, x]) for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))}
        assert len(corners) == 1


def test_draw_colours_are_per_label_and_deterministic():
    out = draw_boxes(grey(), BOXES, labels=False)
    arr = np.asarray(out)
    c = [tuple(arr[b["box"][1], b["box"][0]]) for b in BOXES]
    assert c[0] == c[2] and c[0] != c[1]
    assert draw_boxes(grey(), BOXES).tobytes() == draw_boxes(grey(), BOXES).tobytes()
    # a subset keeps the colours of the full view
    sub = np.asarray(draw_boxes(grey(), partial_boxes(BOXES, "subset", 0.5), labels=False))
    assert tuple(sub[20, 5]) == c[0] and tuple(sub[30, 30]) == c[1]


def test_draw_labels_stay_near_the_box_top():
    base = grey()
    plain = changed(base, draw_boxes(base, BOXES, labels=False))
    labelled = changed(base, draw_boxes(base, BOXES, labels=True))
    extra = labelled & ~plain
    assert extra.any()
    ys = np.nonzero(extra)[0]
    near = np.zeros_like(extra)
    for b in BOXES:
        near[max(0, b["box"][1] - 16): b["box"][1] + 16, :] = True
    assert near[extra].all() and ys.max() < 64
    # unlabeled boxes draw outlines only, even with labels=True
    unl = changed(base, draw_boxes(base, partial_boxes(BOXES, "unlabeled", 1.0), labels=True))
    assert (unl == plain).all()


def test_draw_without_boxes_is_exact_copy():
    rng = np.random.default_rng(1)
    for mode in ("RGB", "L", "RGBA"):
        base = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB").convert(mode)
        out = draw_boxes(base, [])
        assert out is not base and out.mode == base.mode and out.tobytes() == base.tobytes()


def test_draw_non_rgb_and_image_index():
    out = draw_boxes(grey().convert("L"), BOXES[:1])
    assert out.mode == "RGB"
    boxes = [{**BOXES[0], "image": 1}, BOXES[1]]
    only0 = draw_boxes(grey(), boxes, labels=False, image_index=0)
    assert only0.tobytes() == draw_boxes(grey(), [BOXES[1]], labels=False).tobytes()
    assert draw_boxes(grey(), boxes, image_index=2).tobytes() == grey().tobytes()
    with pytest.raises(ValueError, match=r"draw_boxes boxes\[0\]"):
        draw_boxes(grey(), [{"label": "a", "box": [0, 0, 99, 5]}])
    with pytest.raises(ValueError):
        draw_boxes(grey(), BOXES, width=0)


# --- partial_boxes ---------------------------------------------------------------------------

def test_partial_subset_sizes():
    four = [{"label": str(i), "box": [0, 0, i, i]} for i in range(4)]
    assert partial_boxes(four, "subset", 0.0) == []
    assert partial_boxes(four, "subset", 0.5) == four[:2]
    assert partial_boxes(four, "subset", 1.0) == four
    assert len(partial_boxes(four[:3], "subset", 0.5)) == 2
    for n in range(13):
        boxes = [{"label": str(i), "box": [0, 0, 1, 1]} for i in range(n)]
        for k in range(21):
            got = partial_boxes(boxes, "subset", k / 20)
            assert got == boxes[: math.ceil(Fraction(k, 20) * n)], (n, k)


def test_partial_does_not_modify_input():
    boxes = [{"label": "red circle", "box": [1, 2, 3, 4], "image": 0}]
    for mode in PARTIAL_MODES:
        out = partial_boxes(boxes, mode, 1.0)
        out[0]["box"][0] = 99
        out[0]["label"] = "changed"
    assert boxes == [{"label": "red circle", "box": [1, 2, 3, 4], "image": 0}]


def test_partial_unlabeled():
    out = partial_boxes(BOXES, "unlabeled", 0.3)
    assert [b["box"] for b in out] == [b["box"] for b in BOXES]
    assert all(b["label"] == "" for b in out)
    text = boxes_text(out, [(64, 64)])
    assert not re.search(r"[a-z]", text) and text.count("[") == 3


def test_partial_errors():
    with pytest.raises(ValueError, match="subset.*unlabeled"):
        partial_boxes(BOXES, "random", 0.5)
    for r in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError):
            partial_boxes(BOXES, "subset", r)
