"""Privileged information about images: bounding boxes as text, as drawn annotations, and partial.

A box in a sample is ``{"label": "red circle", "box": [x0, y0, x1, y1], "image": 0}`` in pixel
coordinates (xyxy) of ``sample["images"][image]``; ``image`` is optional and defaults to 0. A
teacher can be given boxes two ways that go through the same views: as text appended to its
prompt (:func:`boxes_text`) or drawn onto its copy of the image (:func:`draw_boxes`).
:func:`partial_boxes` is the image analogue of cutting a hint to a prefix.

Boxes are rendered to the model in normalised coordinates (divided by width/height) so the text
does not depend on the resolution an adapter resizes to. Images are numbered from 1 in text
("image 2" is ``images[1]``), as a person would count them.
"""
from __future__ import annotations

import copy
import functools
import io
import math
import os
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmdistill.data.files import not_regular

PARTIAL_MODES = ("subset", "unlabeled")
# Outline colours, assigned to labels in order of first appearance. None of them is a scene
# colour (pure red/green/blue/yellow) or white, so an outline is never mistaken for an object.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255),   # magenta
    (0, 190, 255),   # sky
    (255, 140, 0),   # orange
    (120, 0, 200),   # violet
    (0, 0, 0),       # black
    (0, 128, 128),   # teal
    (255, 105, 180), # pink
    (128, 64, 0),    # brown
)
_TOL_PX = 1.0  # boxes from detectors / inclusive conventions may poke out by a rounding pixel
_TOL_REL = 0.005
# Decoded pixels an image may have (data.max_image_pixels's default, 8000 x 8000): refused from the
# header, before decoding, above it.
MAX_IMAGE_PIXELS = 64_000_000


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _too_large(size: tuple[int, int], max_pixels: int | None) -> bool:
    return max_pixels is not None and size[0] * size[1] > max_pixels


def _too_large_message(where: str, size: tuple[int, int], max_pixels: int) -> str:
    return (f"{where}: image of {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is larger than the cap of "
            f"{max_pixels:,} pixels (data.max_image_pixels); refused before decoding")


