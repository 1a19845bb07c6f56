"""LoRA students in real training runs (configs/tiny.yaml, CPU): what a run holds (no second
copy for its self-teacher and initial student), what its checkpoints hold, a resume from the
step-2 checkpoint logging exactly what the uninterrupted run logged, both exports loaded back,
the model card and the file modes of the exported directory, and the keys refused."""
from __future__ import annotations

import json
import os
import shutil
import stat
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmdistill.config import ConfigError, load_config
from mmdistill.distributed import select
from mmdistill.distributed.launch import make_accelerator
from mmdistill.models import lora
from mmdistill.models.loading import load
from mmdistill.training.export import model_card, ordinary_modes
from mmdistill.training.setup import build
from tests.helpers import DETERMINISTIC, metrics_rows, run_mmdistill

# DOPD with its frozen self target reads student_init_priv, and its teacher is the EMA self-teacher:
# both LoRA self-policies in one run.
LORA = ["tiny", "student.lora.enabled=true", "student.lora.rank=4", "method.name=dopd",
        "method.dopd.self_target=frozen", "teacher.mode=ema", "teacher.ema_decay=0.5", "optim.lr=1e-2",
        "train.max_steps=4", "train.checkpoint_every=2", "eval.num_samples=2"]


def train(*overrides: str):
    return run_mmdistill("train", *LORA, *overrides, timeout=300, CUDA_VISIBLE_DEVICES="")


def test_a_lora_runs_self_teacher_and_initial_student_hold_no_copy(tmp_path):
    cfg = load_config("tiny", LORA[1:] + [f"train.output_dir={tmp_path / 'run'}"])
    accelerator = make_accelerator(cfg)
    run = build(cfg, accelerator, select(accelerator, cfg))
    assert run.teacher.model is run.plain and run.init is run.plain
    base, _ = load(cfg.student, seed=cfg.train.seed)
    n_base = sum(p.numel() for p in base.parameters())
    held = {p.untyped_storage().data_ptr(): p.numel()
            for m in (run.plain, run.teacher.model, run.init) for p in m.parameters()}
    trained = sum(p.numel() for p in lora.adapter_parameters(run.plain).values())
    assert sum(held.values()) == n_base + 2 * trained  # the base once, the adapter and its EMA
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in lora.adapter_parameters(run.plain).values()}


@pytest.mark.slow
class TestLoraRun:
    @pytest.fixture(scope="class")
    def runs(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("lora")
        full, resumed, adapter = root / "full", root / "resumed", root / "adapter"
        mask = os.umask(0o027)  # the children write under it: their files must be 0640, not 0600 nor 0644
        try:
            r = train(f"train.output_dir={full}")
            assert r.returncode == 0, r.stderr[-3000:]
            r = train(f"train.output_dir={adapter}", "train.export=adapter")
            assert r.returncode == 0, r.stderr[-3000:]
        finally:
            os.umask(mask)
        shutil.copytree(full, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000004")
        shutil.rmtree(resumed / "student")
        (resumed / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics_rows(full)[:2]))
        r = train(f"train.output_dir={resumed}", "train.resume=auto")
        assert r.returncode == 0, r.stderr[-3000:]
        return full, resumed, adapter

    def test_checkpoints_hold_the_adapter_and_its_ema_only(self, runs):
        full, _, _ = runs
        ckpt = full / "checkpoints" / "step_00000004"
        student, teacher = load_file(str(ckpt / "student.safetensors")), load_file(str(ckpt / "teacher.safetensors"))
        assert student and all(".lora_" in k and f".{lora.ADAPTER}." in k for k in student)
        assert teacher.keys() == student.keys()
        assert any(not torch.equal(student[k], teacher[k]) for k in student)  # the EMA lags the adapter
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        assert len(state["optimizer"]["state"]) == len(student)  # AdamW moments of the adapter's tensors only

    def test_the_resumed_lora_run_is_the_uninterrupted_one_exactly(self, runs):
        full, resumed, _ = runs
        a = {row["step"]: row for row in metrics_rows(full)}
        b = {row["step"]: row for row in metrics_rows(resumed)}
        assert sorted(b) == [1, 2, 3, 4]
        for step in (3, 4):
            for key in (*DETERMINISTIC, "self_kl"):
                assert a[step][key] == b[step][key], (step, key)
        for rel in ("student/model.safetensors", "checkpoints/step_00000004/student.safetensors",
                    "checkpoints/step_00000004/teacher.safetensors"):
            wa, wb = load_file(str(full / rel)), load_file(str(resumed / rel))
            assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), rel

    def test_both_exports_load_and_give_the_adapted_models_outputs(self, runs):
        full, _, adapter = runs
        cfg = load_config("tiny", LORA[1:])
        merged = AutoModelForCausalLM.from_pretrained(full / "student").eval()
        assert not any("lora" in k for k in merged.state_dict())
        base, _ = load(cfg.student, seed=cfg.train.seed)  # the same seeded random init the run adapted
        assert (adapter / "student" / "adapter_config.json").is_file()
        assert not (adapter / "student" / "model.safetensors").exists()
        peft = PeftModel.from_pretrained(base, adapter / "student").eval()
        tok = AutoTokenizer.from_pretrained(full / "student")
        x = tok(["1 + 2 = ?", "Hint: 3"], return_tensors="pt", padding=True)
        # the two runs trained identically (same seed, data, adapter): merged vs adapter on the base
        torch.testing.assert_close(merged(**x).logits, peft(**x).logits, rtol=1e-5, atol=1e-5)
        with peft.disable_adapter():
            assert not torch.allclose(merged(**x).logits, peft(**x).logits, atol=1e-3)  # the adapter trained
        ckpt = load_file(str(adapter / "checkpoints" / "step_00000004" / "student.safetensors"))
        saved = load_file(str(adapter / "student" / "adapter_model.safetensors"))
        assert len(saved) == len(ckpt)
        assert all(torch.equal(saved["base_model.model." + k.replace(f".{lora.ADAPTER}.", ".")], ckpt[k]) for k in ckpt)

    def test_the_exported_directories_have_a_model_card_and_ordinary_modes(self, runs):
        full, _, adapter = runs
        summary = json.loads((full / "summary.json").read_text())
        for run, library in ((full, "transformers"), (adapter, "peft")):
            card = (run / "student" / "README.md").read_text()
            assert f"library_name: {library}" in card
            for text in ("| base model | a random llama (1 layers, hidden 32, seed 0) |",
                         "| teacher | an EMA of the student, decay 0.5 (a self-teacher) |",
                         "| method | dopd (", "self_target=frozen", "| data | arith (built-in task, seed 0) |",
                         "| steps | 4 |", "rank 4, alpha 32.0", f"exported {'adapter' if run == adapter else 'merged'}",
                         "## Resolved config", "lr: 0.01"):
                assert text in card, (run.name, text)
            files = [f for f in (run / "student").iterdir()]
            assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o640"}, run.name
        before, after = summary["accuracy_before"], summary["accuracy_after"]
        assert f"| held-out accuracy | {before:.3f} before, {after:.3f} after (2 samples" in \
            (full / "student" / "README.md").read_text()


