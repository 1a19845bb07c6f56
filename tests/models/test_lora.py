"""LoRA students (models/lora.py): which layers get adapters, the frozen self-teacher and the
initial student as the same model with the adapters off (no copy, the base model's logits
exactly), the EMA teacher as a second adapter, and the merged and adapter exports, each
against a brute-force reference."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

import mmdistill.models.tiny as vf
from mmdistill.adapters.scoring import Views
from mmdistill.adapters.text import TextAdapter
from mmdistill.config.schema import LoraConfig
from mmdistill.models import lora
from mmdistill.models.composite import build_composite
from mmdistill.models.loading import load_model, load_tokenizer
from mmdistill.models.teachers import Teacher, init_policy
from mmdistill.tasks.arith import make_samples
from tests.helpers import rollout_cfg

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(LoraConfig), {"enabled": True, "rank": 4, **kw})


@torch.no_grad()
def randomise_adapter(model, seed: int, name: str = lora.ADAPTER) -> None:
    """peft starts lora_B at zero (the adapted model equals the base); tests need an adapter
    that changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in lora.adapter_parameters(model, name).values():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def param_storages(*models) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}


@pytest.fixture
def base(cfg, tok):
    return load_model(cfg.student, tok, seed=0).eval()


@pytest.fixture
def student(base):
    model = copy.deepcopy(base).train()
    lora.add_lora(model, lora_cfg(dropout=0.1))  # dropout: views of the frozen model must not drop anything
    randomise_adapter(model, 0)
    return model


def ids(tok, n: int = 3) -> torch.Tensor:
    return tok([f"{i} + {i} = ? Hint: add." for i in range(n)], return_tensors="pt", padding=True).input_ids


# --------------------------------------------------------------------------- targets


