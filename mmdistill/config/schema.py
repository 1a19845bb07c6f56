"""The run configuration's schema: structured dataclasses OmegaConf merges YAML and overrides into.

Each method's own options live beside the methods (mmdistill/methods/options.py); the paths and files the
configs name are resolved in loading.py, and everything is checked in validation.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from mmdistill.methods.options import AROPDConfig, DOPDConfig, GKDConfig, OPDConfig, PrivilegedOPDConfig, SFTConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
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
class ServerConfig:
    # teacher.mode=served: an OpenAI-compatible completions server scores the views (docs/served_teacher.md).
    url: Optional[str] = None  # e.g. http://host:8000 (the /v1/completions endpoint's base)
    model: Optional[str] = None  # the server's model name; null: the first of its /v1/models
    api: str = "vllm"  # vllm: token ids in, prompt_logprobs out (vLLM); llama_cpp: llama-cpp-python's server
    topk: int = 20  # log-probs asked per position (vLLM caps it at its --max-logprobs, 20 by default)
    concurrency: int = 8  # requests in flight at once
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # more tries after a transient error (5xx, a reset or refused connection, a timeout)
    # refuse: full-vocabulary terms (OPD's full estimator, GKD, DOPD's HT) are refused before anything
    # loads; tail: they run on the tail-bucket approximation (mmdistill/losses/sparse.py)
    full_vocabulary: str = "refuse"
    # a local tokenizer to check the vocabulary against, where the server has no tokenize endpoint
    tokenizer: Optional[str] = None


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the student's language model. Only they train, so a self-teacher
    (frozen, EMA) and the initial student need no second copy of the weights: they are the same
    model with the adapters off (or the EMA adapter on). docs/lora.md"""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # scale alpha / rank
    dropout: float = 0.0
    # Linear layers of the language model whose names end in these: the attention projections of
    # Llama, Mistral, Qwen, Gemma, Phi-3 (after its split), SmolLM ... decoders
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    vision: bool = False  # adapters on a VLM's vision tower too; false: the tower stays frozen as loaded
    # the tower's linear layers when `vision` (CLIP / SigLIP / Idefics3: *_proj, out_proj; Qwen-VL, timm ViT: qkv, proj)
    vision_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj",
                                                                      "qkv", "proj"])


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TeacherConfig:
    # model: a separate frozen model; frozen_student: a frozen copy of the initial student;
    # ema: an EMA of the student updated after each optimizer step; live: the student, no_grad;
    # served: a model behind an OpenAI-compatible server (teacher.server).
    mode: str = "model"
    model: ModelConfig = field(default_factory=ModelConfig)
    ema_decay: float = 0.99
    server: ServerConfig = field(default_factory=ServerConfig)


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
    # How a text field is cut (adapters/text.py cut_prefix). whitespace: extend the cut to the next
    # whitespace, nothing at ratio 0; release: the AR-OPD release's (strip, at least one character,
    # extend through word characters and backslashes only).
    partial_cut: str = "whitespace"
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
    # Static KV cache + compiled decoding (CUDA graphs on a GPU). auto: on CUDA where the model
    # supports it; on: on CPU too; off: eager. Evaluation generates the same way. docs/usage.md
    fast: str = "auto"
    # How a sampled token is drawn (models/sampling.py): multinomial = torch's (a random number per
    # vocabulary id); inverse_cdf = one per row through the cumulative distribution, the same
    # distribution; auto = inverse_cdf on the CPU, where it is 4-7x cheaper at vocabulary 49k
    sampler: str = "auto"
    # Who runs an eager decoding loop: auto = mmdistill's own (models/token_loop.py: generate's
    # tokens, without its per-token passes over the vocabulary) for plain causal LMs and the
    # settings it carries out, transformers' generate otherwise; transformers = always generate
    loop: str = "auto"


@dataclass
class ArithDataConfig:
    digits: int = 2
    ops: str = "+"
    seed: int = 0
    num_train: int = 5000
    num_test: int = 200