def test_a_full_fine_tuning_card_names_a_separate_teacher_and_no_lora():
    cfg = load_config("tiny", ["eval.num_samples=0", "student.path=/models/base"])
    card = model_card(cfg, {"steps": 7})
    assert "| base model | `/models/base` |" in card and "base_model: /models/base" in card
    assert "| teacher | a separate model, a random llama (2 layers, hidden 48, seed 1) |" in card
    assert "| held-out accuracy | not measured (eval.num_samples=0) |" in card
    assert "LoRA" not in card and "- lora" not in card and "| steps | 7 |" in card


def test_ordinary_modes_follow_the_umask(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        f = tmp_path / "model.safetensors"
        f.write_bytes(b"x")
        f.chmod(0o600)  # as safetensors' temporary file leaves it
        old = os.umask(mask)
        try:
            ordinary_modes(tmp_path)
        finally:
            os.umask(old)
        assert stat.S_IMODE(f.stat().st_mode) == mode, oct(mask)


@pytest.mark.parametrize("override, message", [
    ("student.lora.rank=0", "config key 'student.lora.rank' is 0; must be in (0, inf)"),
    ("student.lora.alpha=-1", "config key 'student.lora.alpha' is -1.0; must be in (0.0, inf)"),
    ("student.lora.dropout=1.0", "config key 'student.lora.dropout' is 1.0; must be in [0.0, 1.0)"),
    ("student.lora.target_modules=[]", "config key 'student.lora.target_modules' has nothing;"),
    ("student.lora.target_modules=[q-proj]", "config key 'student.lora.target_modules' has ['q-proj'];"),
    ("train.export=adapter", "config key 'train.export' is 'adapter': only a LoRA student"),
    ("train.export=both", "config key 'train.export' is 'both'; allowed: merged, adapter"),
])
def test_bad_lora_keys_are_one_line_naming_the_key(override, message):
    enabled = [] if override.startswith("train.export") else ["student.lora.enabled=true"]
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [*enabled, override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_lora_under_fsdp_or_deepspeed_is_refused_before_any_model_loads():
    """train.fsdp from the command line fails with the config; from an accelerate FSDP file (set
    on the config after it was validated) or under a DeepSpeed launch, when the backend is
    chosen, which train() does before anything loads."""
    with pytest.raises(ConfigError, match=r"^config key 'student\.lora\.enabled' is true with train\.fsdp=true"):
        load_config("tiny", ["student.lora.enabled=true", "train.fsdp=true"])
    cfg = load_config("tiny", ["student.lora.enabled=true"])
    with pytest.raises(ConfigError, match=r"^config key 'student\.lora\.enabled' is true under a DeepSpeed launch"):
        select(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), cfg)
    cfg.train.fsdp = True  # what launch.py sets from an accelerate FSDP config file
    with pytest.raises(ConfigError, match=r"^config key 'student\.lora\.enabled' is true with train\.fsdp=true"):
        select(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), cfg)


@pytest.mark.slow
def test_gradient_checkpointing_gives_a_lora_student_the_same_gradients(tmp_path):
    """Only the adapters need gradients, and the frozen embeddings' output has none: the
    checkpointed blocks must still send them to the adapters inside (transformers 5 checkpoints
    without reentrancy, so they do), the same numbers as without."""
    rows = {}
    for on in (False, True):
        r = run_mmdistill("train", "tiny", "student.lora.enabled=true", "train.max_steps=2", "eval.num_samples=0",
                          f"train.gradient_checkpointing={str(on).lower()}", f"train.output_dir={tmp_path / str(on)}",
                          timeout=300, CUDA_VISIBLE_DEVICES="")
        assert r.returncode == 0, r.stderr[-3000:]
        rows[on] = metrics_rows(tmp_path / str(on))
    for a, b in zip(rows[False], rows[True]):
        assert a["grad_norm"] > 0
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
