"""Vision-language adapter: any VLM with a processor behind the same token-level views.

Hugging Face native VLMs (LLaVA, Qwen2/2.5/3-VL, SmolVLM, Idefics3, ...) and composite
students (mmdistill.composite) are driven through their processor: it renders the chat, expands
image placeholders into image tokens and returns the pixel tensors. The response is appended
as ids after that, exactly as in the text adapter, so every view scores the sampled tokens.

Privileged information about images reaches the privileged views in two ways, alone or
together: as text (`{boxes}` in privileged.text renders the sample's boxes with labels and
normalised coordinates) and as different images (privileged.image.source: the sample's
teacher_images, or the student's images with the boxes drawn on). The partial view's analogue
for images is a subset of the boxes, or the boxes without labels (privileged.image.partial_boxes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmdistill.adapters.text import Prompts, TextAdapter
from mmdistill.data.boxes import boxes_text, check_boxes, draw_boxes, load_image, partial_boxes

DRAWN = "_drawn_images"


def _as_parts(content: Any) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]


class VisionAdapter(TextAdapter):
    """A sample may carry `images` (what the student sees), `teacher_images` (what privileged
    views may see instead) and `boxes` ({"label", "box": [x0, y0, x1, y1] in pixels, "image"}).
    Images are placed before the text of the first user turn unless the sample's messages
    already hold image parts."""

    def __init__(self, processor: Any, privileged: Any, max_length: int, teacher: Any = None):
        super().__init__(processor, privileged, max_length, teacher)
        # A sampled image placeholder would make the response unscorable (no image behind it).
        ids = {getattr(p, k, None) for p in self.procs.values() for k in ("image_token_id", "video_token_id")}
        self.never_sample = sorted(i for i in ids if isinstance(i, int))

    def prepare(self, samples: list[dict]) -> list[dict]:
        """Decode every image once per batch and validate boxes; errors name the sample. The
        rollouts of one prompt (the same sample object, repeated) share its decoded images."""
        out, seen = [], {}
        for s in samples:
            if id(s) in seen:
                out.append(dict(seen[id(s)]))
                continue
            sid = s.get("id", "?")
            new = dict(s)
            if any(isinstance(x, (str, Path)) for x in s.get("images") or []):
                new["image_paths"] = [str(x) for x in s["images"] if isinstance(x, (str, Path))]
            for key in ("images", "teacher_images"):
                if s.get(key):
                    new[key] = [load_image(x, f"sample '{sid}' {key}[{i}]") for i, x in enumerate(s[key])]
            if s.get("boxes"):
                new["boxes"] = check_boxes(s["boxes"], [im.size for im in new.get("images") or []],
                                           f"sample '{sid}' boxes")
            new[DRAWN] = {}  # images with boxes drawn on, per view level: drawn once per batch, shared by the views
            seen[id(s)] = new
            out.append(new)
        return out

    def has_images(self, samples: list[dict]) -> bool:
        return any(s.get("images") or s.get("teacher_images") for s in samples)

    # -- privileged views ------------------------------------------------------------------

    def view_boxes(self, sample: dict, level: str | None) -> list[dict]:
        boxes = sample.get("boxes") or []
        if level == "partial" and self.priv.partial_field == "boxes":
            return partial_boxes(boxes, self.priv.image.partial_boxes, self.priv.partial_ratio)
        return boxes

    def fields(self, sample: dict, level: str | None) -> dict:
        fields = dict(sample) if self.priv.partial_field == "boxes" else super().fields(sample, level)
        if "boxes" in sample:
            sizes = [im.size for im in sample.get("images") or []]
            fields["boxes"] = boxes_text(self.view_boxes(sample, level), sizes, digits=self.priv.image.box_digits)
        return fields

    def images(self, sample: dict, level: str | None) -> list[Image.Image]:
        level = self.view_level(sample, level)
        student = sample.get("images") or []
        source = self.priv.image.source
        if level is None or source == "student":
            return student
        if source in ("auto", "teacher") and sample.get("teacher_images"):
            return sample["teacher_images"]
        if source == "teacher":
            raise KeyError(f"sample '{sample.get('id', '?')}' has no field 'teacher_images' "
                           "(privileged.image.source=teacher)")
        if source == "draw":
            opts, drawn = self.priv.image, sample.get(DRAWN, {})
            key = (level, opts.draw_labels, opts.line_width, opts.partial_boxes, self.priv.partial_field,
                   self.priv.partial_ratio)
            if key not in drawn:
                boxes = self.view_boxes(sample, level)
                drawn[key] = [draw_boxes(im, boxes, labels=opts.draw_labels, width=opts.line_width, image_index=i)
                              for i, im in enumerate(student)]
            return drawn[key]
        return student

    def messages(self, sample: dict, level: str | None) -> list[dict]:
        msgs = [dict(m, content=_as_parts(m["content"])) for m in super().messages(sample, level)]
        n = len(self.images(sample, level))
        given = sum(p.get("type") == "image" for m in msgs for p in m["content"])
        if given and given != n:
            raise ValueError(f"sample '{sample.get('id', '?')}': its messages hold {given} image parts for {n} images")
        if not given and n:
            first_user = min(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[first_user]["content"] = [{"type": "image"}] * n + msgs[first_user]["content"]
        return msgs

    # -- encoding --------------------------------------------------------------------------

    def prompt_ids(self, samples: list[dict], level: str | None, policy: str = "student") -> list[list[int]]:
        return self.encode(samples, level, policy, torch.device("cpu")).unpadded()

    def encode(self, samples: list[dict], level: str | None, policy: str, device: torch.device) -> Prompts:
        texts = self.prompt_texts(samples, level, policy)
        images = [self.images(s, level) for s in samples]
        kwargs = {"images": images} if any(images) else {}  # nested per sample: text-only samples mix in
        out = dict(self.procs[policy](text=texts, padding=True, padding_side="left", add_special_tokens=False,
                                      return_tensors="pt", **kwargs))
        ids, attn = out.pop("input_ids"), out.pop("attention_mask")
        return Prompts(ids.to(device), attn.to(device).long(), out)
