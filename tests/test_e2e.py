"""`mmdistill train` as a user runs it: a subprocess on a tiny config, then its outputs."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmdistill.config import REPO_ROOT, load_config
from mmdistill.models import load_model, load_tokenizer


def mmdistill(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mmdistill")
    cmd = [exe] if exe else [sys.executable, "-m", "mmdistill"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([*cmd, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["opd", "sft"])
def test_train_end_to_end(tmp_path, method):
    run = tmp_path / "run"
    proc = mmdistill("train", "tiny", f"method={method}", f"train.output_dir={run}", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["tokens"] > 0 and r["grad_norm"] > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
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
    prompt = tok.apply_chat_template([{"role": "user", "content": "Compute 3+4."}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = student.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
