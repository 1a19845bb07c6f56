"""Tiny, randomly initialised Hugging Face *native* VLM families for tests.

For every family in :data:`FAMILIES` this module builds

* a REAL transformers processor (``LlavaProcessor``, ``Qwen2VLProcessor`` ...), assembled
  locally from the repository's shipped byte-level BPE tokenizer (``assets/tokenizer``) plus
  real image/video processor classes configured for tiny images -- no hub access;
* a TINY randomly initialised model of the real transformers class
  (``LlavaForConditionalGeneration`` ...), float32, whose image-token ids, pad/eos/bos ids
  match that tokenizer.

All families share ONE tokenizer vocabulary (:func:`build_tokenizer` adds every vision
special token needed by any family in one fixed order), so a teacher of one family and a
student of another have identical ``get_vocab()``.

Usage::

    proc = build_processor("qwen2_vl")
    model = build_model("qwen2_vl", proc, seed=0)
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[t1, t2], images=[[img1], [img2]], padding=True,
                 padding_side="left", return_tensors="pt")
    model.generate(**batch, max_new_tokens=5, do_sample=False)

Padding: every processor here is built with ``tokenizer.padding_side == "left"`` (so
``padding=True`` alone left-pads, and it is persisted by :func:`save_family`); passing
``padding_side="left"`` explicitly to ``processor(...)`` works as well.

Image placeholders in the chat templates (what each processor's ``__call__`` expands):

* llava                 ``<image>``  -> 16 x ``<image>`` (32x32 image, CLIP patch 8, CLS dropped)
* qwen2_vl/qwen2_5_vl/qwen3_vl  ``<|vision_start|><|image_pad|><|vision_end|>`` ->
  ``(h/16)*(w/16)`` x ``<|image_pad|>`` (patch 8, merge 2; images resized to 32..64 px,
  i.e. 4 tokens for 32x32, 6 for 48x32, 16 for 64x64)
* smolvlm/idefics3       ``<image>`` -> ``<fake_token_around_image><global-img>`` + 4 x ``<image>``
  + ``<fake_token_around_image>`` (image splitting disabled, one 32x32 tile, scale factor 2)

Processor outputs besides input_ids/attention_mask: llava ``pixel_values (n_img,3,32,32)``;
qwen ``mm_token_type_ids (B,L)``, ``pixel_values (n_patches, 3*2*8*8)``, ``image_grid_thw
(n_img,3)``; smolvlm/idefics3 ``pixel_values (B,max_imgs,3,32,32)``, ``pixel_attention_mask
(B,max_imgs,32,32)``. Always pass images nested per sample (``[[img1], [img2, img3]]``).

To score prompt+completion in one forward with logits equal to ``generate``'s, build the
model kwargs with :func:`full_sequence_inputs` (Qwen needs ``mm_token_type_ids`` extended to
the full length and ``position_ids=None``).

Quirks: ``Idefics3Processor.__init__`` calls ``tokenizer.add_special_tokens`` which
*replaces* the tokenizer's ``extra_special_tokens`` list by its own three tokens (vocab and
the added tokens' ``special`` flag -- hence ``skip_special_tokens`` decoding -- unchanged);
this only touches idefics3's private tokenizer copy. ``SmolVLMProcessor`` requires the
``num2words`` package (a dependency of mmdistill for that reason).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mmdistill.config import REPO_ROOT

FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "idefics3")
# families using multimodal (3-D) rotary positions computed inside the model
MROPE_FAMILIES: frozenset[str] = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})

TOKENIZER_DIR = REPO_ROOT / "assets" / "tokenizer"

# Every vision token any family needs, in ONE fixed order (=> identical vocab for all).
VISION_TOKENS: tuple[str, ...] = (
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<video>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
)

QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>",
    "qwen2_vl": QWEN_PLACEHOLDER,
    "qwen2_5_vl": QWEN_PLACEHOLDER,
    "qwen3_vl": QWEN_PLACEHOLDER,
    "smolvlm": "<image>",
    "idefics3": "<image>",
}
# token that the model replaces with image features (config.image_token_id / image_token_index)
IMAGE_TOKEN: dict[str, str] = {
    "llava": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "smolvlm": "<image>",
    "idefics3": "<image>",
}

# tiny sizes
IMAGE_SIDE = 32  # llava / smolvlm / idefics3 fixed input side; qwen: resized into [32x32, 64x64] pixels
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VISION_HIDDEN = 32
VISION_HEADS = 2
PATCH = 8

_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}@@IMAGE@@"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(family: str) -> str:
    """ChatML template (same as ``assets/tokenizer``) whose image parts render the family placeholder."""
    return _TEMPLATE.replace("@@IMAGE@@", IMAGE_PLACEHOLDER[family])


def make_image(width: int = IMAGE_SIDE, height: int = IMAGE_SIDE, seed: int = 0):
    """Deterministic random RGB ``PIL.Image`` of size ``width`` x ``height``."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8))


