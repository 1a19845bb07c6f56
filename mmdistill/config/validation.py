"""Everything that can be wrong with a config, caught before a model loads and reported as one
line naming the key."""
from __future__ import annotations

import math
import re
import string

from omegaconf import DictConfig, OmegaConf

from mmdistill.config.schema import ConfigError
from mmdistill.methods.options import METHOD_OPTIONS, PAPER_DOPD, DOPDConfig, served_refusal

CHOICES: dict[str, tuple[str, ...]] = {
    "student.dtype": ("float32", "bfloat16", "float16"),
    "teacher.model.dtype": ("float32", "bfloat16", "float16"),
    "teacher.mode": ("model", "frozen_student", "ema", "live", "served"),
    "teacher.server.api": ("vllm", "llama_cpp"),
    "teacher.server.full_vocabulary": ("refuse", "tail"),
    "data.source": ("arith", "chain", "scenes", "jsonl", "shards"),
    "data.on_bad_sample": ("raise", "skip"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "rollout.fast": ("auto", "on", "off"),
    "rollout.sampler": ("auto", "multinomial", "inverse_cdf"),  # models/sampling.SAMPLERS (a test checks)
    "rollout.loop": ("auto", "transformers"),  # models/token_loop.LOOPS (a test checks)
    "optim.implementation": ("auto", "fused", "foreach", "for_loop"),
    "eval.model": ("student", "student_init", "teacher", "student_priv", "student_init_priv", "teacher_priv"),
    "eval.extraction": ("tag", "last_number", "regex", "boxed"),
    "student.vision.tower.source": ("timm", "open_clip"),
    "student.vision.projector": ("linear", "mlp"),
    "teacher.model.vision.tower.source": ("timm", "open_clip"),
    "teacher.model.vision.projector": ("linear", "mlp"),
    "privileged.image.source": ("auto", "student", "teacher", "draw"),
    "privileged.image.partial_boxes": ("subset", "unlabeled"),
    "privileged.partial_cut": ("whitespace", "release"),
    "train.export": ("merged", "adapter"),
    "method.name": ("sft", "opd", "full_opd", "partial_opd", "gkd", "ar_opd", "dopd"),
}

# accelerate's trackers (accelerate.utils.LoggerType, checked equal by a test: this module does not import torch)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the optimizer's step sizes are float32

NULLABLE = {"train.mixed_precision"}  # null: accelerate's config file or launcher flag, else bf16 on a GPU (launch.py)

# key -> (lowest, highest, whether the lowest is allowed[, whether the highest is allowed (default: yes)]).
# Every value must also be finite: inf passes `v <= inf`, and would make no sense for any key.
RANGES: dict[str, tuple[float, float, bool]] = {
    "teacher.ema_decay": (0.0, 1.0, True),
    "teacher.server.topk": (0, float("inf"), False),
    "teacher.server.concurrency": (0, float("inf"), False),
    "teacher.server.timeout": (0, float("inf"), False),
    "teacher.server.retries": (0, float("inf"), True),
    "privileged.partial_ratio": (0.0, 1.0, True),
    "privileged.prompt_share": (0.0, 1.0, True),
    "privileged.image.box_digits": (0, 6, True),
    "privileged.image.line_width": (0, float("inf"), False),
    "student.vision.tower.image_size": (0, float("inf"), False),
    "student.vision.pool_tokens": (0, float("inf"), True),
    "teacher.model.vision.tower.image_size": (0, float("inf"), False),
    "teacher.model.vision.pool_tokens": (0, float("inf"), True),
    "data.num_workers": (0, 64, True),
    "data.shuffle_buffer": (0, float("inf"), True),
    "data.epochs": (0, float("inf"), True),
    "data.max_image_pixels": (0, float("inf"), False),
    "data.scenes.num_train": (0, float("inf"), False),
    "data.scenes.num_test": (0, float("inf"), True),
    "data.scenes.image_size": (16, float("inf"), True),
    "data.scenes.min_objects": (0, float("inf"), False),
    "data.scenes.max_objects": (0, float("inf"), False),
    "rollout.max_new_tokens": (0, float("inf"), False),
    "rollout.temperature": (0.0, float("inf"), True),
    "rollout.top_p": (0.0, 1.0, False),
    "rollout.num_rollouts": (0, float("inf"), False),
    "optim.lr": (0.0, float("inf"), False),
    "optim.beta1": (0.0, 1.0, True, False),
    "optim.beta2": (0.0, 1.0, True, False),
    "optim.weight_decay": (0.0, float("inf"), True),
    "optim.warmup_ratio": (0.0, 1.0, True),
    "optim.grad_clip": (0.0, float("inf"), True),
    "train.max_steps": (0, float("inf"), False),
    "train.batch_size": (0, float("inf"), False),
    "train.grad_accum": (0, float("inf"), False),
    "train.keep_checkpoints": (0, float("inf"), True),
    "train.log_every": (0, float("inf"), False),
    "train.checkpoint_every": (0, float("inf"), True),
    "train.max_length": (0, float("inf"), True),
    "train.sample_every": (0, float("inf"), True),
    "eval.num_samples": (0, float("inf"), True),
    "eval.every": (0, float("inf"), True),
    "eval.batch_size": (0, float("inf"), False),
    "eval.max_new_tokens": (0, float("inf"), False),
    "eval.max_per_split": (0, float("inf"), True),
    "eval.samples": (0, float("inf"), False),
    "eval.temperature": (0.0, float("inf"), True),
    "eval.top_p": (0.0, 1.0, False),
    "eval.tolerance": (0.0, float("inf"), True),
    "data.arith.digits": (0, 6, False),
    "data.arith.num_train": (0, float("inf"), False),
    "data.arith.num_test": (0, float("inf"), True),
    "data.chain.steps": (0, 8, False),
    "data.chain.num_train": (0, float("inf"), False),
    "data.chain.num_test": (0, float("inf"), True),
    "student.lora.rank": (0, float("inf"), False),
    "student.lora.alpha": (0.0, float("inf"), False),
    "student.lora.dropout": (0.0, 1.0, True, False),
}

# Each method's own keys, from the CHOICES and RANGES its options dataclass declares.
for _group, _options in METHOD_OPTIONS.items():
    CHOICES.update({f"method.{_group}.{k}": v for k, v in _options.CHOICES.items()})
    RANGES.update({f"method.{_group}.{k}": v for k, v in _options.RANGES.items()})


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in NULLABLE:
            continue
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is '{value}'; allowed: {', '.join(allowed)}")
    for key, (lo, hi, lo_ok, *rest) in RANGES.items():
        hi_ok = rest[0] if rest else True
        v = OmegaConf.select(cfg, key)
        if not (math.isfinite(v) and (v >= lo if lo_ok else v > lo) and (v <= hi if hi_ok else v < hi)):
            bound = f"{'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok and math.isfinite(hi) else ')'}"
            raise ConfigError(f"config key '{key}' is {v}; must be in {bound}")
    if cfg.optim.lr / (1 - cfg.optim.beta1) > FLOAT32_MAX:
        raise ConfigError(f"config key 'optim.lr' is {cfg.optim.lr}: AdamW's first step size lr / (1 - beta1) exceeds "
                          f"float32's largest number ({FLOAT32_MAX:.4g})")
    _check_format("privileged.template", cfg.privileged.template, allowed={"prompt", "privileged"})
    _check_format("privileged.text", cfg.privileged.text)
    if cfg.data.source in ("jsonl", "shards") and not cfg.data.train_path:
        raise ConfigError(f"config key 'data.train_path' must be set when data.source={cfg.data.source}")
    bad = sorted(set(cfg.method.dopd.regimes) - {"ht", "lh", "hs", "ll"})
    if bad:
        raise ConfigError(f"config key 'method.dopd.regimes' has {bad}; allowed: ht, lh, hs, ll")
    if cfg.method.chunk_size is not None and cfg.method.chunk_size < 0:
        raise ConfigError(f"config key 'method.chunk_size' is {cfg.method.chunk_size}; "
                          "must be null (auto), 0 (off) or positive")
    if cfg.teacher.mode == "served":
        _check_served(cfg)
    if cfg.teacher.model.gguf_file and not cfg.teacher.model.path:
        raise ConfigError("config key 'teacher.model.gguf_file' needs teacher.model.path")
    if cfg.student.gguf_file and not cfg.student.path:
        raise ConfigError("config key 'student.gguf_file' needs student.path")
    for group in ("arith", "chain"):
        ops = cfg.data[group].ops
        if not ops or set(ops) - {"+", "-", "*"}:
            raise ConfigError(f"config key 'data.{group}.ops' is {ops!r}; must be characters from '+-*'")
    if cfg.data.scenes.min_objects > cfg.data.scenes.max_objects:
        raise ConfigError("config key 'data.scenes.min_objects' is larger than data.scenes.max_objects")
    bad = sorted(set(cfg.data.scenes.question_types) - {"count", "attribute", "spatial"})
    if bad or not cfg.data.scenes.question_types:
        raise ConfigError(f"config key 'data.scenes.question_types' has {bad or 'nothing'}; "
                          "allowed: count, attribute, spatial")
    for who in ("student", "teacher.model"):
        model = OmegaConf.select(cfg, who)
        if model.vision.tower.name and model.path:
            raise ConfigError(f"config key '{who}.vision.tower.name' builds a new composite; "
                              f"it cannot be combined with {who}.path")
        if model.vision.lm_path and not model.vision.tower.name:
            raise ConfigError(f"config key '{who}.vision.lm_path' needs {who}.vision.tower.name")
    if cfg.eval.extraction == "regex" and not cfg.eval.pattern:
        raise ConfigError("config key 'eval.pattern' must be set when eval.extraction=regex")
    if cfg.eval.samples > 1 and cfg.eval.temperature == 0:
        raise ConfigError("config key 'eval.samples' > 1 needs eval.temperature > 0 (greedy samples are identical)")
    for i, stage in enumerate(cfg.train.stages):
        if stage.steps <= 0:
            raise ConfigError(f"config key 'train.stages.{i}.steps' is {stage.steps}; must be positive")
    names = [stage.name for stage in cfg.train.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'train.stages' has repeated names {names}; each stage needs its own")
    if cfg.train.keep_checkpoints == 0 and cfg.train.checkpoint_every:
        raise ConfigError("config key 'train.checkpoint_every' needs train.keep_checkpoints >= 1 "
                          "(0 writes no checkpoints)")
    if cfg.method.dopd.paper:
        for key, paper in PAPER_DOPD.items():
            value = cfg.method.dopd[key]
            if value != paper and value != getattr(DOPDConfig, key):
                raise ConfigError(f"config key 'method.dopd.{key}' is {value!r}, but method.dopd.paper=true is the "
                                  f"paper's DOPD exactly ({key}={paper!r}); drop one of them")
    bad = [t for t in cfg.train.report_to if t not in TRACKERS]
    if bad or len(set(cfg.train.report_to)) != len(cfg.train.report_to):
        raise ConfigError(f"config key 'train.report_to' has {bad or 'repeats'}; allowed: {', '.join(TRACKERS)} "
                          "([] for metrics.jsonl only)")
    _check_lora(cfg)
    if cfg.rollout.temperature == 0 and cfg.rollout.num_rollouts > 1:
        raise ConfigError("config key 'rollout.num_rollouts' > 1 needs rollout.temperature > 0 "
                          "(greedy rollouts are identical)")


def _check_served(cfg: DictConfig) -> None:
    """A served teacher: where it is, and whether the method can run on its top-k."""
    url = cfg.teacher.server.url
    if not url or not re.match(r"^https?://[^/\s]+", str(url)):
        raise ConfigError(f"config key 'teacher.server.url' is {url!r}; teacher.mode=served needs the server's "
                          "http(s) address, e.g. http://localhost:8000")
    if cfg.eval.model.startswith("teacher"):
        raise ConfigError(f"config key 'eval.model' is '{cfg.eval.model}': a served teacher is not evaluated by "
                          "mmdistill eval (it only scores); evaluate it on its server")
    if cfg.train.fsdp_teacher:
        raise ConfigError("config key 'train.fsdp_teacher' shards a local teacher; teacher.mode=served has none")
    name = cfg.method.name
    why = served_refusal(name, cfg.method[name], cfg.teacher.server.topk, cfg.teacher.server.full_vocabulary)
    if why:
        raise ConfigError(why)


def _check_lora(cfg: DictConfig) -> None:
    lora = cfg.student.lora
    for key in ("target_modules", "vision_target_modules"):
        names = list(lora[key])
        bad = [n for n in names if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", n)]
        if bad or (key == "target_modules" and not names):
            raise ConfigError(f"config key 'student.lora.{key}' has {bad or 'nothing'}; give module names "
                              "such as q_proj (a linear layer is adapted when its name ends in one)")
    if not lora.enabled:
        if cfg.train.export != "merged":
            raise ConfigError(f"config key 'train.export' is '{cfg.train.export}': only a LoRA student "
                              "(student.lora.enabled=true) has an adapter to export")
        return
    if cfg.train.fsdp:
        raise ConfigError("config key 'student.lora.enabled' is true with train.fsdp=true: LoRA students train "
                          "data-parallel only (their trained weights are small); launch with ddp.yaml")


def _check_format(key: str, text: str, allowed: set[str] | None = None) -> None:
    """A str.format template: well-formed, named fields only, and (given `allowed`) only those.
    Which fields privileged.text may name depends on the data: the preflight checks that."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"config key '{key}' is {text!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for name in names:
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise ConfigError(f"config key '{key}' is {text!r}: every field needs a name, e.g. {{hint}}")
        if allowed is not None and base not in allowed:
            raise ConfigError(f"config key '{key}' names the field {{{base}}}; it may use only "
                              + ", ".join(f"{{{a}}}" for a in sorted(allowed)))
