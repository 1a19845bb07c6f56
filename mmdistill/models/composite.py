"""A vision-language model assembled from parts: a timm or open_clip vision tower, a projector
and any Hugging Face causal LM.

This is how a user builds a VLM student (or a tiny teacher) of a chosen size. The image is fed to
the LM the LLaVA way: the prompt carries `num_image_tokens` copies of IMAGE_TOKEN per image and
their embeddings are replaced by the projected tower tokens, so the LM sees one flat sequence and
HF generation, KV caching and position handling work unchanged.

Nothing is downloaded: towers are random init or loaded from a local weights file.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import AddedToken
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchFeature,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmdistill.models.weights import untied_state_dict

IMAGE_TOKEN = "<image>"
MODEL_TYPE = "mmdistill_composite"
PROCESSOR_FILE = "composite_processor.json"


# -- towers ------------------------------------------------------------------------------------


def _build_tower(tower: dict) -> tuple[nn.Module, dict]:
    """The tower module (random init) and its preprocessing: image_size, image_mean, image_std."""
    source, name, kwargs = tower["source"], tower["name"], dict(tower.get("kwargs") or {})
    if source == "timm":
        import timm

        module = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        data = timm.data.resolve_data_config({}, model=module)  # its input_size ignores an img_size kwarg
        size, mean, std = kwargs.get("img_size") or data["input_size"][-1], data["mean"], data["std"]
    elif source == "open_clip":
        import open_clip
        from open_clip.transform import PreprocessCfg

        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(f"open_clip does not know the model '{name}'")
        embed_dim = kwargs.pop("embed_dim", cfg["embed_dim"])
        quick_gelu = kwargs.pop("quick_gelu", cfg.get("quick_gelu", False))
        vision_cfg = {**cfg["vision_cfg"], **kwargs}
        # Only plain ViTs can hand back their tokens; timm/ResNet towers are read via forward_intermediates.
        vision_cfg["output_tokens"] = not (vision_cfg.get("timm_model_name")
                                           or isinstance(vision_cfg.get("layers"), (list, tuple)))
        # No cast_dtype: its fp32 LayerNorms would clash with a tower cast wholly to `dtype`.
        module = open_clip.model._build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
        pre = PreprocessCfg()
        size, mean, std = vision_cfg.get("image_size", pre.size), pre.mean, pre.std
    else:
        raise ValueError(f"tower.source must be 'timm' or 'open_clip', got '{source}'")
    size = tower.get("image_size") or size
    size = size if isinstance(size, int) else size[-1]
    return module, {"image_size": int(size), "image_mean": list(mean), "image_std": list(std)}


def _tower_tokens(tower: nn.Module, source: str, pixels: torch.Tensor) -> torch.Tensor:
    """[B, T, D] tokens from the tower's last layer.

    timm ViTs keep their prefix (CLS/register) tokens: they are part of what the tower computes
    and dropping them would need per-model knowledge (num_prefix_tokens) for no clear gain.
    open_clip ViTs give their own `output_tokens`, the normalised patch tokens without CLS.
    Feature maps (conv nets, timm-backed open_clip towers) are flattened row-major to tokens.
    """
    if source == "timm":
        x = tower.forward_features(pixels)
        if x.ndim == 4 and getattr(tower, "output_fmt", "NCHW") == "NHWC":
            x = x.permute(0, 3, 1, 2)
    elif getattr(tower, "output_tokens", False):
        x = tower(pixels)[1]
    else:
        x = tower.forward_intermediates(pixels, indices=1, intermediates_only=True)["image_intermediates"][-1]
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


@contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention (open_clip's ViTs) takes a fused kernel only under no_grad in eval mode,
    and its numbers differ slightly: rollout (no_grad) and scoring (grad) must see the same tokens."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tower weights '{path}' do not exist (no downloads: give a local file)")
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_tower_weights(tower: nn.Module, source: str, path: str | Path) -> None:
    """Strict load, except for the parts the composite never builds (a timm classifier head,
    open_clip's text tower), which a full checkpoint legitimately carries."""
    state = _read_state_dict(path)
    own = tower.state_dict()
    if source == "open_clip" and any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if source == "timm":
        head = tower.pretrained_cfg.get("classifier") or "head"
        heads = head if isinstance(head, (list, tuple)) else [head]
        state = {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"tower weights '{path}' do not match the tower: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"tower weights '{path}' do not match the tower: {' '.join(str(exc).split())}") from None


def _build_projector(kind: str, dim_in: int, dim_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim_in, dim_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim_in, dim_out), nn.GELU(), nn.Linear(dim_out, dim_out))
    raise ValueError(f"projector.type must be 'linear' or 'mlp', got '{kind}'")


def _lm_from_config(config: dict, dtype: torch.dtype) -> PreTrainedModel:
    config = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config), dtype=dtype)


