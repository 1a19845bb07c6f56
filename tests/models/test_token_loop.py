"""mmdistill's own decoding loop (mmdistill/models/token_loop.py) against transformers' generate:
the same tokens, token for token, from the same random state, for every setting it carries out
(greedy, temperature, top-p, both samplers, min_new_tokens, suppressed ids, EOS and padding of
finished rows, left-padded prompts) on three architectures; generate wherever a setting, an input
or the model is not the loop's, with one line when it is a setting."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from mmdistill.adapters.text import TextAdapter
from mmdistill.config import ConfigError, load_config
from mmdistill.config.validation import CHOICES
from mmdistill.evaluation.evaluate import accuracy, decoding
from mmdistill.models import token_loop
from mmdistill.models.loading import load_tokenizer
from mmdistill.models.sampling import inverse_cdf_generation
from mmdistill.models.tiny import build_model, build_processor
from mmdistill.tasks import arith
from tests.helpers import varied_model

BATCH, NEW = 6, 40
SETTINGS = [  # (temperature, top_p, sampler)
    (0.0, 1.0, "auto"),
    (1.0, 1.0, "inverse_cdf"),
    (0.7, 0.9, "inverse_cdf"),
    (1.0, 1.0, "multinomial"),
    (0.7, 0.9, "multinomial"),
]


@pytest.fixture(scope="module")
def student():
    """The tiny config, its tokenizer and the varied tiny student (rows that stop at different lengths)."""
    cfg = load_config("tiny")
    tok = load_tokenizer(cfg.student)
    return cfg, tok, varied_model(cfg, tok)


def rollouts(cfg, tok, model, loop, seeds, never_sample=(), **kw):
    adapter = TextAdapter(tok, cfg.privileged, 256)
    adapter.never_sample = list(never_sample)
    settings = OmegaConf.create({**dict(max_new_tokens=NEW, temperature=1.0, top_p=1.0, num_rollouts=1, fast="off",
                                        sampler="auto", loop=loop), **kw})
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(adapter.rollout(model, arith.make_samples(BATCH, seed, digits=3), settings))
    return out


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.response_ids.shape == b.response_ids.shape
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)


@pytest.fixture
def loop_calls(monkeypatch):
    calls = []
    real = token_loop.decode
    monkeypatch.setattr(token_loop, "decode", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("temperature,top_p,sampler", SETTINGS)
def test_rollouts_are_generates_tokens(student, loop_calls, temperature, top_p, sampler):
    cfg, tok, model = student
    kw = dict(temperature=temperature, top_p=top_p, sampler=sampler)
    ours = rollouts(cfg, tok, model, "auto", range(4), **kw)
    assert len(loop_calls) == 4
    theirs = rollouts(cfg, tok, model, "transformers", range(4), **kw)
    assert len(loop_calls) == 4
    assert_same(ours, theirs)
    lengths = torch.cat([b.response_mask.sum(1) for b in ours])
    assert len(set(lengths.tolist())) > 2  # rows stop at different lengths
    if temperature == 0.0:
        assert any(b.response_ids.shape[1] < NEW for b in ours)  # a batch that ended before the limit


def test_min_new_tokens_of_the_models_generation_config_hold(student, loop_calls):
    cfg, tok, model = student
    model.generation_config.min_new_tokens = 8
    try:
        ours = rollouts(cfg, tok, model, "auto", range(3), temperature=0.0)
        theirs = rollouts(cfg, tok, model, "transformers", range(3), temperature=0.0)
    finally:
        model.generation_config.min_new_tokens = None
    assert loop_calls and all((b.response_mask.sum(1) >= 9).all() for b in ours)  # 8 tokens, then EOS at the earliest
    assert_same(ours, theirs)
    free = rollouts(cfg, tok, model, "auto", range(3), temperature=0.0)
    assert any((b.response_mask.sum(1) < 9).any() for b in free)  # without it, rows end sooner


def test_suppressed_ids_are_never_drawn(student, loop_calls):
    cfg, tok, model = student
    common = rollouts(cfg, tok, model, "auto", range(2), temperature=0.0)
    counts = torch.bincount(torch.cat([b.response_ids[b.response_mask.bool()] for b in common]))
    counts[tok.eos_token_id] = 0
    banned = [int(counts.argmax())]  # the id greedy decoding takes most
    for temperature in (0.0, 1.0):
        ours = rollouts(cfg, tok, model, "auto", range(3), never_sample=banned, temperature=temperature)
        theirs = rollouts(cfg, tok, model, "transformers", range(3), never_sample=banned, temperature=temperature)
        assert_same(ours, theirs)
        assert not any((b.response_ids == banned[0]).any() for b in ours)


def _architectures():
    common = dict(vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, **common)),
    }


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
@pytest.mark.parametrize("temperature,top_p,sampler", SETTINGS)
def test_other_architectures_decode_generates_tokens_from_left_padded_prompts(arch, temperature, top_p, sampler):
    torch.manual_seed(0)
    model = _architectures()[arch].eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(8.0)  # peaked enough that greedy rows differ
        head[[2, 7]] *= 3.0  # EOS likely enough that rows end before the limit
    ids = torch.randint(3, 300, (5, 9))
    attn = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5, 0]):
        ids[row, :pad], attn[row, :pad] = 0, 0
    sample = temperature > 0
    gen = GenerationConfig(max_new_tokens=12, do_sample=sample, temperature=temperature if sample else None,
                           top_p=top_p if sample else None, top_k=0 if sample else None, pad_token_id=0,
                           eos_token_id=[2, 7], use_cache=True)
    steps = token_loop.plan(model, gen, sampler)
    assert isinstance(steps, token_loop.Plan), steps
    torch.manual_seed(1)
    ours = token_loop.decode(model, ids, attn, steps)
    kwargs = {}
    if sample and sampler == "inverse_cdf":
        gen, kwargs["logits_processor"] = inverse_cdf_generation(gen)
    torch.manual_seed(1)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen, **kwargs)
    assert torch.equal(ours, theirs)
    assert torch.isin(ours[:, 9:-1], torch.tensor([2, 7])).any()  # a row that ended, then padded


def test_settings_the_loop_does_not_carry_out_go_to_generate_with_one_line(student, loop_calls, capsys):
    cfg, tok, model = student
    model.generation_config.repetition_penalty = 1.3
    try:
        capsys.readouterr()
        ours = rollouts(cfg, tok, model, "auto", range(2), temperature=0.0)
        lines = capsys.readouterr().err.strip().splitlines()
        theirs = rollouts(cfg, tok, model, "transformers", range(2), temperature=0.0)
    finally:
        model.generation_config.repetition_penalty = None
    assert not loop_calls
    assert lines == ["mmdistill: rollouts decode in transformers' generate: generation setting repetition_penalty=1.3"]
    assert_same(ours, theirs)
    assert capsys.readouterr().err == ""  # rollout.loop=transformers: what was asked, nothing to say


def test_what_each_unfit_setting_or_model_is_called(student):
    model = student[2]
    sample = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, pad_token_id=0,
                              eos_token_id=[2])
    assert isinstance(token_loop.plan(model, sample, "auto"), token_loop.Plan)
    top_k = GenerationConfig(**{**sample.to_diff_dict(), "top_k": 5})
    assert token_loop.plan(model, top_k, "auto") == "generation setting top_k=5"
    ngram = GenerationConfig(**{**sample.to_diff_dict(), "no_repeat_ngram_size": 3})
    assert token_loop.plan(model, ngram, "auto") == "generation setting no_repeat_ngram_size=3"
    assert token_loop.unfit_model(model, {}) is None
    assert token_loop.unfit_model(model, {"pixel_values": None}) == "the rollout passes pixel_values to generate"
    llava = build_model("llava", build_processor("llava"))
    assert token_loop.unfit_model(llava, {}) == "LlavaForConditionalGeneration is a vision-language model"


def test_rollout_loop_is_validated_before_any_model_loads():
    assert CHOICES["rollout.loop"] == token_loop.LOOPS
    with pytest.raises(ConfigError, match="rollout.loop"):
        load_config("tiny", ["rollout.loop=mine"])


def test_evaluation_decodes_as_the_runs_rollouts_do(student, loop_calls):
    """eval and the before/after accuracy take rollout.fast, .sampler and .loop from the config."""
    cfg, tok, model = student
    samples = arith.make_samples(4, 0, digits=2)
    adapter = TextAdapter(tok, cfg.privileged, 256)
    for loop, expected in (("transformers", 0), ("auto", 1)):
        run = load_config("tiny", [f"rollout.loop={loop}", "rollout.fast=off"])
        assert decoding(run.rollout) == {"fast": "off", "sampler": "auto", "loop": loop}
        accuracy(adapter, model, samples, batch_size=4, max_new_tokens=4, decode=decoding(run.rollout))
        assert len(loop_calls) == expected
