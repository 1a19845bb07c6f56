import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from mmdistill.adapters.text import (
    ContextTooLong,
    TemplateError,
    TextAdapter,
    check_template,
    cut_prefix,
    left_pad,
    response_mask,
)
from mmdistill.core.batch import Batch
from mmdistill.config import load_config
from mmdistill.models.loading import check_same_vocab, load_model
from mmdistill.tasks.arith import make_samples
from mmdistill.adapters.scoring import Views
from tests.helpers import rollout_cfg


@pytest.fixture(scope="module")
def model(cfg, tok):
    return load_model(cfg.student, tok, seed=0).eval()


@pytest.fixture()
def adapter(cfg, tok):
    return TextAdapter(tok, cfg.privileged, max_length=128)


@pytest.fixture(scope="module")
def samples():
    s = make_samples(4, 0, digits=2)
    s[1] = dict(s[1], prompt=s[1]["prompt"] + " Take care with each digit, please.")  # uneven prompt lengths
    return s


# -- pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,ratio,expected",
    [
        ("alpha beta gamma delta", 0.5, "alpha beta"),  # 11 chars end on a space
        ("alpha beta gamma delta", 0.3, "alpha beta"),  # 7 chars land inside "beta": extend to its end
        ("alpha beta gamma delta", 0.55, "alpha beta gamma"),
        ("alpha beta gamma delta", 0.0, ""),
        ("alpha beta gamma delta", 1.0, "alpha beta gamma delta"),
        ("alpha beta gamma delta", 0.25, "alpha"),  # 6 chars = "alpha "
        ("two words", 0.1, "two words"),
        ("one", 0.5, "one"),
    ],
)
def test_cut_prefix(text, ratio, expected):
    assert cut_prefix(text, ratio) == expected


def test_cut_prefix_brute_force():
    import math
    import re

    text = "The ones  give 7+8=15, so write 5 and carry 1 into the tens."
    word_ends = [m.end() for m in re.finditer(r"\S+", text)]
    for k in range(1, 40):
        ratio = k / 40
        n = math.ceil(ratio * len(text))
        prefix = text[:n]
        if prefix[-1].isspace():
            expected = prefix.rstrip()
        else:
            expected = text[: min(e for e in word_ends if e >= n)]
        assert cut_prefix(text, ratio) == expected, ratio


def test_response_mask_brute_force():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 5, 5, 5, 5]])
    got = response_mask(ids, [eos])
    for i, row in enumerate(ids.tolist()):
        first = row.index(eos) if eos in row else len(row) - 1
        assert got[i].tolist() == [j <= first for j in range(len(row))]


def test_left_pad():
    ids, attn = left_pad([[1, 2, 3], [4]], 0, torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1]]


# -- prompts -------------------------------------------------------------------------------


def test_privileged_prompts(adapter, samples):
    s = samples[0]
    plain, full, part = (adapter.messages(s, lvl) for lvl in (None, "full", "partial"))
    assert plain == [{"role": "user", "content": s["prompt"]}]
    assert full[0]["content"] == f"{s['prompt']}\nHint: {s['hint']}"
    assert part[0]["content"] == f"{s['prompt']}\nHint: {cut_prefix(s['hint'], 0.5)}"
    assert len(part[0]["content"]) < len(full[0]["content"])


