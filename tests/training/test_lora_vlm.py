"""LoRA students that see images: the composite VLM (adapters on its LM) and a Hugging Face
VLM (LLaVA: adapters on its language model, the vision tower frozen, or adapted too with
student.lora.vision), trained with their frozen self-teacher reading the drawn boxes, exported
merged: the merged model's logits are those of the base with the checkpoint's adapter applied,
and outside the language model only the adapted tower layers changed."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mmdistill.adapters import build_adapter
from mmdistill.config import load_config
from mmdistill.models import lora
from mmdistill.models.loading import load
from mmdistill.models.tiny import save_family
from mmdistill.tasks.scenes import make_samples
from mmdistill.training.loop import train
from tests.helpers import rollout_cfg

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind, vision", [("composite", False), ("llava", False), ("llava", True)])
def test_a_vlm_lora_student_trains_and_exports_its_merged_weights(kind, vision, tmp_path):
    overrides = ["student.lora.enabled=true", "student.lora.rank=4", "teacher.mode=frozen_student",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "eval.num_samples=0",
                 "optim.lr=5e-2", "train.checkpoint_every=2", f"student.lora.vision={str(vision).lower()}"]
    if kind == "llava":
        overrides += [f"student.path={save_family('llava', tmp_path / 'llava', seed=0)}", "student.vision.tower.name="]
    cfg = load_config("tiny_vlm", overrides)
    run = train(cfg)
    base, proc = load(cfg.student, seed=cfg.train.seed)
    tower = {n: p.detach().clone() for n, p in base.named_parameters()
             if not any(p is q for q in lora.language_model(base).parameters())}
    adapted = {n + ".weight" for n in lora.target_names(base, cfg.student.lora)}
    lora.add_lora(base, cfg.student.lora)
    lora.load_into(lora.adapter_parameters(base), run / "checkpoints" / "step_00000002" / "student.safetensors")
    merged, _ = load(OmegaConf.merge(cfg.student, {"path": str(run / "student"), "vision": {"tower": {"name": None}}}))
    assert not lora.has_lora(merged) and not any("lora" in n for n in merged.state_dict())
    changed = {n for n, p in merged.named_parameters() if n in tower and not torch.equal(p, tower[n])}
    # tower, projector, embeddings: neither adapted nor trained, unless the tower was adapted (vision)
    assert changed == ({n for n in adapted if n in tower} if vision else set())
    assert bool(changed) == vision
    adapter = build_adapter(proc, cfg.privileged, 0)
    torch.manual_seed(0)
    samples = make_samples(3, 0, "test", image_size=32, max_objects=3)
    batch = adapter.rollout(base, samples, rollout_cfg(6))
    with torch.no_grad():
        want = adapter.logits(base.eval(), batch, "full", grad=False)
        got = adapter.logits(merged.eval(), batch, "full", grad=False)
        with lora.adapters_off(base):
            off = adapter.logits(base, batch, "full", grad=False)
    m = batch.response_mask
    torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(off[m], want[m], atol=1e-3)  # the adapter trained
