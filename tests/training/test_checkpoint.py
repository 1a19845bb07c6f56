"""Checkpoints: a full round trip restores every piece of trainer state; writes are atomic."""
from __future__ import annotations

import random
import subprocess

import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from mmdistill.config import load_config
from mmdistill.data.sources import load_split
from mmdistill.data.stream import SampleStream
from mmdistill.models.loading import load_model
from mmdistill.models.teachers import Teacher
from mmdistill.training.checkpoint import (
    CheckpointError,
    _own_problem,
    list_checkpoints,
    load_checkpoint,
    problem,
    resume_point,
    save_checkpoint,
)

# Untied embeddings: see test_ema_teacher_with_tied_embeddings_saves for the tied case.
UNTIED = ["student.arch.tie_word_embeddings=false", "data.arith.num_train=40"]


@pytest.fixture(scope="module")
def cfg():
    """Overrides conftest's `cfg` (and so the `tok` built from it)."""
    return load_config("tiny", UNTIED)


class Run:
    """Everything a checkpoint holds, built the way train() builds it."""

    def __init__(self, cfg, tok, seed: int = 0):
        self.tok = tok
        self.student = load_model(cfg.student, tok, seed=seed)
        self.student.train()
        self.teacher = Teacher("ema", self.student, ema_decay=0.5)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-2, weight_decay=0.01)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, 2, 10)
        self.stream = SampleStream(load_split(cfg.data, "train"), 3, seed=0)

    def objects(self) -> dict:
        return dict(student=self.student, optimizer=self.optimizer, scheduler=self.scheduler,
                    teacher=self.teacher, stream=self.stream)

    def step(self) -> None:
        """One real optimizer step on a batch from the stream."""
        samples = self.stream.next()
        enc = self.tok([s["prompt"] + " " + s["answer"] for s in samples], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = self.student(**enc, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update(self.student.parameters())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_optimizer_state_equal(o1, o2) -> None:
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and s1["state"]
    for i in s1["state"]:
        assert s1["state"][i].keys() == s2["state"][i].keys()
        for k, v in s1["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][i][k])), (i, k)


def test_round_trip_restores_everything(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    a.step()  # warmup: this one runs at lr 0
    a.step()
    ckpt = save_checkpoint(tmp_path, 2, **a.objects(), keep=3)
    assert ckpt == tmp_path / "checkpoints" / "step_00000002"
    assert list_checkpoints(tmp_path) == [ckpt]

    # what the saved run does next
    expected_rng = (torch.rand(5), random.random(), np.random.rand(3))
    expected_batch = [s["id"] for s in a.stream.next()]

    b = Run(cfg, tok, seed=123)  # different initial weights, fresh optimizer / scheduler / stream
    assert not torch.equal(a.student.lm_head.weight, b.student.lm_head.weight)
    assert b.scheduler.get_last_lr() != a.scheduler.get_last_lr()
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    step = load_checkpoint(ckpt, **b.objects())
    assert step == 2

    # RNG
    assert torch.equal(torch.rand(5), expected_rng[0])
    assert random.random() == expected_rng[1]
    assert np.array_equal(np.random.rand(3), expected_rng[2])
    # data position
    assert [s["id"] for s in b.stream.next()] == expected_batch
    # weights, teacher, optimizer, scheduler
    a_stream_state = a.stream.state_dict()
    assert b.stream.state_dict() == a_stream_state
    assert_same(weights(a.student), weights(b.student))
    assert_same(weights(a.teacher.model), weights(b.teacher.model))
    assert not torch.equal(a.teacher.model.lm_head.weight, a.student.lm_head.weight)  # the EMA lags
    assert_optimizer_state_equal(a.optimizer, b.optimizer)
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    assert b.scheduler.state_dict() == a.scheduler.state_dict()

    # and training continues identically, bit for bit
    torch.manual_seed(5)
    a.step()
    torch.manual_seed(5)
    b.step()
    assert_same(weights(a.student), weights(b.student))
    assert_same(weights(a.teacher.model), weights(b.teacher.model))
    assert_optimizer_state_equal(a.optimizer, b.optimizer)
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()


def test_trainer_state_loads_with_weights_only(cfg, tok, tmp_path, monkeypatch):
    a = Run(cfg, tok)
    a.step()
    ckpt = save_checkpoint(tmp_path, 3, **a.objects(), keep=2)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3
    assert set(state) >= {"optimizer", "scheduler"}
    mine = torch.load(ckpt / "rank_00000.pt", weights_only=True)  # each rank's RNG states and data position
    assert mine["step"] == 3 and set(mine) >= {"data", "rng"}
    assert mine["data"] == a.stream.state_dict()

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(ckpt, **Run(cfg, tok).objects())
    assert calls and all(c is True for c in calls)


STATE = ("trainer_state.pt", "rank_00000.pt", "SHA256SUMS")


def test_checkpoint_files(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    assert {p.name for p in ckpt.iterdir()} == {"student.safetensors", "teacher.safetensors", *STATE}
    # a teacher that holds no trained state is not written
    a.teacher = Teacher("frozen_student", a.student)
    ckpt = save_checkpoint(tmp_path, 2, **a.objects(), keep=2)
    assert {p.name for p in ckpt.iterdir()} == {"student.safetensors", *STATE}
    ckpt = save_checkpoint(tmp_path, 3, **{**a.objects(), "teacher": None}, keep=2)
    assert {p.name for p in ckpt.iterdir()} == {"student.safetensors", *STATE}


def test_leftover_tmp_directory_is_never_listed(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    assert list_checkpoints(tmp_path) == []  # no checkpoints/ at all
    root = tmp_path / "checkpoints"
    half = root / "step_00000009.tmp"
    half.mkdir(parents=True)
    (half / "student.safetensors").write_bytes(b"\x00" * 10)  # half written, no trainer_state.pt
    (root / "step_00000010").write_text("a file, not a checkpoint directory")
    (root / "notes").mkdir()
    assert list_checkpoints(tmp_path) == []

    ckpt = save_checkpoint(tmp_path, 2, **a.objects(), keep=1)
    assert list_checkpoints(tmp_path) == [ckpt]
    assert half.exists()  # keep=1 pruning neither counts nor needs the leftover
    assert not (root / "step_00000002.tmp").exists()

    # a leftover of the very step being saved is replaced
    stale = root / "step_00000004.tmp"
    stale.mkdir()
    (stale / "junk").write_text("x")
    ckpt4 = save_checkpoint(tmp_path, 4, **a.objects(), keep=5)
    assert not stale.exists()
    assert not (ckpt4 / "junk").exists()
    assert list_checkpoints(tmp_path) == [ckpt, ckpt4]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_prunes_to_the_newest(cfg, tok, tmp_path, keep):
    a = Run(cfg, tok)
    for step in (1, 2, 5, 10, 100):
        save_checkpoint(tmp_path, step, **a.objects(), keep=keep)
    names = [p.name for p in list_checkpoints(tmp_path)]
    expected = [f"step_{s:08d}" for s in (1, 2, 5, 10, 100)][-keep:]
    assert names == expected
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == expected


def test_resaving_a_step_overwrites_it(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    a.step()
    a.step()
    ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    b = Run(cfg, tok, seed=7)
    load_checkpoint(ckpt, **b.objects())
    assert_same(weights(a.student), weights(b.student))


def test_loading_into_a_model_with_more_layers_names_the_mismatch(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    other = load_config("tiny", UNTIED + ["student.arch.num_hidden_layers=2"])
    b = Run(other, tok)
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(ckpt, **b.objects())


def test_loading_into_a_model_of_other_width_fails(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    other = load_config("tiny", UNTIED + ["student.arch.hidden_size=48"])
    with pytest.raises((ValueError, RuntimeError)):
        load_checkpoint(ckpt, **Run(other, tok).objects())


def test_ema_teacher_with_tied_embeddings_saves(tok, tmp_path):
    tied = load_config("tiny", ["data.arith.num_train=40"])
    assert tied.student.arch.tie_word_embeddings
    a = Run(tied, tok)
    a.step()
    try:
        ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    finally:
        # whatever happened, a failed save leaves nothing that lists as a checkpoint
        assert all((p / "trainer_state.pt").is_file() for p in list_checkpoints(tmp_path))
    b = Run(tied, tok, seed=9)
    load_checkpoint(ckpt, **b.objects())
    assert_same(weights(a.teacher.model), weights(b.teacher.model))
    assert b.teacher.model.lm_head.weight is b.teacher.model.model.embed_tokens.weight


# ------------------------------------------------------------------ damaged checkpoints (real files)


def _truncate(file, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _flip_a_bit(file) -> None:
    """One bit of the last byte (a weight's, not the safetensors header's)."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def _empty(file) -> None:
    file.write_bytes(b"")


DAMAGE = {
    "student.safetensors truncated": ("student.safetensors", _truncate),
    "student.safetensors bit flip": ("student.safetensors", _flip_a_bit),
    "trainer_state.pt truncated": ("trainer_state.pt", _truncate),
    "teacher.safetensors bit flip": ("teacher.safetensors", _flip_a_bit),
    "rank file zero bytes": ("rank_00000.pt", _empty),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_file_is_named_and_never_loaded(cfg, tok, tmp_path, case):
    name, damage = DAMAGE[case]
    a = Run(cfg, tok)
    a.step()
    ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2)
    damage(ckpt / name)
    assert problem(ckpt) == (f"{name} does not match its sha256 in SHA256SUMS: truncated or altered "
                             f"({(ckpt / name).stat().st_size} bytes)")
    b = Run(cfg, tok, seed=5)
    before = weights(b.student)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt, **b.objects())
    assert str(info.value).startswith(f"checkpoint {ckpt} cannot be resumed: {name} does not match its sha256")
    assert_same(weights(b.student), before)  # nothing was loaded


def test_sha256sums_is_what_sha256sum_checks(cfg, tok, tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, **Run(cfg, tok).objects(), keep=2)
    ok = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=ckpt, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == 4, ok.stdout
    _flip_a_bit(ckpt / "student.safetensors")
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=ckpt, capture_output=True).returncode != 0


@pytest.mark.parametrize("name", ["rank_00000.pt", "trainer_state.pt", "student.safetensors"])
def test_a_missing_file_is_named(cfg, tok, tmp_path, name):
    ckpt = save_checkpoint(tmp_path, 1, **Run(cfg, tok).objects(), keep=2)
    (ckpt / name).unlink()
    assert problem(ckpt) == f"{name} is missing (listed in SHA256SUMS)"


def test_a_checkpoint_of_fewer_processes_says_so(cfg, tok, tmp_path):
    """Rank 1 of a 2-process run looks for its state in a 1-process checkpoint."""
    ckpt = save_checkpoint(tmp_path, 1, **Run(cfg, tok).objects(), keep=2)
    msg = _own_problem(ckpt, rank=1, main=False)
    assert msg == ("rank_00001.pt is missing: the checkpoint holds the state of 1 process(es) (rank_00000.pt) and "
                   "this run has more; resume with the same number of processes")


@pytest.mark.parametrize("name, damage, expected", [
    ("student.safetensors", _truncate, "student.safetensors cannot be read ("),
    ("rank_00000.pt", None, "rank_00000.pt is missing"),
    ("trainer_state.pt", None, "trainer_state.pt is missing"),
])
def test_a_checkpoint_without_sha256sums_is_still_checked(cfg, tok, tmp_path, name, damage, expected):
    """Checkpoints written before SHA256SUMS: their files must be there and their weights' headers read."""
    ckpt = save_checkpoint(tmp_path, 1, **Run(cfg, tok).objects(), keep=2)
    (ckpt / "SHA256SUMS").unlink()
    assert problem(ckpt) is None
    if damage:
        damage(ckpt / name)
    else:
        (ckpt / name).unlink()
    assert problem(ckpt).startswith(expected)


def test_a_truncated_trainer_state_without_sha256sums_names_the_file(cfg, tok, tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, **Run(cfg, tok).objects(), keep=2)
    (ckpt / "SHA256SUMS").unlink()
    _truncate(ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint file {ckpt / 'trainer_state.pt'} cannot be read"):
        load_checkpoint(ckpt, **Run(cfg, tok).objects())


def test_resume_auto_passes_over_damaged_checkpoints_to_the_newest_intact_one(cfg, tok, tmp_path, capsys):
    a = Run(cfg, tok)
    steps = {s: save_checkpoint(tmp_path, s, **a.objects(), keep=5) for s in (2, 4, 6)}
    assert resume_point("auto", tmp_path) == steps[6]
    _truncate(steps[6] / "student.safetensors")
    (steps[4] / "rank_00000.pt").write_bytes(b"")
    assert resume_point("auto", tmp_path) == steps[2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("mmdistill: passing over damaged checkpoint(s): step_00000006: student.safetensors "
                             "does not match its sha256 in SHA256SUMS")
    assert "step_00000004: rank_00000.pt does not match" in err[0]
    assert err[0].endswith(f"resuming from the newest intact one, {steps[2]}")

    _flip_a_bit(steps[2] / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"^train.resume=auto: no checkpoint in .* is intact \(step_00000006: "):
        resume_point("auto", tmp_path)
    with pytest.raises(CheckpointError, match=r"^train.resume: checkpoint '.*step_00000002' cannot be resumed: "
                                              r"trainer_state.pt does not match"):
        resume_point(str(steps[2]), tmp_path)
    assert resume_point("auto", tmp_path / "elsewhere") is None  # nothing to resume: a fresh run
    assert resume_point("none", tmp_path) is None


def test_non_finite_weights_are_never_checkpointed(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    save_checkpoint(tmp_path, 1, **a.objects(), keep=5)
    with torch.no_grad():
        a.student.lm_head.weight[3, :2] = float("nan")
    with pytest.raises(FloatingPointError) as info:
        save_checkpoint(tmp_path, 2, **a.objects(), keep=5)
    n = a.student.lm_head.weight.numel()
    newest = tmp_path / "checkpoints" / "step_00000001"
    assert str(info.value) == (f"step 2: the student's weights are not finite (lm_head.weight: 2 of {n} values); "
                               f"no checkpoint was written; the newest checkpoint is {newest} (train.resume=auto "
                               "continues from it)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_the_record_a_resumed_run_carries_over(cfg, tok, tmp_path):
    a = Run(cfg, tok)
    ckpt = save_checkpoint(tmp_path, 1, **a.objects(), keep=2, record={"accuracy_before": 0.25})
    record = {}
    load_checkpoint(ckpt, **Run(cfg, tok).objects(), record=record)
    assert record == {"accuracy_before": 0.25}
