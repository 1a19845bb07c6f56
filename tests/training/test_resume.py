"""End to end: a run resumed from its step-2 checkpoint logs exactly what the uninterrupted run logged.

Two real trainings (configs/tiny.yaml, CPU): an uninterrupted 4-step run, then a resume from a copy
of its directory with the step-4 checkpoint and the student output deleted (the state a run killed
between steps 2 and 4 leaves behind; the copy is byte-identical to running the first part again).
Then runs stopped for real, by SIGKILL and by SIGTERM, and resumed.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import DETERMINISTIC, REPO, command_env, metrics_rows, run_mmdistill, wait_for_rows

pytestmark = pytest.mark.slow  # every test trains in a subprocess; the module fixture alone takes ~10 s

BASE = ["tiny", "train.max_steps=4", "train.checkpoint_every=2", "eval.num_samples=0"]


def train(*overrides: str) -> subprocess.CompletedProcess:
    return run_mmdistill("train", *BASE, *overrides, timeout=300, CUDA_VISIBLE_DEVICES="")


def env() -> dict:
    """For the runs a signal stops."""
    return command_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def assert_same_steps(full: Path, other: Path, steps: int) -> None:
    """`other` logged steps 1..steps exactly as `full` did."""
    a = {row["step"]: row for row in metrics_rows(full)}
    b = {row["step"]: row for row in metrics_rows(other)}
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in DETERMINISTIC:
            assert a[step][key] == b[step][key], (step, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full = root / "full"
    r = train(f"train.output_dir={full}")
    assert r.returncode == 0, r.stderr[-3000:]

    resumed = root / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    shutil.rmtree(resumed / "student")
    (resumed / "summary.json").unlink()
    # the killed run had logged steps 1 and 2 only
    kept = [row for row in metrics_rows(full) if row["step"] <= 2]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    r2 = train(f"train.output_dir={resumed}", "train.resume=auto")
    assert r2.returncode == 0, r2.stderr[-3000:]
    return full, resumed, r2


def test_uninterrupted_run_layout(runs):
    full, _, _ = runs
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    assert [row["step"] for row in metrics_rows(full)] == [1, 2, 3, 4]
    assert json.loads((full / "summary.json").read_text())["steps"] == 4


def test_resume_picks_the_latest_checkpoint(runs):
    _, resumed, r2 = runs
    out = r2.stdout + r2.stderr
    assert "resumed from" in out and "step_00000002" in out and "at step 2" in out
    assert [row["step"] for row in metrics_rows(resumed)] == [1, 2, 3, 4]
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4


def test_resumed_steps_match_the_uninterrupted_run(runs):
    full, resumed, _ = runs
    a = {row["step"]: row for row in metrics_rows(full)}
    b = {row["step"]: row for row in metrics_rows(resumed)}
    diffs = {
        (step, k): abs(a[step][k] - b[step][k])
        for step in (3, 4)
        for k in DETERMINISTIC
        if a[step][k] != b[step][k]
    }
    assert not diffs, f"resumed run diverged: {diffs}"
    assert a[3]["loss"] == b[3]["loss"] and a[4]["loss"] == b[4]["loss"]


def test_resumed_final_weights_match(runs):
    full, resumed, _ = runs
    for rel in ("student/model.safetensors", "checkpoints/step_00000004/student.safetensors"):
        wa, wb = load_file(str(full / rel)), load_file(str(resumed / rel))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert wa[k].equal(wb[k]), (rel, k)


def test_resume_none_on_a_run_with_checkpoints_fails_clearly(runs):
    full, _, _ = runs
    before = (full / "metrics.jsonl").read_text()
    config_before = (full / "config.yaml").read_text()
    r = train(f"train.output_dir={full}", "train.resume=none")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "already holds checkpoints" in last and "train.resume=auto" in last and str(full) in last
    # nothing was touched
    assert (full / "metrics.jsonl").read_text() == before
    assert (full / "config.yaml").read_text() == config_before
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]


def test_dopds_frozen_self_target_is_the_initial_student_even_after_a_resume(tmp_path):
    """method.dopd.self_target=frozen scores q_S and the HS/LL targets with the initial student:
    at step 1 that is the live student (identical numbers), later it is not; and a resume rebuilds
    it from the initial weights, not from the checkpoint (steps 3-4 exactly as uninterrupted)."""
    dopd = ["method.name=dopd", "train.share_prefix=false"]  # both score student_priv alone: exact equality at step 1
    live, frozen = tmp_path / "live", tmp_path / "frozen"
    for out, target in ((live, "live"), (frozen, "frozen")):
        r = train(*dopd, f"method.dopd.self_target={target}", f"train.output_dir={out}")
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics_rows(live), metrics_rows(frozen)
    for key in ("loss", "self_kl", "share_hs", "share_ht"):
        assert a[0][key] == b[0][key], key  # step 1: the initial student is the student
    assert a[-1]["self_kl"] != b[-1]["self_kl"]  # step 4: they have parted
    resumed = tmp_path / "resumed"
    shutil.copytree(frozen, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    r = train(*dopd, "method.dopd.self_target=frozen", f"train.output_dir={resumed}", "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    c = {row["step"]: row for row in metrics_rows(resumed)}
    for step in (3, 4):
        for key in (*DETERMINISTIC, "self_kl"):
            assert b[step - 1][key] == c[step][key], (step, key)


def test_sigkill_mid_training_then_resume_gives_the_same_losses(tmp_path):
    """A run killed with SIGKILL (no chance to clean up) resumes from its newest complete
    checkpoint, ignores a half-written one, and logs exactly the uninterrupted run's losses."""
    base = ["tiny", "train.max_steps=30", "train.checkpoint_every=5", "train.keep_checkpoints=10", "eval.num_samples=0",
            "train.sample_every=0"]
    cmd = [sys.executable, "-m", "mmdistill", "train", *base]
    full = tmp_path / "full"
    r = subprocess.run([*cmd, f"train.output_dir={full}"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"train.output_dir={killed}"], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000010").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "step_00000030" not in done  # killed in the middle
    half = killed / "checkpoints" / "step_00000099.tmp"  # a checkpoint a kill interrupted
    half.mkdir()
    (half / "student.safetensors").write_bytes(b"\0" * 10)

    r = subprocess.run([*cmd, f"train.output_dir={killed}", "train.resume=auto"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000099" not in r.stdout + r.stderr
    assert_same_steps(full, killed, 30)


def test_sigterm_checkpoints_the_step_and_resume_continues_exactly(tmp_path):
    """SIGTERM (a scheduler's time limit, a preemption) lets the run finish its step, write its
    checkpoint and exit with 143 and one line; the resumed run logs exactly the uninterrupted
    run's losses, with no step lost or repeated."""
    base = ["tiny", "train.max_steps=30", "train.keep_checkpoints=2", "eval.num_samples=0", "train.sample_every=0"]
    cmd = [sys.executable, "-m", "mmdistill", "train", *base]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    r = subprocess.run([*cmd, f"train.output_dir={full}"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen([*cmd, f"train.output_dir={stopped}"], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(proc, stopped, 3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, err[-3000:]
    last = metrics_rows(stopped)[-1]["step"]
    assert 3 <= last < 30
    assert err.strip().splitlines()[-1] == (f"mmdistill: stopped by SIGTERM after step {last}; "
                                            "the newest checkpoint is "
                                            f"{stopped / 'checkpoints' / f'step_{last:08d}'} "
                                            "(train.resume=auto continues from it)")
    assert not (stopped / "student").exists()
    r = subprocess.run([*cmd, f"train.output_dir={stopped}", "train.resume=auto"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_steps(full, stopped, 30)


def killed_copy(full: Path, to: Path) -> Path:
    """`full` as a run killed after its step-2 checkpoint leaves it (see the `runs` fixture)."""
    shutil.copytree(full, to)
    shutil.rmtree(to / "checkpoints" / "step_00000004")
    shutil.rmtree(to / "student")
    (to / "summary.json").unlink()
    return to


def test_a_resume_with_a_changed_config_is_refused_naming_the_keys(runs, tmp_path):
    full, _, _ = runs
    run = killed_copy(full, tmp_path / "run")
    first = (run / "config.yaml").read_text()
    r = train(f"train.output_dir={run}", "train.resume=auto", "optim.lr=0.01", "data.arith.num_train=32")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip() == (f"mmdistill: train.resume: the config differs from {run / 'config.yaml'} in "
                                "data.arith.num_train (64 -> 32), optim.lr (0.001 -> 0.01); set "
                                "train.resume_changed=true to continue step_00000002 with it anyway (config.yaml "
                                "keeps the first config)")
    assert (run / "config.yaml").read_text() == first and not list(run.glob("config.resume-*"))
    r = train(f"train.output_dir={run}", "train.resume=auto", "optim.lr=0.01", "data.arith.num_train=32",
              "train.resume_changed=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "config.yaml").read_text() == first  # the first run's config stays
    later = yaml.safe_load((run / "config.resume-1.yaml").read_text())
    assert later["optim"]["lr"] == 0.01 and later["train"]["resume_changed"] is True


def test_a_longer_max_steps_extends_a_run_without_asking(runs, tmp_path):
    full, _, _ = runs
    run = killed_copy(full, tmp_path / "run")
    r = train(f"train.output_dir={run}", "train.resume=auto", "train.max_steps=5", "train.sample_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in metrics_rows(run)] == [1, 2, 3, 4, 5]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["train"]["max_steps"] == 5


def test_resume_auto_passes_over_a_truncated_checkpoint_and_continues_exactly(runs, tmp_path):
    """The newest checkpoint's weights file cut in half (a disk filled up, a copy interrupted):
    one line names it, the run resumes from the one before and ends at the uninterrupted run's
    weights, bit for bit."""
    full, _, _ = runs
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "student")
    (run / "summary.json").unlink()
    weights = run / "checkpoints" / "step_00000004" / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    size = weights.stat().st_size
    r = train(f"train.output_dir={run}", "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    passed = [line for line in r.stderr.splitlines() if "damaged" in line]
    assert passed == [f"mmdistill: passing over damaged checkpoint(s): step_00000004: student.safetensors does not "
                      f"match its sha256 in SHA256SUMS: truncated or altered ({size} bytes); resuming from the "
                      f"newest intact one, {run / 'checkpoints' / 'step_00000002'}"], r.stderr
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert_same_steps(full, run, 4)
    assert load_file(str(weights)).keys()  # the step-4 checkpoint was written anew
    a, b = load_file(str(full / "student" / "model.safetensors")), load_file(str(run / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_accuracy_before_survives_a_resume(tmp_path):
    full = tmp_path / "full"
    r = train(f"train.output_dir={full}", "eval.num_samples=4")
    assert r.returncode == 0, r.stderr[-3000:]
    before = json.loads((full / "summary.json").read_text())["accuracy_before"]
    run = killed_copy(full, tmp_path / "run")
    r = train(f"train.output_dir={run}", "eval.num_samples=4", "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_before"] == before and "accuracy_after" in summary
