"""The vision adapter on every supported family: real transformers classes and processors
(tiny, random), composite students, privileged images, alignment with generate."""
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from mmdistill.adapters import VisionAdapter, build_adapter
from mmdistill.adapters.scoring import Views
from mmdistill.adapters.text import TemplateError, response_mask
from mmdistill.config import load_config
from mmdistill.core.batch import Batch
from mmdistill.core.views import VIEW_SPEC
from mmdistill.data.boxes import boxes_text, draw_boxes, partial_boxes
from mmdistill.methods.registry import build_method
from mmdistill.models.composite import build_composite
from mmdistill.models.loading import check_same_vocab, load_tokenizer
from mmdistill.models.tiny import FAMILIES, build_model, build_processor
from mmdistill.tasks.scenes import make_samples
from tests import helpers

TIMM_TOWER = {"source": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
              "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
OPEN_CLIP_TOWER = {"source": "open_clip", "name": "ViT-B-32", "image_size": 32,
                   "kwargs": {"width": 32, "layers": 1, "patch_size": 8, "image_size": 32, "head_width": 16}}
COMPOSITES = {"composite_timm": TIMM_TOWER, "composite_open_clip": OPEN_CLIP_TOWER}
PAIRS = (*FAMILIES, *COMPOSITES)


def _composite(name: str, seed: int):
    cfg = load_config("tiny_vlm")
    from mmdistill.models.loading import load_model

    tok = load_tokenizer(cfg.student)
    lm = load_model(cfg.student, tok, seed=seed)
    spec = {"tower": COMPOSITES[name], "projector": {"type": "mlp", "pool_tokens": 0}, "freeze_tower": False,
            "freeze_lm": False}
    return build_composite(spec, tok, lm=lm, seed=seed)


def build_pair(name: str, seed: int):
    if name in COMPOSITES:
        return _composite(name, seed)
    proc = build_processor(name)
    return build_model(name, proc, seed=seed), proc


def priv_cfg(**image):
    base = load_config("tiny_vlm").privileged
    return OmegaConf.merge(base, {"image": image}) if image else base


rollout_cfg = partial(helpers.rollout_cfg, max_new_tokens=6)


@pytest.fixture(scope="module")
def samples():
    s = make_samples(3, 0, "train", image_size=32, min_objects=2, max_objects=3)
    s[1] = dict(s[1], prompt=s[1]["prompt"] + " Look carefully at every object.")  # uneven prompt lengths
    return s


@pytest.fixture(scope="module", params=PAIRS)
def pair(request):
    torch.manual_seed(0)
    student, proc = build_pair(request.param, 0)
    teacher, t_proc = build_pair(request.param, 1)
    return request.param, student.eval(), proc, teacher.eval().requires_grad_(False), t_proc


def test_generate_logits_equal_scored_logits(pair, samples):
    """Rollout and scoring agree: positions (Qwen's multimodal rotary ones included), image tokens
    and left padding line up, so the scored distribution is the one the sampler drew from."""
    name, student, proc, _, _ = pair
    ad = VisionAdapter(proc, priv_cfg(), 0)
    prepared = ad.prepare([*samples, {"id": "text-only", "prompt": "How many sides has a square?"}])  # mixed batch
    prompts = ad.encode(prepared, None, "student", torch.device("cpu"))
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=ad.pad_id, eos_token_id=ad.eos_ids)
    from mmdistill.adapters.text import model_inputs

    out = student.generate(input_ids=prompts.ids, attention_mask=prompts.attn, **model_inputs(student, prompts.extras),
                           generation_config=gen)
    resp = out.sequences[:, prompts.ids.shape[1]:]
    mask = response_mask(resp, ad.eos_ids)
    batch = Batch(resp.masked_fill(~mask, ad.pad_id), mask, prepared)
    lp = ad.logits(student, batch, None, grad=False).log_softmax(-1)
    ref = torch.stack(out.logits, 1)[:, : lp.shape[1], : ad.vocab_size].log_softmax(-1)
    assert torch.allclose(lp[mask], ref[mask], atol=1e-4), (name, (lp[mask] - ref[mask]).abs().max())


