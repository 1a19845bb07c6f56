"""Every method's options: the `method.<name>` config groups, with the values each key may take.

Plain dataclasses, free of torch, so a config is checked before anything heavy is imported; each
method's class (opd.py, sft.py, gkd.py, ar_opd.py, dopd.py) takes them as keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional


@dataclass
class OPDConfig:
    """`method.opd`: vanilla OPD's options (config keys, validated before a model loads)."""

    estimator: str = "full"  # sampled | topk | full
    topk: int = 128
    target: str = "teacher_plain"
    reduction: str = "seq"  # seq: mean per sequence then over sequences; token: over all tokens
    topk_from: str = "student"  # whose top-K ids the topk estimator renormalises over
    CHOICES: ClassVar[dict] = {"estimator": ("sampled", "topk", "full"),
                               "target": ("teacher_plain", "teacher_full", "teacher_partial", "student_priv"),
                               "reduction": ("seq", "token"), "topk_from": ("student", "teacher")}
    RANGES: ClassVar[dict] = {"topk": (0, float("inf"), False)}


@dataclass
class PrivilegedOPDConfig:
    """`method.full_opd` / `method.partial_opd`: OPD whose target is teacher_full / teacher_partial."""

    estimator: str = "full"
    topk: int = 128
    reduction: str = "seq"
    topk_from: str = "student"
    CHOICES: ClassVar[dict] = {"estimator": ("sampled", "topk", "full"), "reduction": ("seq", "token"),
                               "topk_from": ("student", "teacher")}
    RANGES: ClassVar[dict] = {"topk": (0, float("inf"), False)}


@dataclass
class SFTConfig:
    """`method.sft`."""

    reduction: str = "seq"
    CHOICES: ClassVar[dict] = {"reduction": ("seq", "token")}
    RANGES: ClassVar[dict] = {}


@dataclass
class GKDConfig:
    """`method.gkd`."""

    beta: float = 0.5  # 0 = forward KL, 1 = reverse KL, generalized JSD between
    lam: float = 0.5  # fraction of micro-batches on student rollouts (the rest: oracle responses)
    target: str = "teacher_plain"
    reduction: str = "seq"
    # continuous: TRL's gJSD / (beta (1 - beta)), continuous in beta, 4x TRL's at beta 0.5;
    # unscaled: TRL's generalized_jsd_loss as is (reuse a TRL recipe's lr / grad clip). docs/methods.md
    jsd_scale: str = "continuous"
    CHOICES: ClassVar[dict] = {"target": ("teacher_plain", "teacher_full", "teacher_partial", "student_priv"),
                               "reduction": ("seq", "token"), "jsd_scale": ("continuous", "unscaled")}
    RANGES: ClassVar[dict] = {"beta": (0.0, 1.0, True), "lam": (0.0, 1.0, True)}


@dataclass
class AROPDConfig:
    """`method.ar_opd`. configs/ar_opd_release.yaml sets every key the AR-OPD release fixes."""

    # residual scale: 0 = partial OPD, 1 without clip = full OPD, > 1 extrapolates. 0.8: the paper and
    # the release's main-experiment config (its code's fallback is 1.0).
    lam: float = 0.8
    clip: Optional[float] = 5.0  # |log qF - log qP| bound; null or <= 0 = no clip
    alpha: float = 0.0  # 0 = forward KL(target || student), 1 = reverse KL, generalized JSD between
    skip: int = 3  # first response tokens left out of the loss
    temperature: float = 1.0
    reduction: str = "seq"
    jsd_scale: str = "continuous"  # for 0 < alpha < 1; unscaled = the release's (as TRL's GKD)
    empty_sequences: str = "exclude"  # seq mean over responses that keep a token; zero = the release's (count as 0)
    CHOICES: ClassVar[dict] = {"reduction": ("seq", "token"), "jsd_scale": ("continuous", "unscaled"),
                               "empty_sequences": ("exclude", "zero")}
    RANGES: ClassVar[dict] = {"lam": (0.0, float("inf"), True), "alpha": (0.0, 1.0, True),
                              "skip": (0, float("inf"), True), "temperature": (0.0, float("inf"), False)}