# -- model -------------------------------------------------------------------------------------


class CompositeConfig:
    """The parts, as saved in config.json; anything else is read from the LM's config, so code
    written for a plain causal LM (max_position_embeddings, vocab_size, ...) keeps working."""

    model_type = MODEL_TYPE

    def __init__(self, tower: dict, projector: dict, text_config, image_token_id: int, num_image_tokens: int,
                 freeze_tower: bool = False, freeze_lm: bool = False):
        self.tower, self.projector, self.text_config = tower, projector, text_config
        self.image_token_id, self.num_image_tokens = int(image_token_id), int(num_image_tokens)
        self.freeze_tower, self.freeze_lm = bool(freeze_tower), bool(freeze_lm)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "text_config":
            raise AttributeError(name)
        return getattr(self.text_config, name)

    def to_dict(self) -> dict:
        return {
            "model_type": MODEL_TYPE,
            "tower": self.tower,
            "projector": self.projector,
            "freeze_tower": self.freeze_tower,
            "freeze_lm": self.freeze_lm,
            "image_token_id": self.image_token_id,
            "num_image_tokens": self.num_image_tokens,
            "text_config": self.text_config.to_dict(),
        }


class CompositeVLM(nn.Module):
    """tower -> (token pooling) -> projector -> rows of the LM's input embeddings."""

    def __init__(self, tower: nn.Module, projector: nn.Module, lm: PreTrainedModel, config: CompositeConfig):
        super().__init__()
        self.tower, self.projector, self.lm, self.config = tower, projector, lm, config
        self.tower.requires_grad_(not config.freeze_tower)
        self.lm.requires_grad_(not config.freeze_lm)

    @property
    def generation_config(self):
        return self.lm.generation_config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def resize_token_embeddings(self, *args, **kwargs):
        return self.lm.resize_token_embeddings(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """The LM's, under transformers' newer name where it has one (the old one warns)."""
        enable = getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.lm, "activation_checkpointing_disable", None) or self.lm.gradient_checkpointing_disable
        disable()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, num_image_tokens, hidden] for N images."""
        param = next(self.tower.parameters())
        with _no_mha_fastpath():
            tokens = _tower_tokens(self.tower, self.config.tower["source"], pixel_values.to(param.device, param.dtype))
        if pool := self.config.projector.get("pool_tokens", 0):
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), pool).transpose(1, 2)
        return self.projector(tokens)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's input embeddings with every image-token row replaced, in order, by the images' tokens."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_tokens, n_images = int(is_image.sum()), 0 if pixel_values is None else pixel_values.shape[0]
        if n_tokens != n_images * self.config.num_image_tokens:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens but {n_images} images need "
                f"{n_images * self.config.num_image_tokens} ({self.config.num_image_tokens} each)"
            )
        if n_images == 0:
            return embeds
        feats = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats)

    def forward(self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, logits_to_keep=0,
                use_cache=False, **kwargs):
        return self.lm(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, generation_config=None, **kwargs):
        """Prompt ids followed by the new tokens, like a decoder-only HF model's generate.

        Positions are the same left-padding-aware ones the scorer uses, so rollout logits match a
        full forward. The image token is never sampled: a response holding one could not be scored.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        config = copy.deepcopy(generation_config or self.lm.generation_config)
        suppress = set(config.suppress_tokens or []) | set(kwargs.pop("suppress_tokens", None) or [])
        config.suppress_tokens = sorted(suppress | {self.config.image_token_id})
        return self.lm.generate(
            input_ids=input_ids,
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=position_ids,
            generation_config=config,
            **kwargs,
        )

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        saved = {**self.config.to_dict(), "dtype": str(self.dtype).removeprefix("torch.")}
        (directory / "config.json").write_text(json.dumps(saved, indent=2))
        weights = untied_state_dict(self) if state_dict is None else state_dict
        safetensors.torch.save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "CompositeVLM":
        directory = Path(directory)
        saved = json.loads((directory / "config.json").read_text())
        if saved.get("model_type") != MODEL_TYPE:
            raise ValueError(f"'{directory}/config.json' is not a {MODEL_TYPE} config")
        dtype = dtype or getattr(torch, saved.get("dtype", "float32"))
        model = _assemble(
            {**saved, "tower": {**saved["tower"], "weights": None}},
            _lm_from_config(saved["text_config"], dtype),
            saved["image_token_id"],
            dtype,
        )
        safetensors.torch.load_model(model, str(directory / "model.safetensors"), strict=True, device=str(model.device))
        return model


