"""Fast rollouts (static KV cache + compiled decoding, mmdistill/models/decoding.py) against the
eager path on the CPU: the same tokens for greedy and for seeded sampling, one line naming the
reason wherever a model falls back, and the config keys and GPU defaults that select them.

rollout.fast=on compiles on the CPU too (inductor's C++ backend): the compiled tests share one
model and one batch shape, so it compiles once."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CompileConfig, StaticCache

from mmdistill.adapters import build_adapter
from mmdistill.adapters.text import TextAdapter
from mmdistill.config import ConfigError, load_config
from mmdistill.distributed.launch import device_defaults
from mmdistill.models import decoding
from mmdistill.models.decoding import cache_length, eager_reason
from mmdistill.models.loading import load, load_tokenizer
from mmdistill.tasks import arith, scenes
from tests.helpers import varied_model

BATCH = 4


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tok(cfg):
    return load_tokenizer(cfg.student)


@pytest.fixture(scope="module")
def model(cfg, tok):
    return varied_model(cfg, tok)


def settings(fast: str, **kw):
    return OmegaConf.create({**dict(max_new_tokens=24, temperature=1.0, top_p=1.0, num_rollouts=1, fast=fast), **kw})


def prompts(seed: int) -> list[dict]:
    return arith.make_samples(BATCH, seed, digits=2)


def rollouts(tok, cfg, model, fast: str, seeds, **kw):
    """One adapter (one decoder, one cache) over consecutive rollouts, each after torch.manual_seed."""
    adapter = TextAdapter(tok, cfg.privileged, 128)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(adapter.rollout(model, prompts(seed), settings(fast, **kw)))
    return adapter, out


def assert_same(fast, eager):
    for f, e in zip(fast, eager):
        assert torch.equal(f.response_ids, e.response_ids) and torch.equal(f.response_mask, e.response_mask)


def test_greedy_fast_rollouts_are_the_eager_tokens(tok, cfg, model):
    """Consecutive rollouts reuse one static cache (emptied between them) and one compiled step."""
    adapter, fast = rollouts(tok, cfg, model, "on", [0, 1, 2], temperature=0.0)
    _, eager = rollouts(tok, cfg, model, "off", [0, 1, 2], temperature=0.0)
    assert isinstance(adapter.decoder.cache[2], StaticCache) and hasattr(model, "_compiled_call")  # the fast path ran
    assert_same(fast, eager)
    lengths = torch.cat([b.response_mask.sum(1) for b in eager]).tolist()
    assert min(lengths) < 24 and max(lengths) == 24  # some rows stopped at EOS, some ran to the end
    assert len({tuple(r) for b in eager for r in b.response_ids[:, :6].tolist()}) > BATCH  # not one repeated token


def test_the_compiled_step_reads_weights_changed_in_place(tok, cfg, model):
    """An optimizer step updates the weights in place between rollouts; the compiled step (and
    on a GPU its CUDA graph) must read them, not what they held when it was compiled."""
    adapter = TextAdapter(tok, cfg.privileged, 128)
    before = adapter.rollout(model, prompts(0), settings("on", temperature=0.0))
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        fast = adapter.rollout(model, prompts(0), settings("on", temperature=0.0))
        eager = adapter.rollout(model, prompts(0), settings("off", temperature=0.0))
    finally:
        model.load_state_dict(kept)
    assert_same([fast], [eager])
    assert not torch.equal(fast.response_ids, before.response_ids)


def test_sampled_fast_rollouts_are_the_eager_tokens_for_a_seed(tok, cfg, model):
    """On the CPU the compiled step's logits match eager ones closely enough that every draw of
    the same seed lands on the same token (on a GPU in bf16 they need not: benchmarks/bench_rollout.py
    reports the share of identical rows there)."""
    adapter, fast = rollouts(tok, cfg, model, "on", [3, 4, 5])
    _, eager = rollouts(tok, cfg, model, "off", [3, 4, 5])
    assert adapter.decoder.cache is not None
    assert_same(fast, eager)
    # two rollouts per prompt: the same batch shape, the same compiled step
    adapter = TextAdapter(tok, cfg.privileged, 128)
    pair = {}
    for fast_mode in ("on", "off"):
        torch.manual_seed(6)
        pair[fast_mode] = adapter.rollout(model, prompts(6)[:2], settings(fast_mode, num_rollouts=2))
    assert_same([pair["on"]], [pair["off"]])
    assert not torch.equal(pair["off"].response_ids[0], pair["off"].response_ids[1])


def test_one_batch_shape_keeps_one_cache(tok, cfg, model):
    adapter = TextAdapter(tok, cfg.privileged, 128)
    adapter.rollout(model, prompts(0), settings("on", temperature=0.0))
    first = adapter.decoder.cache[2]
    adapter.rollout(model, prompts(1), settings("on", temperature=0.0))
    assert adapter.decoder.cache[2] is first  # same shape: the same tensors, for CUDA graphs to replay on
    assert cache_length(60) == 64 and cache_length(65) == 128 and cache_length(3) == 64


def test_cpu_auto_decodes_eagerly_and_says_why_once(tok, cfg, model, capsys):
    capsys.readouterr()
    adapter, auto = rollouts(tok, cfg, model, "auto", [0, 1], temperature=0.0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("mmdistill: rollouts decode eagerly: on CPU")
    assert adapter.decoder.cache is None
    _, eager = rollouts(tok, cfg, model, "off", [0, 1], temperature=0.0)
    assert_same(auto, eager)
    assert capsys.readouterr().err == ""  # rollout.fast=off is what the user asked for: nothing to say


def test_composite_vlm_falls_back_with_one_line(capsys):
    vcfg = load_config("tiny_vlm")
    model, proc = load(vcfg.student, seed=0)
    adapter = build_adapter(proc, vcfg.privileged, 256)
    samples = scenes.make_samples(2, 0, "train", image_size=32, max_objects=2)
    capsys.readouterr()
    for _ in range(2):
        batch = adapter.rollout(model.eval(), samples, settings("on", max_new_tokens=4))
    assert batch.response_ids.shape[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmdistill: rollouts decode eagerly: composite VLM: its generate starts from image embeddings "
                   "(inputs_embeds), not ids"]


def test_models_the_fast_path_cannot_take_are_named(cfg, tok, model):
    sharded = varied_model(cfg, tok)
    next(sharded.parameters()).ds_id = 0  # what a DeepSpeed ZeRO-3 partition looks like
    assert "sharded" in eager_reason(sharded, "on")
    assert eager_reason(torch.nn.Linear(2, 2), "on") == "Linear is not a transformers generation model"
    assert eager_reason(model, "off") == "rollout.fast=off"
    assert eager_reason(model, "on") is None
    assert eager_reason(model, "auto").startswith("on CPU")


def test_a_failed_compile_falls_back_to_the_same_sampled_tokens(tok, cfg, monkeypatch, capsys):
    """Compiling fails on the first decoding step, after the prefill drew its token: the eager
    retry starts from the same random state, so the rollout is what an eager one would be."""

    def broken(gm, example_inputs, **options):
        raise RuntimeError("no compiler here")

    def broken_config(device):
        config = CompileConfig(backend=broken, dynamic=False)
        config._compile_all_devices = True
        return config

    model = varied_model(cfg, tok)
    monkeypatch.setattr(decoding, "compile_config", broken_config)
    capsys.readouterr()
    adapter, fallen = rollouts(tok, cfg, model, "on", [7, 8])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmdistill: rollouts decode eagerly: the compiled decoding failed")
    assert "no compiler here" in err[0] and adapter.decoder.cache is None
    _, eager = rollouts(tok, cfg, model, "off", [7, 8])
    assert_same(fallen, eager)


def test_errors_fall_back_only_until_the_fast_path_has_worked(tok, cfg, model, monkeypatch, capsys):
    """A transformers version the fast path does not fit fails on the first rollout: eager then,
    with the error named. Once a fast rollout has worked, an error is a real one and is raised."""

    def unfit(**kwargs):
        raise TypeError("StaticCache.__init__() got an unexpected keyword argument 'max_cache_len'")

    monkeypatch.setattr(decoding, "_StaticCache", unfit)
    capsys.readouterr()
    _, fallen = rollouts(tok, cfg, model, "on", [0], temperature=0.0)
    assert capsys.readouterr().err.strip() == ("mmdistill: rollouts decode eagerly: the compiled decoding failed "
                                               "(TypeError: StaticCache.__init__() got an unexpected keyword argument "
                                               "'max_cache_len')")
    monkeypatch.undo()
    adapter, _ = rollouts(tok, cfg, model, "on", [0], temperature=0.0)

    def broken(*args):
        raise RuntimeError("a real error")

    monkeypatch.setattr(adapter.decoder, "static_cache", broken)
    with pytest.raises(RuntimeError, match="a real error"):
        adapter.rollout(model, prompts(1), settings("on", temperature=0.0))


# -- config and GPU defaults ---------------------------------------------------------------


def test_rollout_fast_is_validated_before_any_model_loads(tmp_path):
    assert load_config("tiny").rollout.fast == "auto"
    assert load_config("tiny", ["rollout.fast=off"]).rollout.fast == "off"  # YAML's bare off is a boolean
    assert load_config("tiny", ["rollout.fast=on"]).rollout.fast == "on"
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  fast: off\n")
    assert load_config(path).rollout.fast == "off"
    with pytest.raises(ConfigError, match="'rollout.fast' is 'fastest'"):
        load_config("tiny", ["rollout.fast=fastest"])


@pytest.mark.parametrize(
    "configured,tf32,environ,cuda,bf16,deepspeed,expected",
    [
        (None, True, {}, True, True, False, ("bf16", True)),  # a bf16 GPU: autocast and TF32
        (None, True, {}, True, False, False, (None, True)),  # no bf16 (V100): accelerate's default
        (None, True, {}, False, False, False, (None, False)),  # CPU: nothing changes
        ("no", True, {}, True, True, False, ("no", True)),  # the user's word wins
        ("fp16", False, {}, True, True, False, ("fp16", False)),
        (None, True, {"ACCELERATE_MIXED_PRECISION": "no"}, True, True, False, (None, True)),  # the launcher's wins
        (None, True, {}, True, True, True, (None, True)),  # DeepSpeed keeps its own config's choice
    ],
)
def test_gpu_defaults(configured, tf32, environ, cuda, bf16, deepspeed, expected):
    assert device_defaults(configured, tf32, environ, cuda=cuda, bf16=bf16, deepspeed=deepspeed) == expected


def test_the_static_cache_stores_keys_and_values_of_mixed_dtypes_exactly():
    """Under bf16 autocast a Llama writes float32 keys (float32 rotary embeddings) and bf16 values,
    then decodes in bf16 (transformers 5.17 on an H200: its static layer allocated both in the keys'
    dtype, refused the bf16 values, and every rollout fell back to eager). Everything lands exactly,
    as float32."""
    from transformers import LlamaConfig

    from mmdistill.models.decoding import _StaticCache

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    keys, values = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8).to(torch.bfloat16)
    later = torch.randn(2, 1, 1, 8).to(torch.bfloat16)
    plain = StaticCache(config=config, max_cache_len=8)
    plain.update(keys, keys, 0, {"cache_position": torch.arange(3)})
    with pytest.raises(RuntimeError, match="dtype"):  # what the plain cache does with a later bf16 write
        plain.update(later, later, 0, {"cache_position": torch.tensor([3])})
    cache = _StaticCache(config=config, max_cache_len=8)
    cache.update(keys, values, 0, {"cache_position": torch.arange(3)})
    got_k, got_v = cache.update(later, later, 0, {"cache_position": torch.tensor([3])})
    assert got_k.dtype == got_v.dtype == torch.float32
    assert torch.equal(got_k[:, :, :3], keys) and torch.equal(got_v[:, :, :3], values.float())
    assert torch.equal(got_k[:, :, 3:4], later.float()) and torch.equal(got_v[:, :, 3:4], later.float())
