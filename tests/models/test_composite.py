"""Composite VLMs: a tiny timm or open_clip tower + projector + a tiny random Llama."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from transformers import AutoTokenizer

from mmdistill.config import REPO_ROOT
from mmdistill.models.composite import IMAGE_TOKEN, CompositeProcessor, CompositeVLM, build_composite

TOWERS = {
    "timm": {"source": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
             "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "open_clip": {"source": "open_clip", "name": "ViT-B-32", "image_size": 32,
                  "kwargs": {"width": 32, "layers": 1, "patch_size": 8, "image_size": 32, "head_width": 16}},
}
RAW_TOKENS = {"timm": 17, "open_clip": 16}  # 4x4 patches, plus timm's CLS


def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "assets/tokenizer")


LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
# Learned absolute positions: unlike RoPE, a per-row shift of positions changes its logits.
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 256}


def build(source="timm", projector="linear", pool=0, seed=0, tie=False, lm=LLAMA, **spec):
    tok = tokenizer()
    lm_config = {**lm, "vocab_size": len(tok), "tie_word_embeddings": tie}
    spec = {"tower": dict(TOWERS[source]), "projector": {"type": projector, "pool_tokens": pool}, **spec}
    return build_composite(spec, tok, lm_config=lm_config, seed=seed)


def image(seed, size=(40, 50)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def prompts(proc, questions=("what is this?", "describe the picture in a few more words please")):
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    return [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]


def batch(proc, seeds=(1, 2)):
    return proc(prompts(proc), images=[[image(s)] for s in seeds])


@pytest.mark.parametrize("source", ["timm", "open_clip"])
def test_image_rows_are_replaced(source):
    model, proc = build(source)
    model.eval()
    a, b = batch(proc, (1, 2)), batch(proc, (3, 2))  # only sample 0's image differs
    la, lb = model(**a).logits, model(**b).logits
    first = int((a["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert torch.equal(la[0, :first], lb[0, :first])
    assert (la[0, first:] - lb[0, first:]).abs().amax(-1).min() > 0
    assert torch.equal(la[1], lb[1])


@pytest.mark.parametrize("source", ["timm", "open_clip"])
def test_grad_mode_does_not_change_the_logits(source):
    """Rollouts run under no_grad, scoring with grad: both must give the same numbers bit for bit
    (open_clip's nn.MultiheadAttention has a no_grad-only fused path)."""
    model, proc = build(source)
    model.eval()
    feats = batch(proc)
    with torch.no_grad():
        fast = model(**feats).logits
    assert torch.equal(fast, model(**feats).logits.detach())
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


def test_count_mismatch_raises():
    model, proc = build()
    feats = batch(proc)
    with pytest.raises(ValueError, match="image tokens but 1 images"):
        model(feats["input_ids"], attention_mask=feats["attention_mask"], pixel_values=feats["pixel_values"][:1])
    with pytest.raises(ValueError, match="text 1 has 1 <image> tokens but 0 images"):
        proc(prompts(proc), images=[[image(1)], []])


@pytest.mark.parametrize("source", ["timm", "open_clip"])
def test_pooling_sets_the_token_count(source):
    assert build(source)[0].config.num_image_tokens == RAW_TOKENS[source]
    model, proc = build(source, pool=4)
    assert model.config.num_image_tokens == proc.num_image_tokens == 4
    assert model.image_features(torch.zeros(3, 3, 32, 32)).shape == (3, 4, 32)
    feats = batch(proc)
    assert (feats["input_ids"] == model.config.image_token_id).sum(-1).tolist() == [4, 4]
    with pytest.raises(ValueError, match="exceeds the tower's"):
        build(source, pool=64)


@pytest.mark.parametrize("source,lm", [("timm", LLAMA), ("open_clip", LLAMA), ("timm", GPT2)],
                         ids=["timm", "open_clip", "gpt2"])
def test_generate_logits_match_a_full_forward(source, lm):
    """Rollout and scoring must agree: one forward over prompt + response with the adapter's
    left-padding positions gives generate's per-step logits."""
    model, proc = build(source, lm=lm)
    model.eval()
    feats = batch(proc)
    assert feats["attention_mask"][:, 0].tolist() == [0, 1]  # left-padded, different lengths
    out = model.generate(**feats, max_new_tokens=8, min_new_tokens=8, do_sample=True, output_logits=True,
                         output_scores=True, return_dict_in_generate=True)
    n_prompt = feats["input_ids"].shape[1]
    assert out.sequences.shape == (2, n_prompt + 8)
    assert torch.equal(out.sequences[:, :n_prompt], feats["input_ids"])
    mask = torch.cat([feats["attention_mask"], torch.ones(2, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       pixel_values=feats["pixel_values"]).logits
    torch.testing.assert_close(logits[:, n_prompt - 1 : -1], torch.stack(out.logits, 1), atol=1e-5, rtol=0)
    # the image token is never sampled: a response holding one could not be scored
    assert torch.stack(out.scores, 1)[..., model.config.image_token_id].eq(-float("inf")).all()


@pytest.mark.parametrize("source,tie", [("timm", False), ("open_clip", True)])
def test_save_and_load_roundtrip(tmp_path, source, tie):
    model, proc = build(source, projector="mlp", pool=4, tie=tie, freeze_tower=True)
    model.eval()
    feats = batch(proc)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mmdistill_composite"
    assert saved["tower"]["name"] == TOWERS[source]["name"] and saved["text_config"]["model_type"] == "llama"
    loaded, proc2 = CompositeVLM.from_pretrained(tmp_path), CompositeProcessor.from_pretrained(tmp_path)
    loaded.eval()
    feats2 = batch(proc2)
    assert (torch.equal(feats["input_ids"], feats2["input_ids"])
            and torch.equal(feats["pixel_values"], feats2["pixel_values"]))
    with torch.no_grad():
        assert torch.equal(model(**feats).logits, loaded(**feats2).logits)
    assert not any(p.requires_grad for p in loaded.tower.parameters())
    assert all(p.requires_grad for p in loaded.lm.parameters())
    assert loaded.lm.config.tie_word_embeddings == tie


def test_tower_weights_from_a_local_file(tmp_path):
    source_model, _ = build("timm", seed=1)
    path = tmp_path / "tower.safetensors"
    safetensors.torch.save_file({f"module.{k}": v.contiguous() for k, v in source_model.tower.state_dict().items()},
                                path)
    model, _ = build("timm", seed=2, **{"tower": {**TOWERS["timm"], "weights": str(path)}})
    assert all(torch.equal(v, source_model.tower.state_dict()[k]) for k, v in model.tower.state_dict().items())
    assert not torch.equal(build("timm", seed=2)[0].tower.patch_embed.proj.weight, model.tower.patch_embed.proj.weight)

    clip, _ = build("open_clip", seed=1)
    full = {**{f"visual.{k}": v for k, v in clip.tower.state_dict().items()}, "text_projection": torch.zeros(2, 2)}
    torch.save(full, tmp_path / "clip.pt")
    model, _ = build("open_clip", seed=2, **{"tower": {**TOWERS["open_clip"], "weights": str(tmp_path / "clip.pt")}})
    assert all(torch.equal(v, clip.tower.state_dict()[k]) for k, v in model.tower.state_dict().items())

    with pytest.raises(ValueError, match="clip.pt' do not match"):
        build("timm", **{"tower": {**TOWERS["timm"], "weights": str(tmp_path / "clip.pt")}})


def test_freeze_flags():
    model, _ = build(freeze_tower=True, freeze_lm=True)
    assert not any(p.requires_grad for p in [*model.tower.parameters(), *model.lm.parameters()])
    assert all(p.requires_grad for p in model.projector.parameters())
    model, _ = build()
    assert all(p.requires_grad for p in model.parameters())


def test_linear_and_mlp_projectors():
    linear, _ = build(projector="linear")
    assert isinstance(linear.projector, torch.nn.Linear) and linear.projector.weight.shape == (32, 32)
    mlp, _ = build("open_clip", projector="mlp")
    assert [type(m).__name__ for m in mlp.projector] == ["Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="projector.type"):
        build(projector="conv")


def test_processor_template_and_expansion():
    model, proc = build(pool=4)
    tok = proc.tokenizer
    assert IMAGE_TOKEN in tok.get_vocab() and model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.vocab_size == len(tok) == 513
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\n<image>\nsame?<|im_end|>\n<|im_start|>assistant\n"
    assert proc.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    grey = Image.new("RGB", (7, 9), (128, 128, 128))
    feats = proc([text, "<|im_start|>user\nno image<|im_end|>\n"], images=[[grey, image(1)], []])
    ids = feats["input_ids"]
    assert feats["pixel_values"].shape == (2, 3, 32, 32) and feats["pixel_values"].dtype == torch.float32
    expect = (128 / 255 - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    torch.testing.assert_close(feats["pixel_values"][0, :, 5, 5], expect)
    assert (ids[0] == model.config.image_token_id).sum() == 8 and (ids[1] == model.config.image_token_id).sum() == 0
    assert feats["attention_mask"][1, 0] == 0  # left padding
    plain = tok(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * 4), add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == plain


def test_backward_reaches_projector_and_tower():
    model, proc = build("open_clip", projector="mlp")
    feats = batch(proc)
    model(**feats).logits.float().logsumexp(-1).mean().backward()
    for part in (model.projector, model.tower, model.lm):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
