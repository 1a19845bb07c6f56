"""The loop's own promises, run in-process on tiny configs."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mmdistill.config import load_config
from mmdistill.training.loop import train
from tests.helpers import metrics_rows, nan_at


def run(tmp_path, name, *overrides):
    cfg = load_config("tiny", [f"train.output_dir={tmp_path / name}", "eval.num_samples=0", *overrides])
    run_dir = train(cfg)
    return load_file(str(run_dir / "student" / "model.safetensors")), metrics_rows(run_dir)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    # SFT batches are deterministic, and with equal micro-batch sizes the mean of
    # per-micro-batch means is the big batch's mean: the updates must agree.
    common = ["method=sft", "train.max_steps=2", "optim.grad_clip=0"]
    big, big_rows = run(tmp_path, "big", *common, "train.batch_size=8", "train.grad_accum=1")
    acc, acc_rows = run(tmp_path, "acc", *common, "train.batch_size=4", "train.grad_accum=2")
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-6), k
    for a, b in zip(big_rows, acc_rows):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and a["tokens"] == b["tokens"]
    other, _ = run(tmp_path, "other", *common, "train.batch_size=4", "train.grad_accum=1")
    assert any(not torch.allclose(big[k], other[k], atol=1e-6) for k in big)  # the check can fail


def test_lr_schedule_is_warmup_then_cosine(tmp_path):
    _, rows = run(tmp_path, "lr", "method=sft", "train.max_steps=6", "optim.lr=0.01", "optim.warmup_ratio=0.34")
    warmup = round(0.34 * 6)
    expected = [0.01 * s / warmup if s < warmup else 0.01 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (6 - warmup)))
                for s in range(6)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(r["lr"], e, abs_tol=1e-12) for r, e in zip(rows, expected))
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["rollout_len"] > 0 and math.isfinite(r["grad_norm"])


def test_keep_checkpoints_zero_writes_only_the_student(tmp_path):
    """A benchmark's many runs need no training state (1.6 GB each for SmolLM2)."""
    run(tmp_path, "none", "method=sft", "train.max_steps=2", "train.keep_checkpoints=0")
    assert not (tmp_path / "none" / "checkpoints").exists() and (tmp_path / "none" / "summary.json").exists()
    run(tmp_path, "one", "method=sft", "train.max_steps=2")
    assert [p.name for p in (tmp_path / "one" / "checkpoints").iterdir()] == ["step_00000002"]


def test_on_policy_draw_follows_the_methods_fraction():
    import random
    from types import SimpleNamespace

    from mmdistill.training.step import draw_on_policy

    assert all(draw_on_policy(SimpleNamespace(on_policy=True)) for _ in range(50))
    assert not any(draw_on_policy(SimpleNamespace(on_policy=False)) for _ in range(50))
    assert not any(draw_on_policy(SimpleNamespace(on_policy=False, on_policy_fraction=0.0)) for _ in range(50))
    random.seed(0)
    draws = [draw_on_policy(SimpleNamespace(on_policy=True, on_policy_fraction=0.3)) for _ in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    random.seed(0)  # the checkpointed Python RNG makes the sequence resumable
    assert draws == [draw_on_policy(SimpleNamespace(on_policy=True, on_policy_fraction=0.3)) for _ in range(2000)]


def test_gkd_mixes_rollouts_and_oracle_batches(tmp_path):
    _, rows = run(tmp_path, "gkd", "method=gkd", "method.gkd.lam=0.5", "train.max_steps=6")
    assert {r["on_policy"] for r in rows} == {0.0, 1.0}


def test_sharing_the_prompt_prefix_trains_like_scoring_each_view_alone(tmp_path):
    """AR-OPD reads two teacher views and DOPD two student views: with the shared prefix cache
    the run logs the same losses and ends at the same weights (up to float rounding)."""
    for method in ("ar_opd", "dopd"):
        common = [f"method={method}", "train.max_steps=3", "train.keep_checkpoints=0", "train.sample_every=0"]
        shared, shared_rows = run(tmp_path, f"{method}-shared", *common)
        alone, alone_rows = run(tmp_path, f"{method}-alone", *common, "train.share_prefix=false")
        assert all(r["time_view_teacher_prefix" if method == "ar_opd" else "time_view_student_prefix"] > 0
                   for r in shared_rows)
        assert not any(k.endswith("_prefix") for r in alone_rows for k in r)
        for a, b in zip(shared_rows, alone_rows):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-6), (method, a["step"])
        for k in shared:
            assert torch.allclose(shared[k], alone[k], atol=1e-4), (method, k)


