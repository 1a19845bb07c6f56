"""Seeded procedural scenes: coloured shapes on a plain background, with privileged boxes.

The vision-language counterpart of :mod:`mmdistill.tasks.arith`: small enough for a tiny VLM, and
every answer is exact. A sample is the project's sample record plus ``task``, ``images`` and
``boxes``::

    {"id": "scenes-train-0-3", "split": "train", "domain": "scenes", "task": "count",
     "images": [<PIL RGB 64x64>],
     "prompt": "How many red shapes are there?",
     "boxes": [{"label": "red circle", "box": [4, 10, 17, 23]}, ...],
     "hint": "Look for the red shapes. Count them one by one.",
     "reasoning": "The red shapes are a red circle and a red square.",
     "answer": "2",
     "response": "The red shapes are a red circle and a red square.\nAnswer: 2"}

Question types (answers are one word):

* ``count``: "How many red shapes are there?" / "How many circles are there?" (may be 0; with
  ``min_objects=0`` a count question may show an empty picture).
* ``attribute``: "What colour is the square?" (the only square) / "What shape is the green
  object?" (the only green object).
* ``spatial``: "Is the red circle left or right of the blue square?" or "... above or below ...";
  both objects are the only ones of their colour and shape, and their box centres differ by at
  least half the minimum object size along the asked axis, so the answer is visible.

Boxes are pixel xyxy with exclusive ``x1``/``y1`` (an object covers columns ``x0..x1-1``); the
boxes relevant to the question come first, the rest left to right, so the ``subset`` partial
view (:func:`mmdistill.annotate.partial_boxes`) keeps what matters. Hints name what to look at
and how, never the answer.

Objects are square-boxed, at least ``ceil(image_size / 6)`` px, at most ``image_size // 3``, and
at least ``image_size // 32`` px apart (so two shapes never merge into one blob). Splits are
disjoint by image: each scene is hashed with SHA-256 into one of 10 buckets (``test`` 0, ``val``
1, ``train`` 2..9), so a test image never appears in train under any question. The RNG is seeded
from every argument but ``n``, so a call is deterministic and a shorter call is a prefix of a
longer one. Knobs make out-of-distribution splits (``max_objects``, ``exclude_combos`` /
``only_combos`` for unseen colour-shape pairs) and continual-learning stages
(``question_types``).
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple

from PIL import Image, ImageDraw

from mmdistill.tasks import SPLIT_BUCKETS, bucket_of, keyed_rng, split_of_key
from mmdistill.tasks.arith import extract_answer

DOMAIN = "scenes"
QUESTION_TYPES = ("count", "attribute", "spatial")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (245, 205, 0),
    "purple": (130, 40, 170),
    "orange": (245, 125, 15),
}
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
BACKGROUND = (255, 255, 255)
_P_ABSENT = 0.2  # share of count questions about a colour/shape that is not in the picture
_PLACE_TRIES = 60
_MAX_LAYOUT_FAILS = 50
_MAX_CONSECUTIVE_MISSES = 20000


class _Obj(NamedTuple):
    color: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def size_range(image_size: int) -> tuple[int, int]:
    """(min, max) object side in px: ~1/6 of the image keeps shapes recognisable at 32 px."""
    lo = math.ceil(image_size / 6)
    return lo, max(lo, image_size // 3)


def _gap(image_size: int) -> int:
    return max(1, image_size // 32)


def _scene_key(image_size: int, boxes: list[dict]) -> str:
    parts = sorted(f"{b['label']}@{','.join(str(int(v)) for v in b['box'])}" for b in boxes)
    return f"scenes|{image_size}|{';'.join(parts)}"


def scene_bucket(image_size: int, boxes: list[dict]) -> int:
    """Split bucket of a picture; depends only on what is drawn, so splits never share one."""
    return bucket_of(_scene_key(image_size, boxes))


def split_of(image_size: int, boxes: list[dict]) -> str:
    return split_of_key(_scene_key(image_size, boxes))


def render(boxes: list[dict], image_size: int) -> Image.Image:
    """The picture a list of ``"<color> <shape>"`` boxes describes; each shape fills its box's
    width and height and stays inside it."""
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for b in boxes:
        color, shape = b["label"].split(" ")
        rgb = COLOR_RGB[color]
        x0, y0, x1, y1 = b["box"]
        if shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
        elif shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
        elif shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=rgb)
        else:
            raise ValueError(f"unknown shape {shape!r} in box label {b['label']!r}")
    return im


def _place(rng: random.Random, k: int, image_size: int) -> list[tuple[int, int, int, int]] | None:
    """k square boxes at least a gap apart by sequential rejection; None when one won't fit."""
    lo, hi = size_range(image_size)
    gap = _gap(image_size)
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(k):
        for _ in range(_PLACE_TRIES):
            s = rng.randint(lo, hi)
            x0, y0 = rng.randint(0, image_size - s), rng.randint(0, image_size - s)
            x1, y1 = x0 + s, y0 + s
            if all(x0 >= bx1 + gap or bx0 >= x1 + gap or y0 >= by1 + gap or by0 >= y1 + gap
                   for bx0, by0, bx1, by1 in placed):
                placed.append((x0, y0, x1, y1))
                break
        else:
            return None
    return placed