def load_image(obj, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Any image form a sample may carry, fully decoded as RGB, so a corrupt file fails here with
    the sample named instead of deep inside a batch.

    An image with more than ``max_pixels`` pixels (None: no cap) is refused from its header,
    before it is decoded: a few kilobytes of PNG can hold a 12000 x 12000 image that decodes to
    gigabytes. A path must name a regular file (a FIFO would block the read forever)."""
    if isinstance(obj, dict):  # an image struct: its bytes, else its path
        if obj.get("bytes") is not None:
            obj = obj["bytes"]
        elif obj.get("path") is not None:
            obj = obj["path"]
    if isinstance(obj, (str, Path)):
        why = not_regular(obj)
        if why is not None and why != "no such file":  # a missing one fails to open below
            raise ValueError(f"{where}: cannot read image file {os.fspath(obj)!r}: {why}")
    if isinstance(obj, Image.Image) and _too_large(obj.size, max_pixels):
        raise ValueError(_too_large_message(where, obj.size, max_pixels))
    size = None
    try:
        if isinstance(obj, Image.Image):
            obj.load()
            return obj.convert("RGB") if obj.mode != "RGB" else obj.copy()
        if isinstance(obj, dict):
            raise ValueError("dict has neither 'bytes' nor 'path'")
        if isinstance(obj, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(obj))
        elif isinstance(obj, (str, Path)):
            src = obj
        else:
            raise TypeError(f"unsupported type {type(obj).__name__}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(src) as im:  # reads the header only
                if _too_large(im.size, max_pixels):
                    size = im.size
                else:
                    im.load()
                    return im.convert("RGB")
    except Image.DecompressionBombError as e:  # past PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS)
        raise ValueError(f"{where}: image refused before decoding ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - every decoder failure becomes one line naming the sample
        raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {_one_line(e)})") from None
    raise ValueError(_too_large_message(where, size, max_pixels))


def image_size(path, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it: a file that is not
    regular, not an image, or larger than ``max_pixels`` is refused as :func:`load_image` would."""
    why = not_regular(path)
    if why:
        raise ValueError(f"{where}: cannot read image file {os.fspath(path)!r}: {why}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"{where}: image refused before decoding ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {_one_line(e)}"
        raise ValueError(f"{where}: cannot read image {os.fspath(path)!r} ({why})") from None
    if _too_large(size, max_pixels):
        raise ValueError(_too_large_message(where, size, max_pixels))
    return size


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_boxes(boxes, sizes: list[tuple[int, int]], where: str) -> list[dict]:
    """Validated copies (coordinates as floats, clipped to the image, ``image`` filled in), so
    the renderers can trust them; raises a one-line ValueError naming ``where`` and the box."""
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"{where}: boxes must be a list, got {type(boxes).__name__}")
    out = []
    for i, b in enumerate(boxes):
        at = f"{where}[{i}]" if where == "boxes" or where.endswith(" boxes") else f"{where} boxes[{i}]"
        if not isinstance(b, dict):
            raise ValueError(f"{at}: must be a dict with 'label' and 'box', got {type(b).__name__}")
        label = b.get("label")
        if not isinstance(label, str):
            raise ValueError(f"{at}: 'label' must be a string, got {label!r}")
        idx = b.get("image", 0)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(sizes):
            raise ValueError(f"{at}: 'image' must be an index in [0, {len(sizes)}), got {idx!r}")
        xy = b.get("box")
        if not isinstance(xy, (list, tuple)) or len(xy) != 4 or not all(_is_number(v) for v in xy):
            raise ValueError(f"{at}: 'box' must be 4 finite numbers [x0, y0, x1, y1], got {xy!r}")
        x0, y0, x1, y1 = (float(v) for v in xy)
        if x0 > x1 or y0 > y1:
            raise ValueError(f"{at}: 'box' {list(xy)} has x0 > x1 or y0 > y1")
        w, h = sizes[idx]
        tx, ty = max(_TOL_PX, _TOL_REL * w), max(_TOL_PX, _TOL_REL * h)
        if x0 < -tx or y0 < -ty or x1 > w + tx or y1 > h + ty:
            raise ValueError(f"{at}: 'box' {list(xy)} lies outside image {idx} of size {w}x{h}")
        clipped = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
        out.append({**b, "label": label, "box": clipped, "image": idx})
    return out


def normalised(box, size: tuple[int, int]) -> list[float]:
    """``box`` (a box dict or its 4 coordinates) divided by the image's width and height."""
    xy = box["box"] if isinstance(box, dict) else box
    w, h = size
    return [xy[0] / w, xy[1] / h, xy[2] / w, xy[3] / h]


def boxes_text(boxes, sizes: list[tuple[int, int]], digits: int = 2, labels: bool = True) -> str:
    """``"red circle [0.12, 0.30, 0.25, 0.45]; blue square [...]"``; an empty label (the
    unlabeled partial view) prints the coordinates alone."""
    if not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be an int >= 0, got {digits!r}")
    parts = []
    for b in check_boxes(boxes, sizes, "boxes_text"):
        coords = "[" + ", ".join(f"{v:.{digits}f}" for v in normalised(b, sizes[b["image"]])) + "]"
        text = f"{b['label']} {coords}" if labels and b["label"] else coords
        if b["image"] != 0 or len(sizes) > 1:
            text = f"image {b['image'] + 1}: {text}"
        parts.append(text)
    return "; ".join(parts)


def _label_colours(boxes) -> dict[str, tuple[int, int, int]]:
    """First-appearance order, so a subset view keeps the colours of the full view."""
    colours: dict[str, tuple[int, int, int]] = {}
    for b in boxes:
        if b["label"] not in colours:
            colours[b["label"]] = PALETTE[len(colours) % len(PALETTE)]
    return colours


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()  # decodes an embedded font: once per process, not per label


@functools.lru_cache(maxsize=4096)
def _label_box(label: str) -> tuple[int, int, int, int]:
    """The label's text box when drawn at (0, 0) on an RGB image; at (x, y) it is shifted by
    (x, y). Measuring text is most of the time of drawing boxes, and labels repeat."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), label, font=_font())


def draw_boxes(image: Image.Image, boxes, labels: bool = True, width: int = 2, *,
               image_index: int | None = None) -> Image.Image:
    """A new RGB image with the boxes outlined (and labelled); ``image`` is left untouched.

    ``image_index`` draws only the boxes of that image of a multi-image sample; None draws
    every box given. With nothing to draw the result is an exact copy.
    """
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if image_index is not None:
        boxes = [b for b in boxes if isinstance(b, dict) and b.get("image", 0) == image_index]
    boxes = check_boxes([{**b, "image": 0} if isinstance(b, dict) else b for b in boxes],
                        [image.size], "draw_boxes")
    if not boxes:
        return image.copy()
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    colours = _label_colours(boxes)
    rects = []
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        rect = [round(x0), round(y0), min(round(x1), w - 1), min(round(y1), h - 1)]
        rect[2], rect[3] = max(rect[2], rect[0]), max(rect[3], rect[1])
        draw.rectangle(rect, outline=colours[b["label"]], width=width)
        rects.append(rect)
    if labels:
        # after every outline, last box first: the first (most relevant) label ends on top
        font = _font()
        for b, rect in reversed(list(zip(boxes, rects))):
            if not b["label"]:
                continue
            tx0, ty0, tx1, ty1 = _label_box(b["label"])
            th = ty1 - ty0
            # above the box when there is room, else just inside its top edge
            y = rect[1] - th - 2 if rect[1] - th - 2 >= 0 else rect[1] + width
            x = min(rect[0], max(0, w - (tx1 - tx0) - 2))
            colour = colours[b["label"]]
            draw.rectangle([x + tx0 - 1, y + ty0 - 1, x + tx1, y + ty1], fill=colour)
            ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
            draw.text((x, y), b["label"], fill=ink, font=font)
    return out


def partial_boxes(boxes, mode: str, ratio: float) -> list[dict]:
    """Part of the boxes for the partial privileged view: ``"subset"`` keeps the first
    ceil(ratio * n) (samples list the relevant boxes first); ``"unlabeled"`` keeps every box
    but blanks its label, so the teacher learns where but not what. Input is not modified."""
    if mode not in PARTIAL_MODES:
        raise ValueError(f"unknown partial mode {mode!r}; expected one of {PARTIAL_MODES}")
    if not _is_number(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"partial ratio must be in [0, 1], got {ratio!r}")
    if mode == "subset":
        k = min(len(boxes), math.ceil(ratio * len(boxes) - 1e-9))
        return [copy.deepcopy(b) for b in boxes[:k]]
    return [{**copy.deepcopy(b), "label": ""} for b in boxes]