@dataclass
class DOPDConfig:
    """`method.dopd`."""

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
    # step: thresholds over the optimizer step's response tokens, every micro-batch and process (the paper's
    # batch) | micro_batch: over each micro-batch on its own process (holds no micro-batch's views for the others)
    threshold_scope: str = "step"
    # Variants, not in the paper: see methods/dopd.py. The defaults are the variant benchmarks/gap.py's
    # rule fell back to (the most stable: the paper's DOPD collapsed; docs/experiments/gap.md); paper=true
    # gives the paper's (PAPER_DOPD), as does the DOPD class's own constructor.
    self_mix: float = 1.0  # HS/LL target: log_softmax(g log pi_S(.|x,p) + (1 - g) log pi_T(.|x,p)); 1 = the self
    hs_rejected: str = "teacher"  # self (the paper) | teacher: HS tokens with q_T below its threshold go to HT
    ht_divergence: str = "reverse_kl"  # js (the paper) | reverse_kl (full vocabulary) on HT tokens
    anchor: float = 0.0  # weight of KL(pi_S(.|x) || pi_init(.|x)) on every response token
    # true: the paper's DOPD exactly, the four variant keys above at PAPER_DOPD's values
    paper: bool = False
    CHOICES: ClassVar[dict] = {"topk_from": ("student", "teacher"), "threshold": ("trimmed_mean", "mean"),
                               "routing": ("advantage", "shuffled"), "self_target": ("live", "frozen"),
                               "threshold_scope": ("step", "micro_batch"), "hs_rejected": ("self", "teacher"),
                               "ht_divergence": ("js", "reverse_kl"),
                               "reduction": ("seq", "token")}
    RANGES: ClassVar[dict] = {"beta_l": (0.0, float("inf"), True), "beta_w": (0.0, float("inf"), True),
                              "w_ht": (0.0, float("inf"), True), "topk": (0, float("inf"), False),
                              "trim": (0.0, 1.0, True), "self_mix": (0.0, 1.0, True),
                              "anchor": (0.0, float("inf"), True)}


# The paper's DOPD: what method.dopd.paper=true sets the variant keys to
PAPER_DOPD: dict = {"self_mix": 1.0, "hs_rejected": "self", "ht_divergence": "js", "anchor": 0.0}


# config group under `method.` -> its options dataclass
METHOD_OPTIONS: dict[str, type] = {
    "opd": OPDConfig,
    "full_opd": PrivilegedOPDConfig,
    "partial_opd": PrivilegedOPDConfig,
    "gkd": GKDConfig,
    "ar_opd": AROPDConfig,
    "dopd": DOPDConfig,
    "sft": SFTConfig,
}


# A served teacher (teacher.mode=served) returns, per position, the sampled token's log-prob and its
# top-k: which method settings can run on that, and which need the full vocabulary.
SERVED_KEY = "teacher.server.full_vocabulary"
AR_OPD_SERVED = ("method ar_opd builds its target from the full vocabulary of two teacher views "
                 "(log_softmax(lP + lam * clip(lF - lP))); teacher.mode=served returns the top-k only: use a local "
                 "teacher (teacher.mode=model, ema, frozen_student, live)")
TEACHER_TARGETS = ("teacher_plain", "teacher_full", "teacher_partial")


def served_refusal(name: str, options, topk: int, full_vocabulary: str) -> str | None:
    """Why method `name` with these options cannot run on a served teacher's top-`topk`, as one
    line naming the key, or None. full_vocabulary "tail" allows the tail-bucket approximation of
    full-vocabulary terms (mmdistill/losses/sparse.py); "refuse" does not."""
    approx = full_vocabulary == "tail"
    group = f"method.{name}"
    if name == "ar_opd":
        return AR_OPD_SERVED
    if name in ("opd", "full_opd", "partial_opd"):
        if name == "opd" and options.target not in TEACHER_TARGETS:
            return None
        if options.estimator == "full" and not approx:
            return (f"{group}.estimator=full needs the teacher's full vocabulary, which teacher.mode=served does not "
                    f"return: use estimator sampled or topk, or set {SERVED_KEY}=tail (the tail-bucket approximation)")
        if options.estimator == "topk":
            return _topk_refusal(group, options, topk)
    if name == "gkd":
        if options.target in TEACHER_TARGETS and not approx:
            return (f"method gkd's generalized JSD (method.name=gkd) needs the teacher's full vocabulary, which "
                    f"teacher.mode=served does not return: set {SERVED_KEY}=tail (the tail-bucket approximation)")
    if name == "dopd":
        if options.self_mix != 1.0:
            return (f"{group}.self_mix={options.self_mix} mixes the teacher's full vocabulary into the self target; "
                    "teacher.mode=served returns the top-k only: keep self_mix=1")
        ht = "ht" in options.regimes and options.w_ht > 0
        if ht and not approx:
            return (f"method dopd's HT term ({group}.ht_divergence={options.ht_divergence}, in {group}.regimes) needs "
                    f"the teacher's full vocabulary, which teacher.mode=served does not return: set {SERVED_KEY}=tail "
                    "(the tail-bucket approximation) or leave ht out of the regimes")
        if "lh" in options.regimes:
            return _topk_refusal(group, options, topk)
    return None


def _topk_refusal(group: str, options, topk: int) -> str | None:
    if options.topk_from != "teacher":
        return (f"{group}.topk_from={options.topk_from} needs the teacher's log-probs on the student's top-K ids; "
                f"teacher.mode=served returns its own top-k only: set {group}.topk_from=teacher")
    if options.topk > topk:
        return (f"{group}.topk={options.topk} is more than the served teacher's teacher.server.topk={topk}: "
                f"lower it, or raise teacher.server.topk (and the server's limit, e.g. vLLM's --max-logprobs)")
    return None