def _reading_order(objs: list[_Obj]) -> list[_Obj]:
    return sorted(objs, key=lambda o: (o.centre[0], o.centre[1]))


def _a(label: str) -> str:
    return ("an " if label[0] in "aeiou" else "a ") + label


def _listing(objs: list[_Obj]) -> str:
    names = [_a(o.label) for o in objs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# A question maker returns (prompt, hint, reasoning, answer, relevant objects) or None when the
# scene cannot pose that question well-defined.
def _count(rng, objs, colors, shapes, margin):
    by_color = rng.random() < 0.5
    values = colors if by_color else shapes
    present = [v for v in values if any((o.color if by_color else o.shape) == v for o in objs)]
    absent = [v for v in values if v not in present]
    v = rng.choice(absent) if not present or (absent and rng.random() < _P_ABSENT) else rng.choice(present)
    hits = _reading_order([o for o in objs if (o.color if by_color else o.shape) == v])
    what, one = (f"{v} shapes", f"{v} shape") if by_color else (f"{v}s", v)
    if not hits:
        reasoning = f"There are no {what}."
    elif len(hits) == 1:
        reasoning = f"The only {one} is {_a(hits[0].label)}."
    else:
        reasoning = f"The {what} are {_listing(hits)}."
    hint = f"Look for the {what}. Count them one by one."
    return f"How many {what} are there?", hint, reasoning, str(len(hits)), hits


def _attribute(rng, objs, colors, shapes, margin):
    by_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    by_color = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    ask_color = bool(by_shape) and (not by_color or rng.random() < 0.5)
    if ask_color:
        o = rng.choice(by_shape)
        return (f"What colour is the {o.shape}?", f"Find the {o.shape}. Look at its colour.",
                f"The only {o.shape} is {_a(o.label)}.", o.color, [o])
    if not by_color:
        return None
    o = rng.choice(by_color)
    return (f"What shape is the {o.color} object?", f"Find the {o.color} object. Look at its shape.",
            f"The only {o.color} object is {_a(o.label)}.", o.shape, [o])


_AXES = {  # axis -> (centre index, options as asked, answer when first < second, coordinate, hint)
    "x": (0, "left or right of", ("left", "right"), "x", "horizontal"),
    "y": (1, "above or below", ("above", "below"), "y", "vertical"),
}


def _spatial(rng, objs, colors, shapes, margin):
    unique = [o for o in objs if sum(p.label == o.label for p in objs) == 1]
    axes = ["x", "y"] if rng.random() < 0.5 else ["y", "x"]
    for axis in axes:
        i, options, (lo_word, hi_word), coord, direction = _AXES[axis]
        pairs = [(a, b) for a in unique for b in unique
                 if a is not b and abs(a.centre[i] - b.centre[i]) >= margin]
        if not pairs:
            continue
        a, b = rng.choice(pairs)
        ca, cb = a.centre[i], b.centre[i]
        answer = lo_word if ca < cb else hi_word
        relation = f"{answer} of" if axis == "x" else answer
        return (f"Is the {a.label} {options} the {b.label}?",
                f"Find the {a.label} and the {b.label}. Compare their {direction} positions.",
                f"The {a.label} is centred at {coord}={ca:g} and the {b.label} at {coord}={cb:g}, "
                f"so the {a.label} is {relation} the {b.label}.",
                answer, [a, b])
    return None


_MAKERS = {"count": _count, "attribute": _attribute, "spatial": _spatial}
_MIN_OBJECTS = {"count": 0, "attribute": 1, "spatial": 2}


def _names(value, what: str, allowed) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of names, got {value!r}")
    value = tuple(value)
    bad = [v for v in value if v not in allowed]
    if not value or bad:
        raise ValueError(f"{what} must be a non-empty subset of {tuple(allowed)}, got {value!r}")
    return value


def _combos(value, what: str) -> frozenset[tuple[str, str]]:
    if isinstance(value, str):
        raise ValueError(f"{what} must be a list of 'color shape' strings, got the string {value!r}")
    out = set()
    for c in value:
        parts = c.split() if isinstance(c, str) else []
        if len(parts) != 2 or parts[0] not in COLOR_RGB or parts[1] not in SHAPES:
            raise ValueError(f"{what}: {c!r} is not 'color shape' with color in {tuple(COLOR_RGB)} "
                             f"and shape in {SHAPES}")
        out.add((parts[0], parts[1]))
    return frozenset(out)


def _rng(seed, split, image_size, min_objects, max_objects, question_types, colors, shapes,
         exclude, only) -> random.Random:
    fmt = lambda cs: ",".join(sorted(f"{c} {s}" for c, s in cs))  # noqa: E731
    key = (f"scenes|seed={seed}|split={split}|size={image_size}|objects={min_objects}-{max_objects}"
           f"|q={','.join(question_types)}|colors={','.join(colors)}|shapes={','.join(shapes)}"
           f"|exclude={fmt(exclude)}|only={'*' if only is None else fmt(only)}")
    return keyed_rng(key)


def make_samples(
    n: int,
    seed: int,
    split: str = "train",
    *,
    image_size: int = 64,
    min_objects: int = 1,
    max_objects: int = 4,
    question_types=QUESTION_TYPES,
    colors=COLORS,
    shapes=SHAPES,
    exclude_combos=(),
    only_combos=None,
) -> list[dict]:
    """``n`` distinct (image, question) samples of ``split``; deterministic for all arguments.

    Objects draw their colour-shape pair uniformly from ``colors`` x ``shapes``, restricted to
    ``only_combos`` (when given) and without ``exclude_combos``.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BUCKETS)}")
    if n < 0:
        raise ValueError("n must be >= 0")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    question_types = _names(question_types, "question_types", QUESTION_TYPES)
    colors = _names(colors, "colors", COLOR_RGB)
    shapes = _names(shapes, "shapes", SHAPES)
    exclude = _combos(exclude_combos, "exclude_combos")
    only = None if only_combos is None else _combos(only_combos, "only_combos")
    combos = [(c, s) for c in colors for s in shapes
              if (c, s) not in exclude and (only is None or (c, s) in only)]
    if not combos:
        raise ValueError(f"no colour-shape pair left from colors={colors}, shapes={shapes}, "
                         f"exclude_combos={sorted(exclude)}, only_combos={only and sorted(only)}")
    for q in question_types:
        if max_objects < _MIN_OBJECTS[q]:
            raise ValueError(f"question type {q!r} needs max_objects >= {_MIN_OBJECTS[q]}")
    lo, _ = size_range(image_size)
    if max_objects * (lo + _gap(image_size)) ** 2 > (image_size + _gap(image_size)) ** 2:
        raise ValueError(f"{max_objects} objects of at least {lo}px cannot fit in a {image_size}px "
                         "image; lower max_objects or raise image_size")
    used_colors = [c for c in colors if any(c == x for x, _ in combos)]
    used_shapes = [s for s in shapes if any(s == y for _, y in combos)]
    margin = lo / 2

    rng = _rng(seed, split, image_size, min_objects, max_objects, question_types, colors, shapes,
               exclude, only)
    seen: set[tuple[tuple[_Obj, ...], str]] = set()
    out: list[dict] = []
    misses = layout_fails = 0
    while len(out) < n:
        qtype = question_types[rng.randrange(len(question_types))]
        k = rng.randint(max(min_objects, _MIN_OBJECTS[qtype]), max_objects)
        placed = _place(rng, k, image_size)
        if placed is None:
            layout_fails += 1
            if layout_fails > _MAX_LAYOUT_FAILS:
                raise ValueError(f"cannot place {k} non-overlapping objects of at least {lo}px in a "
                                 f"{image_size}px image; lower max_objects or raise image_size")
            continue
        layout_fails = 0
        objs = [_Obj(*combos[rng.randrange(len(combos))], box) for box in placed]
        scene = [{"label": o.label, "box": list(o.box)} for o in objs]
        question = None
        if split_of(image_size, scene) == split:
            question = _MAKERS[qtype](rng, objs, used_colors, used_shapes, margin)
        key = None if question is None else (tuple(sorted(objs)), question[0])
        if question is None or key in seen:
            misses += 1
            if misses > _MAX_CONSECUTIVE_MISSES:
                raise ValueError(f"cannot draw {n} distinct {split} samples with these knobs: the "
                                 f"pool holds about {len(out)}")
            continue
        misses = 0
        seen.add(key)
        prompt, hint, reasoning, answer, relevant = question
        ordered = relevant + _reading_order([o for o in objs if all(o is not r for r in relevant)])
        boxes = [{"label": o.label, "box": list(o.box)} for o in ordered]
        out.append({
            "id": f"scenes-{split}-{seed}-{len(out)}",
            "split": split,
            "domain": DOMAIN,
            "task": qtype,
            "images": [render(boxes, image_size)],
            "prompt": prompt,
            "boxes": boxes,
            "hint": hint,
            "reasoning": reasoning,
            "answer": answer,
            "response": reasoning + "\nAnswer: " + answer,
        })
    return out


def is_correct(text: str, answer: str) -> bool:
    """Whether the extracted answer equals ``answer`` ignoring case, spaces and a final period."""
    got = extract_answer(text)
    norm = lambda s: s.strip().removesuffix(".").rstrip().casefold()  # noqa: E731
    return got is not None and norm(got) == norm(str(answer))