@dataclass
class ChainDataConfig:
    """Arithmetic chains (tasks/chain.py): `steps` operations drawn from `ops`, each with a worked solution."""

    steps: int = 2
    ops: str = "+-*"
    seed: int = 0
    num_train: int = 20000
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
    # arith, chain, scenes: built-in procedural tasks; jsonl: records from `train_path` (image paths
    # relative to the file); shards: WebDataset shards (a directory with a manifest, a
    # manifest, a brace pattern or a tar) streamed by mmdistill/data/shard_stream.py
    source: str = "arith"
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    select: Dict[str, Any] = field(default_factory=dict)  # keep records whose fields equal these (a list = any of)
    num_workers: int = 0  # DataLoader workers reading shards (shards are split by rank, then worker)
    shuffle_buffer: int = 1000  # samples; 0 = shard order
    epochs: int = 0  # passes over the shards; 0 = endless (train.max_steps decides)
    on_bad_sample: str = "raise"  # raise: stop naming shard and key; skip: skip, count (data_bad_samples) and warn
    # Pixels an image may have (8000 x 8000); a larger one is a bad sample, refused from its header
    # before it is decoded (a small PNG can hold an image that decodes to gigabytes)
    max_image_pixels: int = 64_000_000
    arith: ArithDataConfig = field(default_factory=ArithDataConfig)
    chain: ChainDataConfig = field(default_factory=ChainDataConfig)
    scenes: ScenesDataConfig = field(default_factory=ScenesDataConfig)


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
    # AdamW's kernel: auto = fused where torch has one for every parameter's device (CPU, CUDA;
    # on this CPU 6-10x faster than the for-loop torch otherwise takes there), torch's default
    # elsewhere and under DeepSpeed; fused, foreach, for_loop force one
    implementation: str = "auto"


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
    # Resume with a config that differs from the run's config.yaml in a key that changes what is
    # trained (config/loading.py RESUME_FREE lists the keys that may change without it).
    resume_changed: bool = False
    max_length: int = 0  # prompt + response token budget; 0 = the student's max positions
    progress: bool = True
    # no | bf16 | fp16 (autocast for the student); null = accelerate's config / launcher flag, else
    # bf16 on a GPU that has it (not under DeepSpeed), else no
    mixed_precision: Optional[str] = None
    tf32: bool = True  # TensorFloat-32 float32 matmuls on CUDA (torch.set_float32_matmul_precision("high"))
    gradient_checkpointing: bool = False  # recompute the student's activations in backward
    fsdp: bool = False  # shard the student across the processes (torch FSDP2); HF models; see docs/distributed.md
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights from forward to backward (ZeRO-2 style)
    # shard the frozen teacher (teacher.mode=model) across the processes too (FSDP2, forward only)
    fsdp_teacher: bool = False
    share_prefix: bool = True  # views of one model run the prompt prefix they share once (KV cache); text models
    # write rollouts (prompt, response, images) to rollouts/rank_N.jsonl every N steps; 0 = never
    sample_every: int = 50
    # accelerate's experiment trackers, fed the rows of metrics.jsonl (always written): tensorboard
    # (in RUN_DIR/tensorboard), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; [] = none
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "mmdistill"  # the project (wandb, comet) or experiment (mlflow) runs are filed under
    # Continual learning: stages trained in sequence from one student (train.max_steps is then their
    # sum); after each, every stage's test split is scored, giving continual.json's R[i][j].
    stages: List[StageConfig] = field(default_factory=list)
    # What RUN_DIR/student holds for a LoRA student: merged (a plain transformers model, the
    # adapters folded into the weights) or adapter (peft's adapter directory, PeftModel.from_pretrained)
    export: str = "merged"


@dataclass
class EvalConfig:
    num_samples: int = 0  # held-out samples scored before and after training (and after each stage); 0 = skip
    every: int = 0  # also score them every N steps during training (metrics.jsonl "accuracy"); 0 = only before/after
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
    # exact | numeric | choice | scenes | arith | reasoning_gym:<task>; null = each sample's own
    checker: Optional[str] = None
    extraction: str = "tag"  # tag | last_number | regex | boxed
    tag: str = "Answer:"
    pattern: Optional[str] = None  # extraction=regex: the answer is the pattern's first group in its last match
    tolerance: float = 1.0e-6  # numeric checker: relative or absolute
    samples: int = 1  # responses per prompt: accuracy is pass@1 over them, pass@k reported for k = 1, 2, 4 ... samples
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0




@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    privileged: PrivilegedConfig = field(default_factory=PrivilegedConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

