"""`mmdistill train` as a user runs it: a subprocess on a tiny config, then its outputs."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmdistill.config import REPO_ROOT, load_config
from mmdistill.models.loading import load_model, load_tokenizer
from tests.helpers import command_env, metrics_rows


def mmdistill(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mmdistill")
    cmd = [exe] if exe else [sys.executable, "-m", "mmdistill"]
    env = command_env()
    env.pop("DS_ACCELERATOR", None)  # as a user runs it (in-process training in this suite sets it)
    return subprocess.run([*cmd, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["opd", "sft"])
def test_train_end_to_end(tmp_path, method):
    run = tmp_path / "run"
    proc = mmdistill("train", "tiny", f"method={method}", f"train.output_dir={run}", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # deepspeed's probe; no DeepSpeed here

    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["tokens"] > 0 and r["grad_norm"] > 0
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    saved = load_config(run / "config.yaml")
    assert saved.method.name == method and saved.train.output_dir == str(run)
    assert (run / "checkpoints" / "step_00000003" / "trainer_state.pt").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_after"] <= 1.0 and summary["steps"] == 3

    # The saved student is a plain Hugging Face model: it reloads and generates.
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    cfg = load_config("tiny")
    initial = load_model(cfg.student, load_tokenizer(cfg.student), seed=cfg.train.seed)
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, initial.state_dict()[n])]
    assert changed, "training did not change the student's weights"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Compute 3+4."}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = student.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_train_tiny_composite_vlm_with_image_annotations(tmp_path):
    """DOPD on a tiny composite VLM; privileged boxes drawn on the image and as text."""
    from mmdistill.models.composite import CompositeProcessor, CompositeVLM
    from mmdistill.tasks.scenes import make_samples

    run = tmp_path / "run"
    proc = mmdistill("train", "tiny_vlm", f"train.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["tokens"] > 0 and r["grad_norm"] > 0
        assert abs(r["share_ht"] + r["share_lh"] + r["share_hs"] + r["share_ll"] - 1) < 1e-6
    assert 0.0 <= json.loads((run / "summary.json").read_text())["accuracy_after"] <= 1.0

    # The saved student reloads as a unit (tower, projector, LM, processor) and answers from an image.
    student = CompositeVLM.from_pretrained(run / "student").eval()
    processor = CompositeProcessor.from_pretrained(run / "student")
    assert student.config.to_dict()["tower"]["name"] == "vit_tiny_patch16_224"
    s = make_samples(1, 0, "test", image_size=32)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["prompt"]}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[s["images"]], return_tensors="pt")
    out = student.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