def test_a_non_finite_loss_stops_the_run_before_its_step_is_applied(tmp_path, monkeypatch, capsys):
    """A NaN loss at step 3 stops the run with one line naming the step and the newest
    checkpoint (step 2), which is intact; nothing of step 3 is written (no row, checkpoint or
    final student)."""
    from mmdistill.cli import main
    from mmdistill.methods.opd import OPD

    monkeypatch.setattr(OPD, "loss", nan_at(3))
    out = tmp_path / "run"
    code = main(["train", "tiny", f"train.output_dir={out}", "eval.num_samples=0", "train.max_steps=5",
                 "train.checkpoint_every=2", "train.sample_every=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("mmdistill: step 3: the loss is not finite on rank(s) [0] (this rank's: nan); "
                              "the step was not applied; the newest checkpoint is ") and "step_00000002" in err[-1]
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert not (out / "student").exists() and not (out / "checkpoints" / "step_00000003").exists()
    weights = load_file(str(out / "checkpoints" / "step_00000002" / "student.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_held_out_accuracy_every_n_steps_and_the_rollouts_distinct_share(tmp_path):
    """eval.every scores the held-out samples along the run, on the weights of that step: the last
    row's accuracy is the one summary.json reports after training."""
    cfg = load_config("tiny", [f"train.output_dir={tmp_path / 'ev'}", "eval.num_samples=4", "eval.every=2",
                               "train.max_steps=4", "data.arith.num_test=4"])
    run_dir = train(cfg)
    rows = metrics_rows(run_dir)
    assert [("accuracy" in r) for r in rows] == [False, True, False, True]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[-1]["accuracy"] == summary["accuracy_after"]
    assert all(0 < r["rollout_distinct"] <= 1 for r in rows)


def test_distinct_rate_counts_responses_as_their_real_tokens():
    from mmdistill.core.batch import Batch
    from mmdistill.training.step import distinct_rate

    ids = torch.tensor([[5, 6, 0], [5, 6, 9], [5, 6, 0], [7, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # rows 0 and 1 are both "5 6" (padding differs), row 2 is "5 6 0", row 3 "7"
    assert distinct_rate(Batch(ids, mask, [{}] * 4)) == 3 / 4
    assert distinct_rate(Batch(ids[:1].repeat(3, 1), mask[:1].repeat(3, 1), [{}] * 3)) == 1 / 3


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run_before_its_step_is_applied(tmp_path, capsys):
    """optim.lr=1e30 (a real config, nothing patched): the loss stays finite while the gradient
    norm turns NaN. That step is not applied, the run stops with one line naming it and the
    newest checkpoint, which holds finite weights; exit status 1."""
    from mmdistill.cli import main

    out = tmp_path / "run"
    code = main(["train", "tiny", f"train.output_dir={out}", "eval.num_samples=0", "train.max_steps=8", "optim.lr=1e30",
                 "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.sample_every=0"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, last
    rows = metrics_rows(out)
    step = len(rows) + 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    newest = out / "checkpoints" / f"step_{step - 1:08d}"
    assert last == (f"mmdistill: step {step}: the gradient norm is not finite on rank(s) [0] (this rank's: nan); "
                    f"the step was not applied; the newest checkpoint is {newest} "
                    "(train.resume=auto continues from it)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == newest.name
    assert not (out / "student").exists()
    for ckpt in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(w).all() for w in load_file(str(ckpt / "student.safetensors")).values()), ckpt.name


def test_non_finite_weights_are_never_saved_as_the_student(tmp_path):
    from mmdistill.distributed import select
    from mmdistill.distributed.launch import make_accelerator
    from mmdistill.training.export import save_student
    from mmdistill.training.setup import build

    cfg = load_config("tiny", [f"train.output_dir={tmp_path / 'run'}", "eval.num_samples=0"])
    accelerator = make_accelerator(cfg)
    run = build(cfg, accelerator, select(accelerator, cfg))
    with torch.no_grad():
        run.plain.model.embed_tokens.weight[7, 0] = float("inf")
    with pytest.raises(FloatingPointError) as info:
        save_student(run, 3)
    n = run.plain.model.embed_tokens.weight.numel()
    assert str(info.value) == (f"after step 3: the student's weights are not finite (model.embed_tokens.weight: 1 of "
                               f"{n} values); the student was not saved; no checkpoint yet")
    assert not (tmp_path / "run" / "student").exists()


def test_a_data_error_during_training_is_one_line(tmp_path, capsys):
    """ContextTooLong surfaces at the first rollout (the preflight does not measure lengths): one
    line and exit 2, not a traceback; --traceback gives the traceback."""
    from mmdistill.adapters.text import ContextTooLong
    from mmdistill.cli import main

    args = ["train", "tiny", f"train.output_dir={tmp_path / 'run'}", "eval.num_samples=0", "train.max_length=20"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmdistill: sample '") and err[-1].endswith(
        "response tokens exceeds the context of 20 (raise train.max_length or shorten the sample)")
    with pytest.raises(ContextTooLong):
        main([*args, "--traceback"])


def test_diagnostics_are_computed_on_logged_steps_only(tmp_path, monkeypatch):
    """train.log_every=2 over 5 steps writes rows 2, 4 and 5; the per-token diagnostics run on
    those steps only, the logged rows carry them, and the weights are those of a run that
    computes them every step (diagnostics never touch the gradient)."""
    from mmdistill.methods.opd import OPD

    calls = []
    real = OPD._diagnostics_besides_kl
    monkeypatch.setattr(OPD, "_diagnostics_besides_kl",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    common = ["method=full_opd", "train.max_steps=5", "rollout.max_new_tokens=8"]
    every, every_rows = run(tmp_path, "every", *common)
    per_step = len(calls) // 5
    assert per_step >= 1 and len(calls) == 5 * per_step
    calls.clear()
    sparse, rows = run(tmp_path, "sparse", *common, "train.log_every=2")
    assert len(calls) == 3 * per_step
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert all("student_entropy" in r and "reverse_kl" in r for r in rows)
    assert [r["student_entropy"] for r in rows] == [every_rows[i]["student_entropy"] for i in (1, 3, 4)]
    for k in every:
        assert torch.equal(every[k], sparse[k]), k