def test_every_view_scored_aligned_and_one_step_of_each_method(pair, samples):
    name, student, proc, teacher, t_proc = pair
    ad = build_adapter(proc, priv_cfg(source="draw"), 0, t_proc)
    assert isinstance(ad, VisionAdapter)
    torch.manual_seed(1)
    batch = ad.rollout(student, samples, rollout_cfg())
    assert batch.response_ids.shape[0] == len(samples)
    # the initial student: the student, untrained
    views = Views(ad, batch, student, teacher, tuple(VIEW_SPEC), init=student)
    shape = (*batch.response_ids.shape, ad.vocab_size)
    for view in VIEW_SPEC:
        with torch.no_grad() if view != "student" else torch.enable_grad():
            assert views[view].shape == shape, view
            assert views[view].requires_grad == (view == "student"), view
    torch.testing.assert_close(views["student_init_priv"], views["student_priv"])
    assert ad.has_images(batch.samples)
    assert not any(k.endswith("_prefix") for k in views.seconds)  # every view shows other images: scored one by one
    assert not torch.allclose(views["teacher_full"], views["teacher_plain"])  # the boxes reach the teacher
    assert not torch.allclose(views["teacher_full"], views["teacher_partial"])  # half of them do

    # batched scoring equals scoring each sample alone (padding never shifts a view)
    for level in (None, "full", "partial"):
        lp = ad.logits(teacher, batch, level, grad=False, policy="teacher")
        for i in range(len(samples)):
            n = int(batch.response_mask[i].sum())
            one = Batch(batch.response_ids[i : i + 1, :n], batch.response_mask[i : i + 1, :n], batch.samples[i : i + 1])
            ref = ad.logits(teacher, one, level, grad=False, policy="teacher")
            assert torch.allclose(lp[i, :n], ref[0], atol=1e-4), (name, level, i)

    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    for method_name in ("dopd", "ar_opd"):
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2)
        method = build_method(method_name)
        loss, metrics = method.loss(Views(ad, batch, student, teacher, method.views), batch)
        assert torch.isfinite(loss) and metrics
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert any(not torch.equal(a, p) for a, p in zip(before, params)), method_name
    student.eval()


SHARES_IMAGES = {"llava", *COMPOSITES}  # one pixel row per image and 1-D positions; the others fall back


def test_views_showing_the_same_images_share_their_prefix(pair, samples):
    """Boxes as text only (privileged.image.source=student): the image and the question run once
    per model, with the prefix; logits and the student's gradients equal scoring each view alone."""
    name, student, proc, teacher, t_proc = pair
    ad = build_adapter(proc, priv_cfg(source="student"), 0, t_proc)
    torch.manual_seed(3)
    twin = dict(samples[2], id="twin", prompt=samples[0]["prompt"])  # sample 0's tokens, another image
    batch = ad.rollout(student, [*samples, twin], rollout_cfg(num_rollouts=2))
    wanted = ("student", "student_priv", "teacher_full", "teacher_partial", "teacher_plain")
    student.train()
    try:
        shared = Views(ad, batch, student, teacher, wanted)
        alone = Views(ad, batch, student, teacher, wanted, share_prefix=False)
        m = batch.response_mask
        for view in wanted:
            assert torch.allclose(shared[view][m], alone[view][m], atol=1e-4), (name, view)
        params = [p for p in student.parameters() if p.requires_grad]
        ga = torch.autograd.grad(shared["student"][m].float().log_softmax(-1).max(-1).values.sum(), params,
                                 allow_unused=True)
        gb = torch.autograd.grad(alone["student"][m].float().log_softmax(-1).max(-1).values.sum(), params,
                                 allow_unused=True)
    finally:
        student.eval()
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-4), name
    if name in COMPOSITES:
        # the tower learns through the cache
        assert any(a is not None and a.abs().sum() > 0 for a in ga[: len(list(student.tower.parameters()))])
    assert ({"student_prefix", "teacher_prefix"} <= set(shared.seconds)) == (name in SHARES_IMAGES), name