def user_message(text: str, n_images: int = 1) -> list[dict]:
    """One-turn chat: ``n_images`` image parts followed by a text part."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def full_sequence_inputs(family: str, batch, sequences: torch.Tensor) -> dict:
    """Model kwargs to score ``sequences`` (= prompt ids of ``batch`` + generated ids) in ONE
    forward so that the logits at the generated positions equal ``generate``'s logits.

    * attention_mask is extended with ones (tokens after an EOS are then scored too);
    * Qwen (M-RoPE) families: ``mm_token_type_ids`` is extended with zeros (text) and
      ``position_ids`` is left ``None`` -- the model recomputes 3-D positions from
      input_ids / image_grid_thw / attention_mask / mm_token_type_ids (mandatory: without
      ``mm_token_type_ids`` the model raises when ``image_grid_thw`` is given);
    * others: ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)``.
    """
    prompt_len = batch["input_ids"].shape[1]
    new = sequences.shape[1] - prompt_len
    bsz = sequences.shape[0]
    mask = batch["attention_mask"]
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kwargs["input_ids"] = sequences
    kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(bsz, new)], dim=1)
    if family in MROPE_FAMILIES:
        tt = batch["mm_token_type_ids"]
        kwargs["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(bsz, new)], dim=1)
        kwargs["position_ids"] = None
    else:
        kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return kwargs


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; expected one of {FAMILIES}")


def build_tokenizer():
    """Shipped 512-token BPE tokenizer + all vision special tokens (fixed order), left padding."""
    from transformers import AutoTokenizer

    # padding_side as an init kwarg so that save_pretrained persists it
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, padding_side="left")
    tok.add_special_tokens({"extra_special_tokens": list(VISION_TOKENS)}, replace_extra_special_tokens=False)
    return tok




def _family_tokenizer(family: str, tokenizer):
    tok = copy.deepcopy(tokenizer if tokenizer is not None else build_tokenizer())
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"  # persisted by save_pretrained
    tok.chat_template = chat_template(family)
    return tok


def build_processor(family: str, tokenizer=None):
    """Real HF processor for ``family`` (tiny image settings).

    ``tokenizer`` (default :func:`build_tokenizer`) is deep-copied so per-family attributes
    (chat template) never leak between families; the vocab is unchanged."""
    _check_family(family)
    tok = _family_tokenizer(family, tokenizer)
    tmpl = chat_template(family)

    if family == "llava":
        from transformers import LlavaImageProcessor, LlavaProcessor

        ip = LlavaImageProcessor(
            size={"shortest_edge": IMAGE_SIDE},
            crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE},
            do_pad=False,
        )
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP CLS token, dropped by the "default" strategy
            chat_template=tmpl,
            image_token="<image>",
        )

    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        from transformers import Qwen2VLImageProcessor

        ip_kwargs = dict(
            patch_size=PATCH,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
        )
        ip = Qwen2VLImageProcessor(**ip_kwargs)
        if family == "qwen3_vl":
            from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

            vp = Qwen3VLVideoProcessor(**ip_kwargs)
            return Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tmpl)
        from transformers import Qwen2VLVideoProcessor

        vp = Qwen2VLVideoProcessor(**ip_kwargs)
        if family == "qwen2_vl":
            from transformers import Qwen2VLProcessor

            return Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tmpl)
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tmpl)

    seq_len = (IMAGE_SIDE // PATCH) ** 2 // 4  # scale_factor 2 pixel shuffle
    size_kwargs = dict(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIDE},
        max_image_size={"longest_edge": IMAGE_SIDE},
    )
    if family == "smolvlm":
        from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

        ip = SmolVLMImageProcessor(**size_kwargs)
        vp = SmolVLMVideoProcessor(size={"longest_edge": IMAGE_SIDE}, max_image_size={"longest_edge": IMAGE_SIDE})
        return SmolVLMProcessor(
            image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=seq_len, chat_template=tmpl
        )

    from transformers import Idefics3ImageProcessor, Idefics3Processor

    ip = Idefics3ImageProcessor(**size_kwargs)
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq_len, chat_template=tmpl)


def _token_ids(tok) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    ids["pad"] = tok.pad_token_id
    ids["eos"] = tok.eos_token_id
    ids["bos"] = tok.convert_tokens_to_ids("<|im_start|>")
    return ids


def _text_kwargs(ids: dict[str, int], vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=512,
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        bos_token_id=ids["bos"],
    )


def build_config(family: str, processor):
    """The (tiny) transformers config for ``family`` matching ``processor``'s tokenizer."""
    _check_family(family)
    tok = processor.tokenizer
    ids = _token_ids(tok)
    vocab = len(tok)
    text = _text_kwargs(ids, vocab)  # pad/eos/bos live in the text config (+ generation_config)

    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=VISION_HIDDEN,
            intermediate_size=2 * VISION_HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=VISION_HEADS,
            image_size=IMAGE_SIDE,
            patch_size=PATCH,
            projection_dim=VISION_HIDDEN,
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=ids["<image>"],
            image_seq_length=(IMAGE_SIDE // PATCH) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        head_dim = TEXT_HIDDEN // TEXT_HEADS  # 16 -> rotary half-dim 8
        qids = dict(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        if family == "qwen2_vl":
            from transformers import Qwen2VLConfig

            vision = dict(
                depth=1,
                embed_dim=VISION_HIDDEN,
                hidden_size=TEXT_HIDDEN,
                num_heads=VISION_HEADS,
                mlp_ratio=2,
                patch_size=PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
            cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **qids)
        elif family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig

            vision = dict(
                depth=1,
                hidden_size=VISION_HIDDEN,
                intermediate_size=2 * VISION_HIDDEN,
                out_hidden_size=TEXT_HIDDEN,
                num_heads=VISION_HEADS,
                patch_size=PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=2 * 2 * PATCH,  # 2x2 merged tokens per attention window
                fullatt_block_indexes=[0],
            )
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
            cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qids)
        else:
            from transformers import Qwen3VLConfig

            vision = dict(
                depth=1,
                hidden_size=VISION_HIDDEN,
                intermediate_size=2 * VISION_HIDDEN,
                out_hidden_size=TEXT_HIDDEN,
                num_heads=VISION_HEADS,
                patch_size=PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=64,  # 8x8 learned grid (interpolated)
                deepstack_visual_indexes=[0],
            )
            text["head_dim"] = head_dim
            text["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            }
            cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **qids)
    else:
        from transformers import LlamaConfig

        vision = dict(
            hidden_size=VISION_HIDDEN,
            intermediate_size=2 * VISION_HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=VISION_HEADS,
            image_size=IMAGE_SIDE,
            patch_size=PATCH,
        )
        if family == "smolvlm":
            from transformers import SmolVLMConfig as Cfg
        else:
            from transformers import Idefics3Config as Cfg
        cfg = Cfg(
            vision_config=vision,
            text_config=LlamaConfig(**text).to_dict(),
            image_token_id=ids["<image>"],
            scale_factor=2,
        )
    return cfg


def build_model(family: str, processor=None, seed: int = 0) -> torch.nn.Module:
    """Tiny random float32 model (eval mode) of the real transformers class for ``family``.

    Deterministic in ``seed``; the global torch RNG state is left untouched."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if processor is None:
        processor = build_processor(family)
    cfg = build_config(family, processor)
    tok = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    return model.float().eval()


def save_family(family: str, directory, seed: int = 0) -> Path:
    """Save a tiny model + processor so that ``AutoProcessor.from_pretrained(dir)`` and
    ``AutoModelForImageTextToText.from_pretrained(dir)`` reload them offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor = build_processor(family)
    model = build_model(family, processor, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def load_family(directory):
    """Reload ``(processor, model)`` saved by :func:`save_family` (offline)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    return processor, model.eval()
