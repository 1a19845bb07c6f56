"""The inverse-CDF sampler: each draw is the brute-force first id whose cumulative mass exceeds the
uniform, the draws follow the distribution (through transformers' generate, with the warpers
rollouts use), ids without mass are never drawn, and rollouts use it where rollout.sampler says."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from mmdistill.adapters.text import TextAdapter
from mmdistill.config import load_config
from mmdistill.config.validation import CHOICES
from mmdistill.models import sampling, token_loop
from mmdistill.models.loading import load_model, load_tokenizer
from mmdistill.models.sampling import SAMPLERS, InverseCDFSampler, inverse_cdf_generation, uses_inverse_cdf
from mmdistill.tasks import arith


def test_each_draw_is_the_brute_force_inverse_cdf():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 9, generator=g) * 2
    scores[::3, 4] = float("-inf")  # ids without mass in some rows
    torch.manual_seed(1)
    out = InverseCDFSampler()(None, scores.clone())
    torch.manual_seed(1)
    uniforms = torch.rand(64, 1, dtype=torch.float64)[:, 0].tolist()
    for row, score_row, u in zip(out, scores, uniforms):
        p = torch.softmax(score_row.float(), -1).double().tolist()
        target, acc, expected = u * math.fsum(p), 0.0, None
        for i, pi in enumerate(p):
            acc += pi
            if acc > target:
                expected = i
                break
        assert row.isfinite().sum() == 1 and int(row.argmax()) == expected and row[expected] == 0


def test_draws_follow_the_distribution_and_never_take_an_id_without_mass():
    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    scores = p.log().expand(200_000, -1).clone()
    torch.manual_seed(0)
    drawn = InverseCDFSampler()(None, scores).argmax(-1)
    freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    assert freq[1] == 0
    sigma = (p.double() * (1 - p.double()) / drawn.numel()).sqrt()
    assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all(), (freq, p)


def test_a_row_with_one_id_left_always_draws_it():
    scores = torch.full((100, 7), float("-inf"))
    scores[:, 6] = 3.0
    assert (InverseCDFSampler()(None, scores).argmax(-1) == 6).all()


def test_the_greedy_config_carries_temperature_and_top_p_in_transformers_order():
    gen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=3)
    greedy, processors = inverse_cdf_generation(gen)
    assert not greedy.do_sample and greedy.temperature is None and greedy.top_p is None and gen.do_sample
    assert [type(p) for p in processors] == [TemperatureLogitsWarper, TopPLogitsWarper, InverseCDFSampler]
    _, plain = inverse_cdf_generation(GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0))
    assert [type(p) for p in plain] == [InverseCDFSampler]
    with pytest.raises(ValueError, match="rollout.sampler=multinomial"):
        inverse_cdf_generation(GenerationConfig(do_sample=True, top_k=5))


def test_auto_is_the_inverse_cdf_on_the_cpu_only():
    assert uses_inverse_cdf("auto", torch.device("cpu")) and not uses_inverse_cdf("auto", torch.device("cuda"))
    assert uses_inverse_cdf("inverse_cdf", torch.device("cuda"))
    assert not uses_inverse_cdf("multinomial", torch.device("cpu"))
    assert CHOICES["rollout.sampler"] == SAMPLERS


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    tok = load_tokenizer(cfg.student)
    model = load_model(cfg.student, tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # a first token with spread-out mass
    return cfg, tok, model


def _first_tokens(cfg, tok, model, sampler, rows, seed, **kw):
    adapter = TextAdapter(tok, cfg.privileged, 128)
    torch.manual_seed(seed)
    settings = OmegaConf.create({**dict(max_new_tokens=1, temperature=0.7, top_p=0.9, num_rollouts=rows, fast="off",
                                        sampler=sampler), **kw})
    batch = adapter.rollout(model, arith.make_samples(1, 0, digits=2), settings)
    return adapter, batch.response_ids[:, 0]


def test_rollouts_through_generate_draw_what_multinomial_draws_in_distribution(tiny):
    """One prompt, 6,000 rollouts of one token at temperature 0.7 and top-p 0.9: both samplers'
    frequencies agree with the warped distribution transformers samples from, within 5 sigma."""
    cfg, tok, model = tiny
    adapter, _ = _first_tokens(cfg, tok, model, "multinomial", 1, 0)
    prompt = adapter.encode(adapter.prepare(arith.make_samples(1, 0, digits=2)), None, "student", torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=prompt.ids, attention_mask=prompt.attn).logits[:, -1].float()
    warped = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits))
    p = torch.softmax(warped, -1)[0].double()
    assert (p > 0.01).sum() >= 3  # a test of a spread, not of one certain token
    n = 6000
    for sampler in ("multinomial", "inverse_cdf"):
        _, ids = _first_tokens(cfg, tok, model, sampler, n, 1)
        freq = torch.bincount(ids, minlength=p.numel()).double() / n
        assert (freq[p == 0] == 0).all(), sampler
        sigma = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-9).all(), sampler


@pytest.mark.parametrize("loop", ["auto", "transformers"])
def test_rollouts_on_the_cpu_sample_by_inverse_cdf_unless_asked_otherwise(tiny, monkeypatch, loop):
    cfg, tok, model = tiny
    calls = []
    real = sampling.inverse_cdf_draw

    def counted(scores):
        calls.append(1)
        return real(scores)

    monkeypatch.setattr(sampling, "inverse_cdf_draw", counted)  # transformers' generate, through the processor
    monkeypatch.setattr(token_loop, "inverse_cdf_draw", counted)  # mmdistill's loop
    _, auto_a = _first_tokens(cfg, tok, model, "auto", 8, 3, loop=loop)
    assert calls
    _, auto_b = _first_tokens(cfg, tok, model, "auto", 8, 3, loop=loop)
    assert torch.equal(auto_a, auto_b)  # the same seed, the same draws
    calls.clear()
    _first_tokens(cfg, tok, model, "multinomial", 8, 3, loop=loop)
    assert not calls
    _first_tokens(cfg, tok, model, "auto", 8, 3, temperature=0.0, loop=loop)  # greedy: nothing to draw
    assert not calls