def test_student_priv_equals_student_with_empty_hint_and_same_image(pair, samples):
    name, student, proc, _, _ = pair
    empty = [dict(s, boxes=[], hint="") for s in samples]
    for source in ("student", "draw", "auto"):
        ad = VisionAdapter(proc, OmegaConf.merge(priv_cfg(source=source), {"text": "{hint}", "partial_field": "hint"}),
                           0)
        torch.manual_seed(2)
        batch = ad.rollout(student, empty, rollout_cfg())
        views = Views(ad, batch, student, None)
        assert torch.equal(views["student_priv"], views["student"].detach()), (name, source)


def test_privileged_images_and_box_text(samples):
    """What each view sees: the drawn boxes, the partial subset, the teacher's own images."""
    _, proc = build_pair("llava", 0)
    ad = VisionAdapter(proc, priv_cfg(source="draw"), 0)
    s = ad.prepare(samples[:1])[0]
    n = len(s["boxes"])
    assert n >= 1
    assert ad.images(s, None) == s["images"]
    full, part = ad.images(s, "full"), ad.images(s, "partial")
    assert full[0].tobytes() == draw_boxes(s["images"][0], s["boxes"]).tobytes()
    keep = -(-n // 2)
    assert part[0].tobytes() == draw_boxes(s["images"][0], s["boxes"][:keep]).tobytes()
    sizes = [s["images"][0].size]
    text_full = ad.privileged_text(s, "full")
    assert text_full == "Objects: " + boxes_text(s["boxes"], sizes)
    assert ad.privileged_text(s, "partial") == "Objects: " + boxes_text(s["boxes"][:keep], sizes)
    msgs = ad.messages(s, "full")
    assert msgs[0]["content"][0] == {"type": "image"} and text_full in msgs[0]["content"][-1]["text"]

    teacher_img = draw_boxes(s["images"][0], s["boxes"], labels=False)
    with_t = dict(s, teacher_images=[teacher_img])
    assert VisionAdapter(proc, priv_cfg(source="auto"), 0).images(with_t, "full") == [teacher_img]
    assert VisionAdapter(proc, priv_cfg(source="student"), 0).images(with_t, "full") == s["images"]
    assert VisionAdapter(proc, priv_cfg(source="auto"), 0).images(s, "full") == s["images"]
    with pytest.raises(KeyError, match=f"sample '{s['id']}' has no field 'teacher_images'"):
        VisionAdapter(proc, priv_cfg(source="teacher"), 0).images(s, "full")
    unl = VisionAdapter(proc, priv_cfg(source="draw", partial_boxes="unlabeled"), 0)
    unlabeled = partial_boxes(s["boxes"], "unlabeled", 0.5)
    assert [b["label"] for b in unlabeled] == [""] * n  # where, not what
    assert unl.images(s, "partial")[0].tobytes() == draw_boxes(s["images"][0], unlabeled).tobytes()
    assert unl.privileged_text(s, "partial") == "Objects: " + boxes_text(unlabeled, sizes)


def test_bad_image_and_box_name_the_sample(samples, tmp_path):
    _, proc = build_pair("llava", 0)
    ad = VisionAdapter(proc, priv_cfg(), 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"sample 'x' images\[0\]"):
        ad.prepare([dict(samples[0], id="x", images=[str(bad)])])
    with pytest.raises(ValueError, match="sample 'y' boxes"):
        ad.prepare([dict(samples[0], id="y", boxes=[{"label": "a", "box": [0, 0, 500, 5]}])])


def test_template_dropping_privileged_text_is_caught(samples):
    _, proc = build_pair("qwen2_vl", 0)
    ad = VisionAdapter(proc, OmegaConf.merge(priv_cfg(), {"template": "{prompt}"}), 0)
    with pytest.raises(TemplateError, match="dropped the privileged text"):
        ad.prompt_texts(ad.prepare(samples[:1]), "full")


def test_cross_family_teacher_and_vocab_mismatch(samples):
    """A Qwen2-VL teacher for a LLaVA student: different processors, one vocabulary."""
    student, proc = build_pair("llava", 0)
    teacher, t_proc = build_pair("qwen2_vl", 1)
    check_same_vocab(proc.tokenizer, t_proc.tokenizer, "families")
    ad = build_adapter(proc, priv_cfg(source="draw"), 0, t_proc)
    torch.manual_seed(0)
    batch = ad.rollout(student.eval(), samples, rollout_cfg())
    views = Views(ad, batch, student, teacher.eval())
    assert views["teacher_full"].shape == views["student"].shape
    s_ids = ad.prompt_ids(batch.samples, None, "student")
    t_ids = ad.prompt_ids(batch.samples, None, "teacher")
    assert s_ids != t_ids  # each side's own image tokens
    _, c_proc = build_pair("composite_timm", 0)  # the shipped tokenizer + <image>: not LLaVA's vocab
    with pytest.raises(ValueError, match="vocab mismatch"):
        check_same_vocab(proc.tokenizer, c_proc.tokenizer, "families")


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "composite_timm"])
def test_rollouts_never_sample_an_image_token(name, samples):
    """A response holding an image placeholder could not be scored: generation suppresses them."""
    student, proc = build_pair(name, 0)
    ad = VisionAdapter(proc, priv_cfg(), 0)
    image_id = proc.image_token_id
    assert image_id in ad.never_sample

    def favour_image_token(module, args, out):  # a student that wants nothing but the image token
        out = out.clone()
        out[..., image_id] += 100.0
        return out

    student.get_output_embeddings().register_forward_hook(favour_image_token)
    batch = ad.rollout(student.eval(), samples, rollout_cfg(temperature=0.0))
    assert not (batch.response_ids == image_id).any()
    ad.logits(student, batch, None, grad=False)  # scorable
    if name != "composite_timm":  # the composite suppresses it in its own generate too
        ad.never_sample = []
        assert (ad.rollout(student.eval(), samples, rollout_cfg(temperature=0.0)).response_ids == image_id).any()


