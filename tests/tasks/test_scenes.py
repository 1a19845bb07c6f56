"""The procedural scenes task: answers recomputed from the boxes, pixels inside boxes, splits."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from mmdistill.data.boxes import boxes_text, check_boxes, draw_boxes, partial_boxes
from mmdistill.tasks.arith import extract_answer
from mmdistill.tasks.scenes import (
    BACKGROUND,
    COLOR_RGB,
    QUESTION_TYPES,
    SHAPES,
    is_correct,
    make_samples,
    render,
    size_range,
    split_of,
)

KEYS = {"id", "split", "domain", "task", "images", "prompt", "boxes", "hint", "reasoning", "answer",
        "response"}
COUNT_COLOR = re.compile(r"^How many (\w+) shapes are there\?$")
COUNT_SHAPE = re.compile(r"^How many (\w+)s are there\?$")
WHAT_COLOR = re.compile(r"^What colour is the (\w+)\?$")
WHAT_SHAPE = re.compile(r"^What shape is the (\w+) object\?$")
SPATIAL = re.compile(r"^Is the (\w+ \w+) (left or right of|above or below) the (\w+ \w+)\?$")


def centre(box, axis):
    return (box[axis] + box[axis + 2]) / 2


def recompute(sample) -> str:
    """The answer from the prompt and the boxes alone."""
    boxes, p = sample["boxes"], sample["prompt"]
    colors = [b["label"].split()[0] for b in boxes]
    shapes = [b["label"].split()[1] for b in boxes]
    if m := COUNT_COLOR.match(p):
        assert sample["task"] == "count"
        return str(colors.count(m.group(1)))
    if m := COUNT_SHAPE.match(p):
        assert sample["task"] == "count" and m.group(1) in SHAPES
        return str(shapes.count(m.group(1)))
    if m := WHAT_COLOR.match(p):
        assert sample["task"] == "attribute" and shapes.count(m.group(1)) == 1
        return colors[shapes.index(m.group(1))]
    if m := WHAT_SHAPE.match(p):
        assert sample["task"] == "attribute" and colors.count(m.group(1)) == 1
        return shapes[colors.index(m.group(1))]
    m = SPATIAL.match(p)
    assert m and sample["task"] == "spatial", p
    labels = [b["label"] for b in boxes]
    a, b = m.group(1), m.group(3)
    assert a != b and labels.count(a) == 1 and labels.count(b) == 1
    axis = 0 if m.group(2).startswith("left") else 1
    ca, cb = centre(boxes[labels.index(a)]["box"], axis), centre(boxes[labels.index(b)]["box"], axis)
    lo, _ = size_range(sample["images"][0].width)
    assert abs(ca - cb) >= lo / 2, "spatial question too close to call"
    words = ("left", "right") if axis == 0 else ("above", "below")
    return words[0] if ca < cb else words[1]


def check_sample(s, split, seed, i, image_size=64):
    assert set(s) == KEYS
    assert s["id"] == f"scenes-{split}-{seed}-{i}"
    assert s["split"] == split and s["domain"] == "scenes" and s["task"] in QUESTION_TYPES
    assert len(s["images"]) == 1
    im = s["images"][0]
    assert im.mode == "RGB" and im.size == (image_size, image_size)
    assert s["answer"] == recompute(s)
    assert s["response"] == s["reasoning"] + "\nAnswer: " + s["answer"]
    assert is_correct(s["response"], s["answer"]) and extract_answer(s["response"]) == s["answer"]
    assert s["hint"] and s["reasoning"] and "\n" not in s["hint"] + s["reasoning"]
    assert not re.search(rf"\b{re.escape(s['answer'])}\b", s["hint"], re.IGNORECASE), s
    assert not re.search(r"\d|Answer", s["hint"])
    assert len(check_boxes(s["boxes"], [im.size], s["id"])) == len(s["boxes"])  # inside, well formed


def test_samples_are_correct_and_well_formed():
    for split in ("train", "test", "val"):
        for i, s in enumerate(make_samples(300, seed=4, split=split)):
            check_sample(s, split, 4, i)


def test_small_images_and_many_objects():
    for i, s in enumerate(make_samples(100, seed=1, image_size=32, max_objects=3)):
        check_sample(s, "train", 1, i, image_size=32)
    many = make_samples(100, seed=1, min_objects=6, max_objects=7)
    assert {len(s["boxes"]) for s in many} == {6, 7}
    for i, s in enumerate(many):
        check_sample(s, "train", 1, i)


def test_empty_scenes_only_for_counting():
    s = make_samples(200, seed=1, min_objects=0, max_objects=2)
    empty = [x for x in s if not x["boxes"]]
    assert empty and all(x["task"] == "count" and x["answer"] == "0" for x in empty)
    assert {len(x["boxes"]) for x in s} == {0, 1, 2}
    for i, x in enumerate(s):
        check_sample(x, "train", 1, i)


def test_boxes_disjoint_and_pixels_inside_their_box():
    bg = np.array(BACKGROUND)
    fills = {shape: [] for shape in SHAPES}
    for s in make_samples(200, seed=2, max_objects=5):
        arr = np.asarray(s["images"][0]).astype(int)
        size = arr.shape[0]
        lo, hi = size_range(size)
        claimed = np.zeros(arr.shape[:2], dtype=int)
        for b in s["boxes"]:
            x0, y0, x1, y1 = b["box"]
            assert all(isinstance(v, int) for v in b["box"])
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert lo <= x1 - x0 <= hi and lo <= y1 - y0 <= hi
            claimed[y0:y1, x0:x1] += 1
            color, shape = b["label"].split()
            patch = arr[y0:y1, x0:x1]
            ink = (patch != bg).any(axis=2)
            # inside its box an object is its colour or background, nothing else
            assert (patch[ink] == COLOR_RGB[color]).all()
            fills[shape].append(ink.mean())
            # it reaches all four sides of its box
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
        assert claimed.max() <= 1, "boxes overlap"
        assert not (arr[claimed == 0] != bg).any(), "ink outside every box"
        assert s["images"][0].tobytes() == render(s["boxes"], size).tobytes()
    # the three shapes are told apart by how much of the box they fill
    assert min(fills["square"]) == 1.0
    assert 0.65 < min(fills["circle"]) and max(fills["circle"]) < 0.9
    assert 0.4 < min(fills["triangle"]) and max(fills["triangle"]) < 0.65


def test_deterministic_and_seeded():
    a = make_samples(60, seed=7)
    b = make_samples(60, seed=7)
    assert a == b
    assert [x["images"][0].tobytes() for x in a] == [x["images"][0].tobytes() for x in b]
    assert make_samples(30, seed=7) == a[:30]
    c = make_samples(60, seed=8)
    assert [x["boxes"] for x in a] != [x["boxes"] for x in c]
    # every knob is part of the stream
    assert [x["boxes"] for x in make_samples(60, seed=7, max_objects=5)] != [x["boxes"] for x in a]


def test_splits_disjoint_by_image():
    def images(split, n, seeds=(0, 1)):
        out = {}
        for seed in seeds:
            for s in make_samples(n, seed, split):
                assert split_of(64, s["boxes"]) == split
                out[s["images"][0].tobytes()] = s
        return out

    train, test, val = images("train", 1000), images("test", 300), images("val", 300, seeds=(0,))
    assert not set(train) & set(test) and not set(train) & set(val) and not set(test) & set(val)
    # also for images that only ever show one object, where collisions are likeliest
    one = {"min_objects": 1, "max_objects": 1, "image_size": 16, "colors": ("red",),
           "shapes": ("square",), "question_types": ("count",)}
    tr = {s["images"][0].tobytes() for s in make_samples(20, 0, "train", **one)}
    te = {s["images"][0].tobytes() for s in make_samples(3, 0, "test", **one)}
    assert tr and te and not tr & te


def test_distinct_within_call_and_pool_exhaustion():
    s = make_samples(500, seed=3)
    keys = [(x["images"][0].tobytes(), x["prompt"]) for x in s]
    assert len(set(keys)) == len(keys)
    tiny = {"min_objects": 1, "max_objects": 1, "image_size": 16, "colors": ("red",),
            "shapes": ("square",), "question_types": ("count",)}
    with pytest.raises(ValueError, match="distinct test samples"):
        make_samples(200, 0, "test", **tiny)


def test_combos_honoured():
    excluded = {"red circle", "blue square"}
    s = make_samples(400, seed=5, exclude_combos=sorted(excluded))
    labels = {b["label"] for x in s for b in x["boxes"]}
    assert not labels & excluded and len(labels) == 10
    only = {"red circle", "blue square", "green triangle"}
    s = make_samples(300, seed=5, split="test", only_combos=only)
    assert {b["label"] for x in s for b in x["boxes"]} == only
    for x in s:  # questions only ask about colours and shapes that exist in this split
        if m := COUNT_COLOR.match(x["prompt"]) or COUNT_SHAPE.match(x["prompt"]):
            assert m.group(1) in {"red", "blue", "green", "circle", "square", "triangle"}
        assert x["answer"] == recompute(x)
    s = make_samples(100, seed=5, colors=("purple", "orange"), shapes=("triangle",))
    assert {b["label"] for x in s for b in x["boxes"]} == {"purple triangle", "orange triangle"}


def test_question_types_honoured():
    for qt in (("count",), ("attribute",), ("spatial",), ("count", "spatial")):
        s = make_samples(150, seed=6, question_types=qt)
        assert {x["task"] for x in s} == set(qt)
    s = make_samples(600, seed=6)
    assert {x["task"] for x in s} == set(QUESTION_TYPES)
    prompts = {x["prompt"].split()[0] + x["prompt"].split()[1] for x in s}
    assert {"Howmany", "Whatcolour", "Whatshape", "Isthe"} <= prompts
    answers = {x["answer"] for x in s if x["task"] == "spatial"}
    assert answers == {"left", "right", "above", "below"}


def test_privileged_boxes_render():
    """The sample boxes go through annotate as they are; the relevant boxes come first."""
    for s in make_samples(50, seed=9):
        im, boxes = s["images"][0], s["boxes"]
        text = boxes_text(boxes, [im.size])
        assert text.count("[") == len(boxes)
        if s["task"] == "spatial":
            m = SPATIAL.match(s["prompt"])
            assert [b["label"] for b in boxes[:2]] == [m.group(1), m.group(3)]
        if s["task"] == "attribute":
            assert s["answer"] in boxes[0]["label"].split()
        drawn = draw_boxes(im, partial_boxes(boxes, "subset", 0.5))
        assert drawn.tobytes() != im.tobytes() and drawn.size == im.size


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "dev"}, "unknown split"),
    ({"question_types": ("count", "colour")}, "question_types"),
    ({"question_types": ()}, "question_types"),
    ({"colors": ("red", "pink")}, "colors"),
    ({"colors": "red"}, "colors"),
    ({"shapes": ("hexagon",)}, "shapes"),
    ({"exclude_combos": "red circle"}, "exclude_combos"),
    ({"exclude_combos": ("redcircle",)}, "exclude_combos"),
    ({"only_combos": ("red hexagon",)}, "only_combos"),
    ({"only_combos": ()}, "no colour-shape pair"),
    ({"colors": ("red",), "shapes": ("circle",), "exclude_combos": ("red circle",)}, "no colour-shape pair"),
    ({"max_objects": 1}, "spatial"),
    ({"max_objects": 40}, "cannot fit"),
    ({"min_objects": 10, "max_objects": 10}, "cannot place"),
    ({"image_size": 8}, "image_size"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects"),
    ({"min_objects": -1}, "min_objects"),
    ({"min_objects": 0, "max_objects": 0, "question_types": ("count", "attribute")},
     "'attribute' needs max_objects >= 1"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        make_samples(5, 0, **kwargs)
    assert "\n" not in str(e.value)
    assert make_samples(0, 0) == []


def test_is_correct():
    assert is_correct("The only square is a blue square.\nAnswer: blue", "blue")
    assert is_correct("...\nAnswer: Blue.", "blue")
    assert is_correct("Answer:  LEFT \nmore", "left")
    assert is_correct("Answer: 2", "2")
    assert not is_correct("Answer: 2\nAnswer: 3", "2")
    assert not is_correct("blue", "blue")
    assert not is_correct("Answer: blue square", "blue")
    assert not is_correct("Answer:", "")


def test_fast():
    t = time.perf_counter()
    make_samples(1000, seed=0)
    assert time.perf_counter() - t < 1.0