def _assemble(spec: dict, lm: PreTrainedModel, image_token_id: int, dtype: torch.dtype) -> CompositeVLM:
    tower_spec = dict(spec["tower"])
    tower, pre = _build_tower(tower_spec)
    if tower_spec.get("weights"):
        _load_tower_weights(tower, tower_spec["source"], tower_spec["weights"])
    tower.to(device=lm.device, dtype=dtype)
    size = pre["image_size"]
    was_training = tower.training
    try:
        with torch.no_grad():
            tokens = _tower_tokens(tower.eval(), tower_spec["source"],
                                   torch.zeros(1, 3, size, size, device=lm.device, dtype=dtype))
    except Exception as exc:
        raise ValueError(f"tower {tower_spec['name']} fails on a {size}x{size} image (set tower.image_size?): "
                         f"{' '.join(str(exc).split())}") from None
    tower.train(was_training)
    proj_spec = {"type": spec["projector"].get("type", "linear"),
                 "pool_tokens": int(spec["projector"].get("pool_tokens", 0) or 0)}
    if proj_spec["pool_tokens"] > tokens.shape[1]:
        raise ValueError(f"projector.pool_tokens {proj_spec['pool_tokens']} exceeds the tower's "
                         f"{tokens.shape[1]} tokens")
    projector = _build_projector(proj_spec["type"], tokens.shape[-1],
                                 lm.config.hidden_size).to(device=lm.device, dtype=dtype)
    config = CompositeConfig(
        tower={"source": tower_spec["source"], "name": tower_spec["name"],
               "kwargs": dict(tower_spec.get("kwargs") or {}),
               "image_size": size, "image_mean": pre["image_mean"], "image_std": pre["image_std"]},
        projector=proj_spec,
        text_config=lm.config,
        image_token_id=image_token_id,
        num_image_tokens=proj_spec["pool_tokens"] or tokens.shape[1],
        freeze_tower=spec.get("freeze_tower", False),
        freeze_lm=spec.get("freeze_lm", False),
    )
    return CompositeVLM(tower, projector, lm, config)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The image token's id, adding it as a special token if the tokenizer lacks it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_composite(spec: dict, tokenizer, lm: PreTrainedModel | None = None, lm_config: dict | None = None,
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[CompositeVLM, "CompositeProcessor"]:
    """spec = {"tower": {"source": "timm"|"open_clip", "name": str, "kwargs": dict, "image_size": int,
                         "weights": str|None},
               "projector": {"type": "linear"|"mlp", "pool_tokens": int (0 = keep all tower tokens)},
               "freeze_tower": bool, "freeze_lm": bool}

    The LM is `lm` (a loaded HF causal LM) or a seeded random init from `lm_config` (an HF config
    dict with model_type; vocab size and special ids default to the tokenizer's). IMAGE_TOKEN is
    added to the tokenizer if missing, and the LM's embeddings grow only if the id does not fit.
    """
    if (lm is None) == (lm_config is None):
        raise ValueError("give exactly one of lm (a loaded causal LM) or lm_config (a config dict)")
    image_token_id = add_image_token(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if lm is None:
            defaults = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
            lm = _lm_from_config({**defaults, **lm_config}, dtype)
            lm.generation_config.pad_token_id = lm.config.pad_token_id
            lm.generation_config.eos_token_id = lm.config.eos_token_id
        lm = lm.to(dtype)
        if lm.get_input_embeddings().num_embeddings <= image_token_id:
            # The new input row is never read (image rows are replaced), so skip mean resizing's covariance.
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = _assemble(spec, lm, image_token_id, dtype)
    tower = model.config.tower
    processor = CompositeProcessor(tokenizer, model.config.num_image_tokens, tower["image_size"], tower["image_mean"],
                                   tower["image_std"])
    return model, processor


# -- processor ---------------------------------------------------------------------------------


class CompositeProcessor:
    """HF-processor-like: what the adapter calls for any VLM."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer, num_image_tokens: int, image_size: int, image_mean, image_std):
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer)
        self.num_image_tokens, self.image_size = int(num_image_tokens), int(image_size)
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    @property
    def chat_template(self):
        return self.tokenizer.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs) -> str:
        """Image parts become one IMAGE_TOKEN plus a newline; the tokenizer's template does the rest."""
        if tokenize:
            raise ValueError("tokenize=True is not supported: call the processor on the text so image tokens "
                             "are expanded")
        flat = [{**m, "content": self._flatten(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt, tokenize=False,
                                                  **kwargs)

    @staticmethod
    def _flatten(content) -> str:
        if isinstance(content, str):
            return content
        out = []
        for part in content:
            if part.get("type") == "image":
                out.append(IMAGE_TOKEN + "\n")
            elif part.get("type") == "text":
                out.append(part["text"])
            else:
                raise ValueError(f"unsupported message part type '{part.get('type')}' (expected 'image' or 'text')")
        return "".join(out)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """[3, S, S]: squashed (not cropped) to the tower's size so every pixel is seen."""
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.image_mean).view(3, 1, 1)) / torch.tensor(self.image_std).view(3, 1, 1)

    def __call__(self, text: list[str] | str, images: list[list[Image.Image]] | None = None, padding=True,
                 padding_side: str = "left", return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """Tokenises with each IMAGE_TOKEN expanded to num_image_tokens ids. No special tokens
        are added by default: the chat template already renders any BOS."""
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [[] for _ in texts]
        elif isinstance(text, str) and (not images or isinstance(images[0], Image.Image)):
            images = [images]
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
        for i, (t, imgs) in enumerate(zip(texts, images)):
            if t.count(IMAGE_TOKEN) != len(imgs):
                raise ValueError(f"text {i} has {t.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens but {len(imgs)} images")
        kwargs.setdefault("add_special_tokens", False)
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens) for t in texts]
        enc = self.tokenizer(expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors,
                             **kwargs)
        flat = [self.preprocess(im) for imgs in images for im in imgs]
        pixels = torch.stack(flat) if flat else torch.zeros(0, 3, self.image_size, self.image_size)
        return BatchFeature({**enc, "pixel_values": pixels}, tensor_type=return_tensors)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        fields = {k: getattr(self, k) for k in ("num_image_tokens", "image_size", "image_mean", "image_std")}
        (directory / PROCESSOR_FILE).write_text(json.dumps({"processor": "CompositeProcessor", **fields}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CompositeProcessor":
        directory = Path(directory)
        fields = json.loads((directory / PROCESSOR_FILE).read_text())
        fields.pop("processor", None)
        # An empty config: the directory's config.json describes the composite, not a model transformers knows.
        return cls(AutoTokenizer.from_pretrained(directory, config=PretrainedConfig(), local_files_only=True), **fields)
