import math
import random
import re

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from mmdistill.adapters.scoring import Views
from mmdistill.adapters.text import (
    ContextTooLong,
    TemplateError,
    TextAdapter,
    check_template,
    cut_prefix,
    left_pad,
    response_mask,
)
from mmdistill.config import load_config
from mmdistill.core.batch import Batch
from mmdistill.models.loading import check_same_vocab, load_model
from mmdistill.tasks.arith import make_samples
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


def brute_cut_whitespace(text, ratio):
    """The shortest prefix of at least ceil(ratio * len) characters that ends at a whitespace or
    at the end of a run of non-whitespace, right-stripped."""
    if ratio >= 1.0 or len(re.findall(r"\S+", text)) <= 2:
        return text
    n = math.ceil(ratio * len(text))
    if n == 0:
        return ""
    ends = [k for k in range(1, len(text) + 1) if k == len(text) or text[k - 1].isspace() or text[k].isspace()]
    return text[: min(k for k in ends if k >= n)].rstrip()


def brute_cut_release(text, ratio):
    """The AR-OPD release's cut as a set of allowed ends: on the stripped text, the shortest prefix
    of at least max(1, ceil(ratio * len)) characters that does not end between two word characters
    (str.isalnum(), "_" and the backslash; Python's \\w is isalnum() or "_"), right-stripped."""
    t = text.strip()
    if ratio >= 1.0 or len(re.findall(r"\S+", t)) <= 2:
        return t

    def word(c):
        return c.isalnum() or c in "_\\"

    n = max(1, math.ceil(ratio * len(t)))
    ends = [k for k in range(1, len(t) + 1) if k == len(t) or not (word(t[k - 1]) and word(t[k]))]
    return t[: min(k for k in ends if k >= n)].rstrip()


RATIOS = [k / 20 for k in range(21)] + [1e-9, 0.333]


@pytest.mark.parametrize(
    "text,ratio,release,whitespace",
    [
        ("", 0.5, "", ""),  # empty text
        ("   \n", 0.5, "", "   \n"),  # only whitespace: no words, kept (stripped by the release)
        ("alpha beta gamma delta", 0.0, "alpha", ""),  # rho 0: at least one character, then its word
        ("alpha beta gamma delta", 1e-9, "alpha", "alpha"),
        ("alpha beta gamma delta", 1.0, "alpha beta gamma delta", "alpha beta gamma delta"),
        ("  alpha beta gamma delta \n", 1.0, "alpha beta gamma delta", "  alpha beta gamma delta \n"),
        ("alpha beta gamma delta", 0.3, "alpha beta", "alpha beta"),  # 7 chars land inside "beta"
        ("alpha beta gamma delta", 0.5, "alpha beta", "alpha beta"),  # 11 chars end on a space
        ("\n\n  alpha beta gamma  ", 0.5, "alpha beta", "\n\n  alpha beta"),  # the release strips first
        ("one", 0.0, "one", "one"),  # one word, or two, are kept whole
        ("  one  ", 0.5, "one", "  one  "),
        ("two words", 0.1, "two words", "two words"),
        ("x = 3.14159 and more", 0.3, "x = 3.", "x = 3.14159"),  # punctuation stops the release's cut
        ("x = 3.14159 and more", 0.0, "x", ""),
        ("(a) b c d", 0.0, "(", ""),  # a first character that is no word character stays alone
        ("(a) b c d", 0.2, "(a", "(a)"),
        ("\\frac{1}{2} is one half", 0.0, "\\frac", ""),  # backslashes are word characters
        ("\\frac{1}{2} is one half", 0.3, "\\frac{1", "\\frac{1}{2}"),
        ("see \\alpha\\beta now ok", 0.3, "see \\alpha\\beta", "see \\alpha\\beta"),
        ("αβγ δεζ ηθι", 0.0, "αβγ", ""),  # Unicode letters are word characters
        ("αβγ δεζ ηθι", 0.5, "αβγ δεζ", "αβγ δεζ"),
        ("naïve café façade ok", 0.25, "naïve", "naïve"),
        ("a, b, c, d", 0.4, "a, b", "a, b,"),
    ],
)
def test_cut_prefix_rules_on_edge_cases(text, ratio, release, whitespace):
    assert cut_prefix(text, ratio, "release") == release == brute_cut_release(text, ratio)
    assert cut_prefix(text, ratio, "whitespace") == whitespace == brute_cut_whitespace(text, ratio)
    assert cut_prefix(text, ratio) == whitespace  # the default rule


