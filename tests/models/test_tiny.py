"""Smoke tests for the tiny native-VLM test families in ``mmdistill/models/tiny.py``."""

from __future__ import annotations

import pytest
import torch

import mmdistill.models.tiny as vf

PROMPTS = ("Hi", "What is shown in these pictures? Please answer in a few words.")
# sample 0: one 48x32 image; sample 1: two images (64x64 and 32x32) -> different sizes,
# different image counts and different prompt lengths (left padding exercised).
IMAGE_SIZES = ([(48, 32)], [(64, 64), (32, 32)])


@pytest.fixture(scope="module")
def tokenizer():
    return vf.build_tokenizer()


_CACHE: dict[str, tuple] = {}


@pytest.fixture
def family_objs(tokenizer, request):
    family = request.param
    if family not in _CACHE:
        processor = vf.build_processor(family, tokenizer)
        _CACHE[family] = (processor, vf.build_model(family, processor, seed=0))
    return (family, *_CACHE[family])


def _batch(processor, **kwargs):
    texts = [
        processor.apply_chat_template(vf.user_message(t, len(s)), add_generation_prompt=True, tokenize=False)
        for t, s in zip(PROMPTS, IMAGE_SIZES)
    ]
    images = [[vf.make_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(s)] for i, s in enumerate(IMAGE_SIZES)]
    return processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)


def test_shared_vocab_and_image_token_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == 512 + len(vf.VISION_TOKENS)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    for family in vf.FAMILIES:
        processor = vf.build_processor(family)  # fresh tokenizer
        assert processor.tokenizer.get_vocab() == vocab, family
        cfg = vf.build_config(family, processor)
        image_id = cfg.image_token_index if family == "llava" else cfg.image_token_id
        assert image_id == processor.image_token_id == tokenizer.convert_tokens_to_ids(vf.IMAGE_TOKEN[family])
        text_cfg = cfg.get_text_config()
        assert text_cfg.vocab_size == len(tokenizer)
        assert text_cfg.eos_token_id == tokenizer.eos_token_id
        assert text_cfg.pad_token_id == tokenizer.pad_token_id
    # building processors never mutates the tokenizer passed in
    assert tokenizer.get_vocab() == vocab and len(tokenizer.all_special_tokens) == 3 + len(vf.VISION_TOKENS)


@pytest.mark.parametrize("family_objs", vf.FAMILIES, indirect=True)
def test_chat_template(family_objs, tokenizer):
    family, processor, _ = family_objs
    msgs = [{"role": "system", "content": "Be brief."}] + vf.user_message("Q?", 2)
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(msgs + [{"role": "assistant", "content": "A!"}], tokenize=False)
    ph = vf.IMAGE_PLACEHOLDER[family]
    assert prompt == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{ph}{ph}Q?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert full == prompt + "A!<|im_end|>\n"
    # plain-string conversations render exactly like the shipped tokenizer template
    text_msgs = [{"role": "user", "content": "2+2?"}]
    assert processor.apply_chat_template(
        text_msgs, add_generation_prompt=True, tokenize=False
    ) == tokenizer.apply_chat_template(text_msgs, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("family_objs", vf.FAMILIES, indirect=True)
def test_forward_generate_and_scoring_alignment(family_objs):
    family, processor, model = family_objs
    batch = _batch(processor, padding_side="left")
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0].all()  # left padded, prompts of different length
    image_id = processor.tokenizer.convert_tokens_to_ids(vf.IMAGE_TOKEN[family])
    n_tokens = (batch["input_ids"] == image_id).sum(-1).tolist()
    assert all(4 <= n // len(s) <= 16 for n, s in zip(n_tokens, IMAGE_SIZES)), n_tokens

    with torch.no_grad():
        logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
        out = model.generate(
            **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        prompt_len = batch["input_ids"].shape[1]
        assert out.sequences.shape == (2, prompt_len + 4)
        torch.testing.assert_close(out.logits[0], logits[:, -1], atol=1e-4, rtol=0)
        # one forward over prompt + completion reproduces the generate logits
        full = model(**vf.full_sequence_inputs(family, batch, out.sequences)).logits
    gen = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(full[:, prompt_len - 1 : -1], gen, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family_objs", vf.FAMILIES, indirect=True)
def test_save_and_reload(family_objs, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, processor, model = family_objs
    vf.save_family(family, tmp_path, seed=0)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(processor2) is type(processor) and type(model2) is type(model)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor2.tokenizer.padding_side == "left"
    assert model2.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    batch, batch2 = _batch(processor), _batch(processor2)
    assert batch.keys() == batch2.keys()
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model2(**batch2).logits, model(**batch).logits, atol=0, rtol=0)