def expected_targets(model, prefix: str, leaves) -> list[str]:
    """Brute force: every nn.Linear under `prefix` whose last name is in `leaves`."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix) and n.rsplit(".", 1)[-1] in leaves]


def test_text_model_targets_the_attention_projections(base):
    names = lora.target_names(base, lora_cfg())
    assert names == expected_targets(base, "model.layers.", ATTENTION)
    assert len(names) == 4 * base.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm"])
def test_a_vlm_adapts_its_language_model_and_its_tower_only_by_option(family):
    proc = vf.build_processor(family, vf.build_tokenizer())
    model = vf.build_model(family, proc)
    decoder = [n for n, m in model.named_modules() if m is model.get_decoder()][0]
    text = expected_targets(model, decoder + ".", ATTENTION)
    assert text and lora.target_names(model, lora_cfg()) == text  # the tower has q_proj etc. too: left alone
    cfg = lora_cfg(vision=True)
    both = lora.target_names(model, cfg)
    tower = [n for n in both if not n.startswith(decoder + ".")]
    assert tower and sorted(set(both) - set(text)) == sorted(tower)
    assert tower == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and not n.startswith(decoder + ".") and n != "lm_head"
                     and n.rsplit(".", 1)[-1] in cfg.vision_target_modules]
    peft = lora.add_lora(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_parameters(model)) and peft.peft_config[lora.ADAPTER].task_type is None


def test_a_composite_adapts_its_lm_and_never_a_multihead_attentions_out_proj(cfg):
    class Tower(torch.nn.Module):  # open_clip-like: F.multi_head_attention_forward reads out_proj.weight
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = torch.nn.Linear(8, 8)

    tok = load_tokenizer(cfg.student)  # the composite adds its image token to it
    lm = load_model(cfg.student, tok, seed=0)
    model, _ = build_composite({"tower": {"source": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
                                          "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24,
                                                     "num_heads": 2}},
                                "projector": {"type": "linear", "pool_tokens": 0}}, tok, lm=lm, seed=0)
    assert lora.target_names(model, lora_cfg()) == ["lm." + n for n in expected_targets(lm, "model.layers.", ATTENTION)]
    model.tower.extra = Tower()
    tower = [n for n in lora.target_names(model, lora_cfg(vision=True, vision_target_modules=["out_proj", "proj",
                                                                                            "qkv"]))
             if n.startswith("tower.")]
    assert "tower.extra.proj" in tower and "tower.extra.attn.out_proj" not in tower
    assert any(n.endswith("attn.qkv") for n in tower)


def test_no_matching_module_is_one_error_naming_the_key(base):
    with pytest.raises(ValueError, match=r"^student\.lora\.target_modules=\['query'\]: no linear layer"):
        lora.add_lora(base, lora_cfg(target_modules=["query"]))


# --------------------------------------------------------------------------- adapters off: no copy


def test_adapters_off_is_the_base_model_exactly_and_restores_the_student(student, base, tok):
    x = ids(tok)
    adapted = student.eval()(x).logits
    student.train()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    with lora.adapters_off(student):
        assert not student.training
        off = student(x).logits
    assert torch.equal(off, base(x).logits)  # exactly: the same weights, the same ops
    assert not torch.allclose(adapted, off, atol=1e-3)
    assert student.training and all(m.training for m in student.modules())
    assert {n for n, p in student.named_parameters() if p.requires_grad} == trainable == \
        set(lora.adapter_parameters(student))


def test_frozen_self_teacher_and_student_init_are_the_student_without_a_copy(student, base, tok, cfg):
    storages = param_storages(student)
    teacher = Teacher("frozen_student", student)
    init, scope = init_policy(student, teacher)
    assert teacher.model is student and init is student and not teacher.owns_weights
    assert param_storages(student, teacher.model, init) == storages  # no second copy of any weight
    # the views, read through the adapter like a training step, against the base model scored alike
    adapter = TextAdapter(tok, cfg.privileged, max_length=128)
    samples = make_samples(4, 0, digits=2)
    torch.manual_seed(0)
    batch = adapter.rollout(student, samples, rollout_cfg(8))
    wanted = ("student", "teacher_full", "teacher_plain", "student_init_priv", "student_init")
    for share in (True, False):
        views = Views(adapter, batch, student, teacher.model, wanted, share, init=init,
                      scopes={"teacher": teacher.scope, "student_init": scope})
        reference = Views(adapter, batch, base, base, wanted, share, init=base)
        for name in wanted[1:]:
            assert torch.equal(views[name], reference[name]), (name, share)
        assert not torch.allclose(views["student"].detach(), reference["student"], atol=1e-3)
        assert views["student"].requires_grad and not views["teacher_full"].requires_grad


def test_frozen_copy_is_still_made_without_lora(base):
    teacher = Teacher("frozen_student", base)
    assert teacher.model is not base and not (param_storages(teacher.model) & param_storages(base))


# --------------------------------------------------------------------------- EMA of the adapter


def test_ema_teacher_keeps_an_ema_of_the_adapter_only(student, tok):
    d = 0.8
    storages = param_storages(student)
    base_weights = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    teacher = Teacher("ema", student, ema_decay=d)
    assert teacher.model is student and teacher.owns_weights
    ema = {n: p.detach().clone() for n, p in lora.adapter_parameters(student).items()}  # starts equal
    assert set(teacher.state_dict()) == set(ema)
    assert not any(p.requires_grad for p in lora.adapter_parameters(student, lora.EMA).values())
    for step in range(3):
        randomise_adapter(student, 10 + step)
        teacher.update(iter(()))
        for n, p in lora.adapter_parameters(student).items():  # brute force: theta_T <- d theta_T + (1 - d) theta
            ema[n] = d * ema[n] + (1 - d) * p.detach()
    got = teacher.state_dict()
    for n in ema:
        torch.testing.assert_close(got[n], ema[n], rtol=0, atol=1e-6)
    assert all(torch.equal(p, base_weights[n]) for n, p in student.named_parameters() if n in base_weights)
    assert len(param_storages(student)) == len(storages) + len(ema)  # the EMA adapter and nothing else
    # the teacher's forward: a model whose trained adapter holds the EMA values
    reference = copy.deepcopy(student).eval()
    with torch.no_grad():
        for n, p in lora.adapter_parameters(reference).items():
            p.copy_(got[n])
    x = ids(tok)
    trained = {n: p.detach().clone() for n, p in lora.adapter_parameters(student).items()}
    with teacher.scope():
        out = student(x).logits
    assert torch.equal(out, reference(x).logits)
    assert {n for n, p in student.named_parameters() if p.requires_grad} == set(trained)
    assert student.training and not torch.equal(student.eval()(x).logits, out)


def test_lora_ema_state_round_trip(student, tmp_path):
    teacher = Teacher("ema", student)
    randomise_adapter(student, 3, lora.EMA)
    teacher.save(tmp_path / "t.safetensors")
    saved = {n: t.clone() for n, t in teacher.state_dict().items()}
    randomise_adapter(student, 4, lora.EMA)
    teacher.load(tmp_path / "t.safetensors")
    assert all(torch.equal(saved[n], t) for n, t in teacher.state_dict().items())


# --------------------------------------------------------------------------- exports


def test_merged_weights_are_peft_merge_and_a_plain_model_with_the_adapted_outputs(student, tok, tmp_path):
    merged = lora.merged_state_dict(student)
    reference = copy.deepcopy(lora.handle(student)).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    student.eval().save_pretrained(tmp_path, state_dict=merged)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in n for n in plain.state_dict())
    x = ids(tok)
    torch.testing.assert_close(plain(x).logits, student(x).logits, rtol=1e-5, atol=1e-5)


def test_adapter_directory_loads_with_peft_from_pretrained(student, base, tok, tmp_path):
    lora.handle(student).save_pretrained(str(tmp_path), selected_adapters=[lora.ADAPTER])
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = ids(tok)
    assert torch.equal(loaded(x).logits, student.eval()(x).logits)

