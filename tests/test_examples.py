"""Every example in examples/ runs as its README says, for a step."""
import json
import subprocess
import sys

import pytest

from mmdistill.config import REPO_ROOT
from tests.helpers import command_env, metrics_rows, run_mmdistill

EXAMPLES = REPO_ROOT / "examples"
SHORT = ["train.max_steps=1", "train.batch_size=2", "eval.num_samples=0"]


@pytest.mark.slow
@pytest.mark.gguf
def test_chat_self_distillation_on_your_own_jsonl(tmp_path):
    proc = run_mmdistill("train", "examples/chat_self_distill/config.yaml", f"train.output_dir={tmp_path / 'run'}",
                         *SHORT, "rollout.max_new_tokens=8", "eval.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics_rows(tmp_path / "run")[0]["tokens"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


@pytest.mark.slow
@pytest.mark.gguf
def test_a_lora_student_exports_its_adapter(tmp_path):
    proc = run_mmdistill("train", "examples/lora_student/config.yaml", f"train.output_dir={tmp_path / 'run'}",
                         *SHORT, "rollout.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads((tmp_path / "run" / "student" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.slow
def test_an_hf_vlm_pair_with_boxes(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "vlm_boxes" / "make_pair.py"), str(tmp_path / "pair")],
                   cwd=REPO_ROOT, env=command_env(), check=True, capture_output=True)
    proc = run_mmdistill("train", "examples/vlm_boxes/config.yaml", f"student.path={tmp_path / 'pair' / 'student'}",
                         f"teacher.model.path={tmp_path / 'pair' / 'teacher'}", f"train.output_dir={tmp_path / 'run'}",
                         *SHORT, "data.scenes.num_train=8", "data.scenes.image_size=32", "rollout.max_new_tokens=4",
                         "eval.max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics_rows(tmp_path / "run")[0]["share_ht"] >= 0  # DOPD routed the step


@pytest.mark.slow
@pytest.mark.distributed
def test_the_two_process_launch(tmp_path):
    proc = subprocess.run(["bash", str(EXAMPLES / "two_processes.sh"), "tiny", str(tmp_path / "run"), *SHORT[:1],
                           "eval.num_samples=0"], cwd=REPO_ROOT, env=command_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["processes"] == 2