def test_train_hf_vlm_student_with_a_teacher_of_another_family(tmp_path):
    """`train` on saved Hugging Face VLM directories: a SmolVLM student, a Qwen2-VL teacher."""
    import json

    from mmdistill.models.loading import load, model_kind
    from mmdistill.models.tiny import save_family
    from mmdistill.training.loop import train

    student_dir = save_family("smolvlm", tmp_path / "student", seed=0)
    teacher_dir = save_family("qwen2_vl", tmp_path / "teacher", seed=1)
    assert model_kind(student_dir) == model_kind(teacher_dir) == "vlm"
    cfg = load_config("tiny_vlm", [
        f"student.path={student_dir}", "student.vision.tower.name=", f"teacher.model.path={teacher_dir}",
        "teacher.model.vision.tower.name=", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
        "eval.num_samples=2",
    ])
    run = train(cfg)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["tokens"] > 0
    model, proc = load(OmegaConf.merge(cfg.student, {"path": str(run / "student")}))
    assert type(model).__name__ == "SmolVLMForConditionalGeneration" and type(proc).__name__ == "SmolVLMProcessor"


def test_boxes_are_drawn_once_per_prompt_and_step(samples, monkeypatch):
    """student_priv and teacher_full see the same drawn image, and the rollouts of one prompt the
    same decoded one: each is drawn once per batch (the drawing was most of a privileged view's
    time), and what is drawn equals a fresh drawing."""
    import mmdistill.adapters.vision as vision

    calls = []
    real = vision.draw_boxes
    monkeypatch.setattr(vision, "draw_boxes", lambda *a, **k: calls.append(1) or real(*a, **k))
    student, proc = build_pair("composite_timm", 0)
    ad = VisionAdapter(proc, priv_cfg(source="draw"), 0)
    batch = ad.rollout(student.eval(), samples[:2], rollout_cfg(num_rollouts=3))
    prepared = batch.samples
    assert len(prepared) == 6 and prepared[0]["images"][0] is prepared[2]["images"][0]
    for _ in range(2):  # two views read the full drawing, one the partial
        ad.encode(prepared, "full", "student", torch.device("cpu"))
    ad.encode(prepared, "partial", "teacher", torch.device("cpu"))
    assert len(calls) == 2 * 2  # 2 prompts x (full, partial), each with one image
    fresh = draw_boxes(prepared[3]["images"][0], prepared[3]["boxes"])
    assert ad.images(prepared[3], "full")[0].tobytes() == fresh.tobytes()