def test_cut_prefix_rules_equal_brute_force_on_random_strings():
    """Strings over word characters (ASCII, digit, Unicode, backslash), punctuation and whitespace."""
    rng = random.Random(0)
    alphabet = "ab1é\\.{}+  \n\t"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(3000)]
    texts += [" ".join(texts[i].split()) for i in range(0, 3000, 3)]  # fewer stray blanks: more 3+ word texts
    cut = 0
    for text in texts:
        for ratio in RATIOS:
            got = cut_prefix(text, ratio, "release")
            assert got == brute_cut_release(text, ratio), (text, ratio)
            assert cut_prefix(text, ratio, "whitespace") == brute_cut_whitespace(text, ratio), (text, ratio)
            assert got.strip() == got and (got or not text.strip())  # never empty unless there is no text
            cut += got != text.strip()
    assert cut > 10000  # the data really exercise cuts, not only the keep-whole rules


def test_cut_prefix_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        cut_prefix("a b c", 0.5, "words")


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
         "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]}
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
    t.chat_template = tok.chat_template.replace("<|im_start|>assistant\n{% endif %}",
                                                "<|im_start|>assistant\nSure! {% endif %}")
    with pytest.raises(TemplateError, match="not where the rendered assistant turn begins"):
        check_template(t)
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
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


def test_partial_cut_setting_reaches_the_partial_view(tok, cfg):
    s = {"id": "c", "prompt": "Q?", "reasoning": "x = 3.14159 and more", "answer": "7"}
    views = {}
    for rule in ("whitespace", "release"):
        priv = OmegaConf.merge(cfg.privileged, {"text": "{reasoning}", "partial_field": "reasoning",
                                                "partial_ratio": 0.3, "partial_cut": rule})
        ad = TextAdapter(tok, priv, 128)
        views[rule] = ad.messages(s, "partial")[0]["content"]
        assert ad.messages(s, "full")[0]["content"] == "Q?\nHint: x = 3.14159 and more"
    assert views == {"whitespace": "Q?\nHint: x = 3.14159", "release": "Q?\nHint: x = 3."}


# The AR-OPD release's teacher prompt (code/scripts/build_dual_numina_asft_dataset.py, TEACHER_TEMPLATE
# and build_xml_trace), written out: the oracle trace as an example response.
RELEASE_TEACHER_PROMPT = ("{question}\n\nThis is an example for a response to the question:\n"
                          "<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n\n"
                          "Now answer with a response of your own, including the thinking process.")


def test_ar_opd_release_preset_renders_the_releases_prompts(tok):
    cfg = load_config("ar_opd_release")
    assert cfg.privileged.partial_cut == "release" and cfg.privileged.partial_ratio == 0.5
    ad = TextAdapter(tok, cfg.privileged, 512)
    samples = make_samples(20, 0, digits=3) + [
        {"id": "r", "system": "Answer in tags.", "prompt": "Integrate.", "answer": "\\frac{1}{2}",
         "reasoning": "We have \\int_0^1 x\\,dx = \\frac{x^2}{2} evaluated from 0 to 1, which is 1/2."}]
    cut_differs = 0
    for s in samples:
        msgs = {lvl: ad.messages(s, lvl) for lvl in (None, "full", "partial")}
        head = [{"role": "system", "content": s["system"]}] if "system" in s else []
        assert msgs[None] == head + [{"role": "user", "content": s["prompt"]}]
        partial = brute_cut_release(s["reasoning"], 0.5)
        assert msgs["full"] == head + [{"role": "user", "content": RELEASE_TEACHER_PROMPT.format(
            question=s["prompt"], reasoning=s["reasoning"], answer=s["answer"])}]
        assert msgs["partial"] == head + [{"role": "user", "content": RELEASE_TEACHER_PROMPT.format(
            question=s["prompt"], reasoning=partial, answer=s["answer"])}]
        assert 0 < len(partial) < len(s["reasoning"])
        cut_differs += partial != cut_prefix(s["reasoning"], 0.5)
        texts = [ad.prompt_texts([s], lvl)[0] for lvl in (None, "full", "partial")]  # through the chat template
        assert ("<reasoning>" not in texts[0] and f"<answer>\n{s['answer']}\n</answer>" in texts[1]
                and texts[1] != texts[2])
    assert cut_differs  # the release's rule, not mmdistill's default, made the partial views


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