def test_messages_and_system(adapter):
    s = {"id": "m", "system": "Be brief.", "hint": "h1",
         "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}
    full = adapter.messages(s, "full")
    assert full[0] == {"role": "system", "content": "Be brief."}
    assert full[1]["content"] == "a" and full[3]["content"] == "c\nHint: h1"  # spliced into the LAST user turn
    assert s["messages"][2]["content"] == "c"  # the sample is not mutated


def test_empty_hint_gives_plain_prompt(adapter, samples):
    s = dict(samples[0], hint="  ")
    assert adapter.prompt_ids([s], "full") == adapter.prompt_ids([s], None)


def test_missing_field_names_sample(adapter):
    with pytest.raises(KeyError, match="sample 'x1' has no field 'hint'"):
        adapter.prompt_ids([{"id": "x1", "prompt": "hi"}], "full")
    with pytest.raises(KeyError, match="sample 'x2' has no field 'prompt'"):
        adapter.prompt_ids([{"id": "x2"}], None)


def test_template_dropping_privileged_text_is_caught(tok, cfg):
    priv = OmegaConf.merge(cfg.privileged, {"template": "{prompt}"})  # forgets {privileged}
    ad = TextAdapter(tok, priv, 128)
    with pytest.raises(TemplateError, match="dropped the privileged text"):
        ad.prompt_ids([{"id": "s", "prompt": "2+2?", "hint": "four"}], "full")


def test_broken_chat_templates(tok):
    t = tok.__class__.from_pretrained(tok.name_or_path)
    t.chat_template = tok.chat_template.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nSure! {% endif %}")
    with pytest.raises(TemplateError, match="not where the rendered assistant turn begins"):
        check_template(t)
    t.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(TemplateError):
        check_template(t)
    check_template(tok)


def test_vocab_mismatch(tok):
    other = tok.__class__.from_pretrained(tok.name_or_path)
    other.add_tokens(["<extra>"])
    check_same_vocab(tok, tok, "same")
    with pytest.raises(ValueError, match="vocab mismatch"):
        check_same_vocab(tok, other, "test")


def test_context_too_long_is_an_error_not_a_cut(tok, cfg, model, samples):
    ad = TextAdapter(tok, cfg.privileged, max_length=20)
    with pytest.raises(ContextTooLong, match=f"sample '{samples[0]['id']}'"):
        ad.rollout(model, samples[:1], rollout_cfg(max_new_tokens=16))


# -- rollouts ------------------------------------------------------------------------------


def test_rollout_shapes_eos_and_padding(adapter, model, samples, tok):
    torch.manual_seed(0)
    b = adapter.rollout(model, samples, rollout_cfg(num_rollouts=2))
    assert b.response_ids.shape[0] == 8 and b.response_ids.shape[1] <= 16
    assert [s["id"] for s in b.samples] == [s["id"] for s in samples for _ in range(2)]
    for ids, mask in zip(b.response_ids.tolist(), b.response_mask.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n)  # a prefix
        assert tok.eos_token_id not in ids[: n - 1]  # no EOS before the end
        assert all(t == tok.pad_token_id for t in ids[n:])


def test_rollout_is_seeded_and_greedy_is_deterministic(adapter, model, samples):
    torch.manual_seed(3)
    a = adapter.rollout(model, samples, rollout_cfg())
    torch.manual_seed(3)
    b = adapter.rollout(model, samples, rollout_cfg())
    assert torch.equal(a.response_ids, b.response_ids)
    g1 = adapter.rollout(model, samples, rollout_cfg(temperature=0.0))
    g2 = adapter.rollout(model, samples, rollout_cfg(temperature=0.0))
    assert torch.equal(g1.response_ids, g2.response_ids)
    # greedy picks the argmax of the scored distribution at every real position
    lp = adapter.logits(model, g1, None, grad=False)
    assert torch.equal(lp.argmax(-1)[g1.response_mask], g1.response_ids[g1.response_mask])


def test_rollout_stops_at_eos(tok, cfg, samples):
    m = load_model(cfg.student, tok, seed=0).eval()
    head = torch.nn.Linear(m.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 40.0
    m.lm_head = head  # a model that always wants to stop
    ad = TextAdapter(tok, cfg.privileged, 128)
    b = ad.rollout(m, samples, rollout_cfg(max_new_tokens=10))
    assert b.response_ids.shape == (len(samples), 1)
    assert (b.response_ids[:, 0] == tok.eos_token_id).all() and b.response_mask.all()


# -- scoring -------------------------------------------------------------------------------


def test_scoring_matches_generate_logits(adapter, model, samples, tok):
    """The scored log-probs are the ones the sampler saw (padding and positions line up)."""
    prompts = adapter.prompt_ids(samples, None)
    ids, attn = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    gen = GenerationConfig(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    resp = out.sequences[:, ids.shape[1]:]
    mask = response_mask(resp, [tok.eos_token_id])
    batch = Batch(resp.masked_fill(~mask, tok.pad_token_id), mask, samples)
    lp = adapter.logits(model, batch, None, grad=False).log_softmax(-1)
    ref = torch.stack(out.logits, 1)[:, : lp.shape[1]].log_softmax(-1)
    assert torch.allclose(lp[mask], ref[mask], atol=1e-5)


def test_batched_scoring_equals_one_by_one(adapter, model, samples):
    torch.manual_seed(1)
    b = adapter.rollout(model, samples, rollout_cfg())
    for level in (None, "full", "partial"):
        lp = adapter.logits(model, b, level, grad=False)
        assert lp.shape == (*b.response_ids.shape, adapter.vocab_size)
        for i in range(len(samples)):
            n = int(b.response_mask[i].sum())
            one = Batch(b.response_ids[i : i + 1, :n], b.response_mask[i : i + 1, :n], b.samples[i : i + 1])
            ref = adapter.logits(model, one, level, grad=False)
            assert torch.allclose(lp[i, :n], ref[0], atol=1e-5), (level, i)


def test_views_share_the_response_and_only_student_has_grad(adapter, cfg, tok, samples):
    student = load_model(cfg.student, tok, seed=0)
    teacher = load_model(cfg.teacher.model, tok, seed=1).eval().requires_grad_(False)
    torch.manual_seed(0)
    b = adapter.rollout(student, samples, rollout_cfg())
    views = Views(adapter, b, student, teacher)
    assert views["student"].requires_grad
    for name in ("student_priv", "teacher_full", "teacher_partial", "teacher_plain"):
        assert views[name].shape == views["student"].shape
        assert not views[name].requires_grad
    assert not torch.allclose(views["teacher_full"], views["teacher_plain"])  # the hint changes the teacher
    assert not torch.allclose(views["student_priv"], views["student"])
    assert views["student"] is views["student"]  # cached, scored once
    with pytest.raises(KeyError, match="unknown view"):
        views["teacher"]
    with pytest.raises(ValueError, match="needs a teacher"):
        Views(adapter, b, student, None)["teacher_plain"]


def test_student_priv_equals_student_with_empty_hint(adapter, cfg, tok, samples):
    student = load_model(cfg.student, tok, seed=0)
    empty = [dict(s, hint="") for s in samples]
    torch.manual_seed(0)
    b = adapter.rollout(student, empty, rollout_cfg())
    views = Views(adapter, b, student, None)
    assert torch.equal(views["student_priv"], views["student"].detach())


def test_oracle_batch(adapter, tok, samples):
    b = adapter.oracle_batch(samples)
    assert not b.on_policy
    for i, s in enumerate(samples):
        n = int(b.response_mask[i].sum())
        ids = b.response_ids[i, :n].tolist()
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == s["response"]


def test_ar_opd_preset_views(tok):
    """Full view: the whole oracle trace; partial: reasoning cut to half on a word boundary, answer kept."""
    cfg = load_config("ar_opd")
    ad = TextAdapter(tok, cfg.privileged, 128)
    s = make_samples(1, 0, digits=3)[0]
    full = ad.messages(s, "full")[0]["content"]
    part = ad.messages(s, "partial")[0]["content"]
    assert full == f"{s['prompt']}\nExample solution: {s['reasoning']}\nAnswer: {s['answer']}"
    assert part == f"{s['prompt']}\nExample solution: {cut_prefix(s['reasoning'], 0.5)}\nAnswer: {s['answer']}"
    assert len(cut_prefix(s["reasoning"], 0.5)) < len(s["reasoning"])


def test_prompt_share_gives_a_fixed_share_of_plain_prompts_the_privileged_text(tok, cfg):
    """For a teacher's SFT recipe: the same samples (by id) always carry p, about `share` of them."""
    priv = OmegaConf.merge(cfg.privileged, {"prompt_share": 0.5})
    ad, plain = TextAdapter(tok, priv, 128), TextAdapter(tok, cfg.privileged, 128)
    samples = make_samples(200, 0, digits=2)
    with_p = [ad.messages(s, None) == plain.messages(s, "full") for s in samples]
    assert 0.4 < sum(with_p) / len(samples) < 0.6
    assert all(ad.messages(s, None) == plain.messages(s, None) for s, w in zip(samples, with_p) if not w)
    assert with_p == [ad.messages(s, None) == plain.messages(s, "full") for s in samples]  # deterministic
    assert all(ad.messages(s, "full") == plain.messages(s, "full") for s in samples[:20])


def test_evaluation_scores_the_deployed_student_whatever_the_prompt_share(tok, cfg, model, samples):
    """An SFT recipe's prompt_share puts p into plain prompts for training only: the before/after
    accuracy and `mmdistill eval` must read the prompts the deployed student gets."""
    from mmdistill.evaluation.evaluate import responses

    ad = TextAdapter(tok, OmegaConf.merge(cfg.privileged, {"prompt_share": 1.0}), 128)
    plain = TextAdapter(tok, cfg.privileged, 128)
    seen, build = [], ad.prompt_texts
    ad.prompt_texts = lambda s, level, policy="student": seen.extend(build(s, level, policy)) or build(s, level, policy)
    responses(ad, model, samples, batch_size=4, max_new_tokens=2)
    assert seen and seen == plain.prompt_texts(samples, None)
    assert build(samples, None) == plain.prompt_texts(samples, "full") != plain.prompt_texts(samples, None)  # restored
    seen.clear()
    responses(ad, model, samples, batch_size=4, max_new_tokens=2, level="full")
    assert set(plain.prompt_texts(samples, "full")) <= set(seen)  # the privileged views keep p
