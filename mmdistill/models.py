"""Loading students and teachers: a local Hugging Face model, a GGUF, or a random init."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from mmdistill.config import REPO_ROOT

DEFAULT_TOKENIZER = REPO_ROOT / "assets" / "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.path or str(DEFAULT_TOKENIZER)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer else {}
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
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
            raise FileNotFoundError(f"model path '{cfg.path}' does not exist (no hub downloads: give a local directory)")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        return AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
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


def max_positions(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


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
