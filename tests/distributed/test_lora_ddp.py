"""A LoRA student trained data-parallel by 2 real processes on this CPU (accelerate launch,
gloo): the adapter's gradients sync (the replicas end identical though each rank read its own
rollouts), and a resume from the step-2 checkpoint logs exactly what the uninterrupted run did."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.distributed.test_multiprocess import assert_resumed_like, launch
from tests.helpers import metrics_rows

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LORA = ["student.lora.enabled=true", "student.lora.rank=4", "method.name=dopd", "method.dopd.self_target=frozen",
        "teacher.mode=ema", "optim.lr=1e-2", "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=1",
        "eval.num_samples=2"]


def test_two_ranks_train_a_lora_student_in_sync_and_resume_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = launch(*LORA, f"train.output_dir={full}", config="tiny")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "MULTI_CPU"
    a, b = summary["replica_checksums"]
    assert a == b  # the adapters (and their EMA) equal on both ranks after 4 steps
    sampled = [[json.loads(line)["response"] for line in (full / "rollouts" / f"rank_{i:05d}.jsonl").open()]
               for i in (0, 1)]
    assert sampled[0] != sampled[1]  # each rank trained on its own rollouts: only synced gradients keep them equal
    ckpt = load_file(str(full / "checkpoints" / "step_00000004" / "student.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics_rows(full)[:2]))
    r = launch(*LORA, f"train.output_dir={resumed}", "train.resume=auto", config="tiny")
    assert r.returncode == 0, r.stderr[-4000:]
    assert_resumed_like(full, resumed)
