"""Loading students and teachers: a local Hugging Face model (causal LM, native VLM or saved
composite), a GGUF, or a random init (a causal LM, or a composite VLM built from parts).

Local files only: every load passes `local_files_only`, so nothing here contacts the Hugging
Face Hub (config/paths.py names a missing path before a load is tried)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from mmdistill.config import REPO_ROOT
from mmdistill.models.composite import MODEL_TYPE as COMPOSITE_TYPE
from mmdistill.models.composite import CompositeProcessor, CompositeVLM, build_composite

DEFAULT_TOKENIZER = REPO_ROOT / "assets" / "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.path or str(DEFAULT_TOKENIZER)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer else {}
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, local_files_only=True,
                                        **kwargs)
    if tok.chat_template is None:
        raise ValueError(f"tokenizer '{source}' has no chat template; set one or use a chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> torch.nn.Module:
    """A pretrained model from `path`, else a seeded random init from `arch` sized to the tokenizer."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path:
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"model path '{cfg.path}' does not exist "
                                    "(no hub downloads: give a local directory)")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, local_files_only=True, **kwargs
        )
        if cfg.gguf_file:  # dequantised to `dtype` on load: what we train and save is a plain model
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model
    arch = OmegaConf.to_container(cfg.arch)
    model_type = arch.pop("model_type")
    hf_cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **arch,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def model_kind(path: str | Path) -> str:
    """text, vlm (a Hugging Face VLM: its config has a vision part) or composite (ours)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return "text"  # a GGUF, or a directory transformers will explain
    config = json.loads(file.read_text())
    if config.get("model_type") == COMPOSITE_TYPE:
        return "composite"
    return "vlm" if "vision_config" in config else "text"


def load(cfg: DictConfig, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The model and what renders its prompts: a tokenizer (text) or a processor (VLM)."""
    kind = model_kind(cfg.path) if cfg.path else ("composite" if cfg.vision.tower.name else "text")
    if kind == "text":
        tok = load_tokenizer(cfg)
        return load_model(cfg, tok, seed), tok
    if not cfg.path:  # a new composite: tower + projector + causal LM
        tok = load_tokenizer(cfg)
        if cfg.vision.lm_path:
            lm = AutoModelForCausalLM.from_pretrained(cfg.vision.lm_path, dtype=DTYPES[cfg.dtype],
                                                      trust_remote_code=cfg.trust_remote_code, local_files_only=True)
        else:
            lm = load_model(cfg, tok, seed)
        spec = {"tower": OmegaConf.to_container(cfg.vision.tower),
                "projector": {"type": cfg.vision.projector, "pool_tokens": cfg.vision.pool_tokens},
                "freeze_tower": cfg.vision.freeze_tower, "freeze_lm": cfg.vision.freeze_lm}
        return build_composite(spec, tok, lm=lm, seed=seed, dtype=DTYPES[cfg.dtype])
    if kind == "composite":
        return (CompositeVLM.from_pretrained(cfg.path, dtype=DTYPES[cfg.dtype]),
                CompositeProcessor.from_pretrained(cfg.path))
    proc = load_processor(cfg)
    model = AutoModelForImageTextToText.from_pretrained(cfg.path, dtype=DTYPES[cfg.dtype],
                                                        trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    return model, proc


def load_processor(cfg: DictConfig) -> Any:
    """What renders the model's prompts, without loading the model (seconds, where a model can
    take minutes): the tokenizer (text), the processor (a Hugging Face VLM) or a composite's.
    A new composite's processor is made with its tower; until then this one stands in for it:
    it renders the same chat text (one image token per image), and adds the image token to
    the tokenizer as the real one does, so vocabularies compare as they will in training."""
    kind = model_kind(cfg.path) if cfg.path else ("composite" if cfg.vision.tower.name else "text")
    if kind == "text":
        return load_tokenizer(cfg)
    if kind == "composite" and not cfg.path:
        return CompositeProcessor(load_tokenizer(cfg), 1, cfg.vision.tower.image_size, (0.5,) * 3, (0.5,) * 3)
    if kind == "composite":
        return CompositeProcessor.from_pretrained(cfg.path)
    proc = AutoProcessor.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    if proc.tokenizer.pad_token_id is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc


def tokenizer_of(proc: Any) -> PreTrainedTokenizerBase:
    return proc if isinstance(proc, PreTrainedTokenizerBase) else proc.tokenizer


def max_positions(model: torch.nn.Module) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def check_same_vocab(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, where: str) -> None:
    """Views are compared token by token, so both sides must mean the same thing by every id."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    only_s = sorted(set(sv.items()) - set(tv.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(
        f"teacher/student vocab mismatch ({where}): student has {len(sv)} tokens, teacher {len(tv)}; "
        f"first student entries the teacher lacks: {only_s}"
    )


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, under transformers' newer name where the
    model has it (5.x warns on the old one)."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{kind}_checkpointing_{'enable' if on else 'disable'}")()
