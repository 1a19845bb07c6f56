"""Real multi-process training on this CPU machine (accelerate launch, gloo).

Two processes train a composite VLM data-parallel on shards: each rank reads its own shards,
the replicas stay identical, and a resume from the step-2 checkpoint (every rank restoring its
own RNG states and data position) logs exactly what the uninterrupted run logged.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmdistill.tasks.scenes import make_samples
from tests.helpers import DETERMINISTIC, REPO, command_env, metrics_rows, wait_for_rows, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def env() -> dict:
    return command_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def launch(*overrides: str, processes: int = 2, config: str = "tiny_vlm", config_file: str | None = None,
           script: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` with flags, or with one of configs/accelerate/ (`config_file`);
    `script`: a file that runs `mmdistill.cli.main` on its arguments, instead of `-m mmdistill`."""
    how = ["--config_file", config_file] if config_file else \
        ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", "0",
           *([str(script)] if script else ["-m", "mmdistill"]), "train", config, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def assert_resumed_like(full: Path, resumed: Path) -> None:
    """A 4-step run resumed from its step-2 checkpoint logs steps 3-4 exactly as the run that was
    never stopped, and ends with the same weights."""
    a = {r["step"]: r for r in metrics_rows(full)}
    b = {r["step"]: r for r in metrics_rows(resumed)}
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in DETERMINISTIC:
            assert a[step][key] == b[step][key], (step, key)
    assert json.loads((full / "summary.json").read_text())["replica_checksums"] == \
        json.loads((resumed / "summary.json").read_text())["replica_checksums"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    train = write_shards(root / "train", make_samples(32, 0, "train", image_size=32, max_objects=3))
    test = write_shards(root / "test", make_samples(4, 0, "test", image_size=32, max_objects=3))
    base = ["data.source=shards", f"data.train_path={train}", f"data.test_path={test}", "train.max_steps=4",
            "train.checkpoint_every=2", "train.sample_every=1", "eval.num_samples=2"]
    full = root / "full"
    r = launch(*base, f"train.output_dir={full}")
    assert r.returncode == 0, r.stderr[-4000:]
    resumed = root / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    r2 = launch(*base, f"train.output_dir={resumed}", "train.resume=auto")
    assert r2.returncode == 0, r2.stderr[-4000:]
    return full, resumed, r2


def test_two_ranks_read_disjoint_shards_and_stay_identical(ddp):
    full, _, _ = ddp
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2
    a, b = summary["replica_checksums"]
    assert a == b  # the replicas hold the same weights after training
    ids = []
    for rank in (0, 1):
        logged = [json.loads(line) for line in (full / "rollouts" / f"rank_{rank:05d}.jsonl").read_text().splitlines()]
        assert {r["step"] for r in logged} == {1, 2, 3, 4}
        assert all(r["images"][0].endswith(f"#{r['id']}") for r in logged)  # where each image came from
        ids.append({r["id"] for r in logged})
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # ranks never train on the same sample
    ckpt = full / "checkpoints" / "step_00000004"
    assert {p.name for p in ckpt.iterdir()} >= {"rank_00000.pt", "rank_00001.pt", "trainer_state.pt"}


def test_two_ranks_share_a_grad_prefix_and_sync_it(tmp_path):
    """OPD to the student's own privileged view reads two student views that share the prompt
    prefix, computed once with gradient outside the DDP wrapper. With 2 micro-batches per step
    (the first unsynced) the gradients still sync exactly as when every view runs alone."""
    runs = {}
    for name, extra in (("shared", []), ("alone", ["train.share_prefix=false"])):
        runs[name] = tmp_path / name
        r = launch("method.name=opd", "method.opd.target=student_priv", "train.max_steps=3", "train.grad_accum=2",
                   "eval.num_samples=0", "train.sample_every=0", "train.keep_checkpoints=0",
                   f"train.output_dir={runs[name]}", *extra, config="tiny")
        assert r.returncode == 0, r.stderr[-4000:]
    a, b = json.loads((runs["shared"] / "summary.json").read_text())["replica_checksums"]
    assert a == b
    shared, alone = metrics_rows(runs["shared"]), metrics_rows(runs["alone"])
    assert all(row["time_view_student_prefix"] > 0 for row in shared)
    for x, y in zip(shared, alone):
        assert x["grad_norm"] > 0
        assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-5), x["step"]


def test_dopd_routes_by_the_whole_steps_tokens_on_every_rank_and_micro_batch(tmp_path):
    """DOPD's thresholds are statistics of the optimizer step: 2 processes x 2 micro-batches of one
    prompt train exactly as one process with both prompts in one micro-batch (greedy rollouts give
    every rank the same responses, and plain means are unchanged by the duplicates). Each
    micro-batch routed by itself trains otherwise."""
    common = ("method.name=dopd", "method.dopd.threshold=mean", "rollout.temperature=0", "train.max_steps=2",
              "eval.num_samples=0", "train.sample_every=0", "train.keep_checkpoints=0")
    whole = tmp_path / "whole"
    r = subprocess.run([sys.executable, "-m", "mmdistill", "train", "tiny", "--no-launch", *common,
                        "train.batch_size=2", f"train.output_dir={whole}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for scope in ("step", "micro_batch"):
        r = launch(*common, "train.batch_size=1", "train.grad_accum=2", f"method.dopd.threshold_scope={scope}",
                   f"train.output_dir={tmp_path / scope}", config="tiny")
        assert r.returncode == 0, r.stderr[-4000:]
    for a, b in zip(metrics_rows(whole), metrics_rows(tmp_path / "step"), strict=True):
        for key in ("loss", "grad_norm", "threshold_a", "threshold_qs", "threshold_qt"):
            # float32 sums gathered in another order: 1.02e-6 apart measured at step 2 (the reverse-KL HT default)
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (a["step"], key, a[key], b[key])
    assert not math.isclose(metrics_rows(whole)[0]["loss"], metrics_rows(tmp_path / "micro_batch")[0]["loss"],
                            rel_tol=1e-3)


def test_two_rank_resume_matches_the_uninterrupted_run(ddp):
    full, resumed, r2 = ddp
    assert "resumed from" in r2.stdout + r2.stderr
    assert_resumed_like(full, resumed)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Rank 1 alone gets SIGUSR1 (a scheduler's warning) during step 2: both ranks finish step 2,
    write its checkpoint together (both rank files) and exit with one line each; the run resumes
    from it."""
    script = tmp_path / "usr1_on_rank_1.py"
    script.write_text(
        "import os, signal, sys\n"
        "from mmdistill.methods.opd import OPD\n"
        "real, calls = OPD.loss, []\n"
        "def loss(self, views, batch):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    return real(self, views, batch)\n"
        "OPD.loss = loss\n"
        "from mmdistill.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "run"
    common = [f"train.output_dir={run}", "train.max_steps=4", "eval.num_samples=0", "train.sample_every=0"]
    r = launch(*common, config="tiny", script=script)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines()
             if line.startswith("mmdistill: stopped by SIGUSR1 after step 2; the newest checkpoint is ")]
    assert len(lines) == 2, r.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert [row["step"] for row in metrics_rows(run)] == [1, 2] and not (run / "student").exists()
    r = launch(*common, "train.resume=auto", config="tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in metrics_rows(run)] == [1, 2, 3, 4]


def test_sigterm_to_the_launcher_stops_both_ranks_after_one_step(tmp_path):
    """SIGTERM to `accelerate launch` (what a scheduler signals): its agent passes it on, and
    both ranks finish the same step, checkpoint it and say so."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "mmdistill", "train", "tiny",
           "train.max_steps=200", "eval.num_samples=0", "train.sample_every=0", f"train.output_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0
    last = metrics_rows(run)[-1]["step"]
    lines = [line for line in err.splitlines() if line.startswith(f"mmdistill: stopped by SIGTERM after step {last}; ")]
    assert len(lines) == 2, err[-3000:]
    assert (sorted(p.name for p in (run / "checkpoints" / f"step_{last:08d}").glob("rank_*.pt"))
            == ["rank_00000.pt", "rank_00001.pt"])


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """The same DOPD run (EMA self-teacher: gathered from the shards every step; 2 micro-batches
    per step, synced on the last) data-parallel and sharded with FSDP2, and the sharded one
    resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("fsdp")
    base = ["method.name=dopd", "teacher.mode=ema", "train.max_steps=4", "train.checkpoint_every=2",
            "train.grad_accum=2", "train.sample_every=0", "eval.num_samples=2"]
    runs = {}
    # FSDP scores views one by one; so does this DDP run, or float-level differences could flip
    # a DOPD token's regime (the shared prefix is tested on its own).
    for name, extra in (("ddp", ["train.share_prefix=false"]), ("fsdp", ["train.fsdp=true"])):
        runs[name] = root / name
        r = launch(*base, *extra, f"train.output_dir={runs[name]}", config="tiny")
        assert r.returncode == 0, r.stderr[-4000:]
    resumed = root / "resumed"
    shutil.copytree(runs["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    r = launch(*base, "train.fsdp=true", f"train.output_dir={resumed}", "train.resume=auto", config="tiny")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    # accelerate's own FSDP config file, where CPU processes would otherwise quietly run unsharded
    from_file = root / "from_file"
    r = launch(*base, f"train.output_dir={from_file}", config="tiny", config_file="configs/accelerate/fsdp.yaml")
    assert r.returncode == 0, r.stderr[-4000:]
    return runs["ddp"], runs["fsdp"], resumed, from_file


def test_fsdp_trains_like_data_parallel(fsdp):
    """Sharding changes where the weights live, not the math: same losses, gradient norms and
    final weights as DDP (up to the order of float sums)."""
    import torch
    from safetensors.torch import load_file

    ddp_run, fsdp_run, *_ = fsdp
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["fsdp"] is True and summary["processes"] == 2
    a, b = metrics_rows(ddp_run), metrics_rows(fsdp_run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert math.isclose(x[key], y[key], rel_tol=1e-4, abs_tol=1e-7), (x["step"], key)
        assert x["tokens"] == y["tokens"]
    assert a[-1]["loss"] != a[0]["loss"]  # the run moved
    wa, wb = (load_file(str(ddp_run / "student" / "model.safetensors")),
              load_file(str(fsdp_run / "student" / "model.safetensors")))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert json.loads((fsdp_run / "student" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for ckpt in ("step_00000002", "step_00000004"):  # whole weights and a by-name optimizer state
        assert load_file(str(fsdp_run / "checkpoints" / ckpt / "student.safetensors")).keys() >= wa.keys()
        assert (fsdp_run / "checkpoints" / ckpt / "teacher.safetensors").is_file()


def test_fsdp_resume_matches_the_uninterrupted_run(fsdp):
    _, fsdp_run, resumed, _ = fsdp
    assert_resumed_like(fsdp_run, resumed)


def test_accelerates_fsdp_config_file_runs_mmdistills_fsdp(fsdp):
    """configs/accelerate/fsdp.yaml is the train.fsdp=true run: the same per-step numbers, and
    the saved config says what ran."""
    from omegaconf import OmegaConf

    _, fsdp_run, _, from_file = fsdp
    assert json.loads((from_file / "summary.json").read_text())["fsdp"] is True
    assert OmegaConf.load(from_file / "config.yaml").train.fsdp is True
    a, b = metrics_rows(fsdp_run), metrics_rows(from_file)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in DETERMINISTIC:
            assert x[key] == y[key], (x["step"], key)


def test_mmdistill_train_follows_the_default_accelerate_config(tmp_path):
    """With `accelerate config` set to 2 processes, plain `mmdistill train` runs data-parallel;
    --no-launch keeps it in one process."""
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    ddp_file = (REPO / "configs" / "accelerate" / "ddp.yaml").read_text()
    (home / "accelerate" / "default_config.yaml").write_text(ddp_file + "main_process_port: 0\n")
    common = ["train.max_steps=1", "eval.num_samples=0", "train.sample_every=0", "train.keep_checkpoints=0"]
    for flag, processes in (([], 2), (["--no-launch"], 1)):
        out = tmp_path / f"run{processes}"
        cmd = [sys.executable, "-m", "mmdistill", "train", "tiny", *flag, *common, f"train.output_dir={out}"]
        r = subprocess.run(cmd, cwd=REPO, env={**env(), "HF_HOME": str(home)}, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        assert json.loads((out / "summary.json").read_text())["processes"] == processes


def test_fsdp_bf16_computes_in_bf16_and_keeps_float32_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    common = ["method.name=dopd", "train.fsdp=true", "train.max_steps=2", "eval.num_samples=0", "train.sample_every=0",
              "train.keep_checkpoints=0"]
    out, ref = tmp_path / "bf16", tmp_path / "fp32"
    for d, precision in ((out, "bf16"), (ref, "no")):
        r = launch(*common, f"train.mixed_precision={precision}", f"train.output_dir={d}", config="tiny")
        assert r.returncode == 0, r.stderr[-4000:]
    # same rollouts and weights at step 1: only the compute dtype differs
    assert metrics_rows(out)[0]["loss"] != metrics_rows(ref)[0]["loss"]
    assert json.loads((out / "summary.json").read_text())["mixed_precision"] == "bf16"
    assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in metrics_rows(out))
    weights = load_file(str(out / "student" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # FSDP keeps float32 masters; bf16 is compute only


def zero_config(directory: Path, stage: int, **changes: str) -> str:
    """configs/accelerate/deepspeed_zero2.yaml at another stage (and other lines changed)."""
    text = ((REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text()
            .replace("zero_stage: 2", f"zero_stage: {stage}"))
    for old, new in changes.items():
        text = text.replace(old, new)
    path = directory / f"zero{stage}.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module", params=[2, 3])
def zero(tmp_path_factory, request):
    """The fsdp fixture's DOPD run under DeepSpeed ZeRO-2 (optimizer state and gradients
    partitioned across the 2 processes) and ZeRO-3 (the weights too), and resumed from its
    step-2 checkpoint."""
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    return run_and_resume(root, zero_config(root, request.param))


def run_and_resume(root: Path, config_file: str) -> tuple[Path, Path]:
    """The fsdp fixture's DOPD run (4 steps) under an accelerate config file, and the same run
    resumed from its step-2 checkpoint."""
    base = ["method.name=dopd", "teacher.mode=ema", "train.max_steps=4", "train.checkpoint_every=2",
            "train.grad_accum=2", "train.sample_every=0", "eval.num_samples=2", "train.share_prefix=false"]
    run, resumed = root / "run", root / "resumed"
    r = launch(*base, f"train.output_dir={run}", config="tiny", config_file=config_file)
    assert r.returncode == 0, r.stderr[-4000:]
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    r = launch(*base, f"train.output_dir={resumed}", "train.resume=auto", config="tiny", config_file=config_file)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    return run, resumed


def test_deepspeed_zero_trains_like_data_parallel(fsdp, zero):
    """Partitioning the optimizer, gradients (and under ZeRO-3 the weights) changes where they
    live, not the math: the same losses, gradient norms and final weights as DDP, with
    identical replicas. Under ZeRO-3 the rollouts, the EMA teacher and the checkpoints gather."""
    assert_like_data_parallel(fsdp[0], zero[0])


def assert_like_data_parallel(ddp_run: Path, run: Path) -> None:
    import torch
    from safetensors.torch import load_file

    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"] == "DEEPSPEED" and summary["processes"] == 2
    assert len(set(summary["replica_checksums"])) == 1
    a, b = metrics_rows(ddp_run), metrics_rows(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert math.isclose(x[key], y[key], rel_tol=1e-4, abs_tol=1e-7), (x["step"], key)
        assert x["tokens"] == y["tokens"] and x["lr"] == y["lr"]
    wa, wb = (load_file(str(ddp_run / "student" / "model.safetensors")),
              load_file(str(run / "student" / "model.safetensors")))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    ckpt = run / "checkpoints" / "step_00000002"
    assert (sorted(p.name for p in ckpt.glob("zero_optimizer_rank_*.pt"))
            == ["zero_optimizer_rank_00000.pt", "zero_optimizer_rank_00001.pt"])
    assert load_file(str(ckpt / "student.safetensors")).keys() == wa.keys()  # whole weights, also under ZeRO-3


def test_deepspeed_zero_resume_matches_the_uninterrupted_run(zero):
    assert_resumed_like(*zero)


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """The zero fixture's run at stage 3 with the parameters and the optimizer state offloaded
    to the CPU (DeepSpeed's CPU AdamW), and resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("offload")
    return run_and_resume(root, zero_config(root, 3,
                                            **{"offload_optimizer_device: none": "offload_optimizer_device: cpu",
                                               "offload_param_device: none": "offload_param_device: cpu"}))


def test_deepspeed_offload_trains_like_data_parallel_and_resumes(fsdp, offloaded):
    """Offloading moves the weights and the optimizer state to the CPU, not the math. A resume
    restores the float32 masters and moments: step 3 is logged exactly; step 4, after the first
    update since the resume, to float rounding (DeepSpeed's CPU Adam recomputes beta^t with pow
    where the unbroken run multiplied it up step by step)."""
    run, resumed = offloaded
    assert_like_data_parallel(fsdp[0], run)
    a = {r["step"]: r for r in metrics_rows(run)}
    b = {r["step"]: r for r in metrics_rows(resumed)}
    assert sorted(b) == [1, 2, 3, 4]
    assert all(a[3][key] == b[3][key] for key in DETERMINISTIC)
    for key in ("loss", "grad_norm"):
        assert math.isclose(a[4][key], b[4][key], rel_tol=1e-4, abs_tol=1e-7), key


def test_a_zero_checkpoint_is_not_resumed_without_deepspeed(zero):
    import torch

    from mmdistill.training.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="written under DeepSpeed ZeRO"):
        load_checkpoint(zero[0] / "checkpoints" / "step_00000002", student=torch.nn.Linear(1, 1), optimizer=None,
                        scheduler=None, teacher=None, stream=None)


def test_deepspeed_bf16_resumes_exactly(tmp_path):
    """Under DeepSpeed bf16 the engine computes and keeps the weights in bf16, with float32
    masters in the optimizer partitions: a resume restores those, so step 2 is logged exactly."""
    import torch
    from safetensors.torch import load_file

    common = ["method.name=dopd", "train.max_steps=2", "train.checkpoint_every=1", "eval.num_samples=0",
              "train.sample_every=0"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    how = dict(config="tiny",
               config_file=zero_config(tmp_path, 1, **{'mixed_precision: "no"': "mixed_precision: bf16"}))
    r = launch(*common, f"train.output_dir={run}", **how)
    assert r.returncode == 0, r.stderr[-4000:]
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    r = launch(*common, f"train.output_dir={resumed}", "train.resume=auto", **how)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((run / "summary.json").read_text())["mixed_precision"] == "bf16"
    a, b = metrics_rows(run), metrics_rows(resumed)
    assert all(math.isfinite(x["loss"]) and x["grad_norm"] > 0 for x in a)
    for key in DETERMINISTIC:
        assert a[1][key] == b[1][key], key
    assert {w.dtype for w in load_file(str(run / "student" / "model.safetensors")).values()} == {torch.bfloat16}


@pytest.mark.parametrize("stage, config, message", [
    (0, "tiny", "zero_stage=0: stage 0 shards nothing; use configs/accelerate/ddp.yaml"),
    (3, "tiny_vlm", "zero_stage=3: a CompositeVLM student cannot be partitioned"),
])
def test_a_deepspeed_launch_mmdistill_cannot_honour_stops_with_one_line(tmp_path, stage, config, message):
    r = launch("train.max_steps=1", f"train.output_dir={tmp_path / 'run'}", config=config,
               config_file=zero_config(tmp_path, stage))
    assert r.returncode != 0
    assert f"mmdistill: accelerate config {message}" in r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr


def test_a_step_cut_short_by_the_end_of_the_data_still_syncs(tmp_path):
    """data.epochs=1 leaves each rank 4 batches for steps of 3 micro-batches: step 2 has one.
    That one is the step's last, so its gradients are synced (the replicas stay identical)."""
    train = write_shards(tmp_path / "train", make_samples(32, 0, "train", image_size=32, max_objects=3))
    out = tmp_path / "run"
    r = launch("data.source=shards", f"data.train_path={train}", "data.epochs=1", "train.grad_accum=3",
               "train.max_steps=10", "eval.num_samples=0", "train.sample_every=0", "train.keep_checkpoints=0",
               f"train.output_dir={out}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "data exhausted after 1 epoch(s); stopping at step 2" in r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert len(set(summary["replica_checksums"])) == 1


@pytest.mark.parametrize("student_fsdp", [False, True])
def test_a_sharded_teacher_scores_like_a_replicated_one(tmp_path, student_fsdp):
    """train.fsdp_teacher=true keeps 1/2 of the frozen teacher on each process (FSDP2, forward
    only), under a data-parallel or a sharded student: the run logs the numbers of the run whose
    teacher is whole on every process."""
    common = ["method.name=dopd", "teacher.mode=model", "train.max_steps=3", "train.sample_every=0",
              "eval.num_samples=0", "train.keep_checkpoints=0", "train.share_prefix=false",
              f"train.fsdp={str(student_fsdp).lower()}"]
    runs = {}
    for sharded in (True, False):
        runs[sharded] = tmp_path / f"teacher_sharded_{sharded}"
        r = launch(*common, f"train.fsdp_teacher={str(sharded).lower()}", f"train.output_dir={runs[sharded]}",
                   config="tiny")
        assert r.returncode == 0, r.stderr[-4000:]
        assert json.loads((runs[sharded] / "summary.json").read_text())["fsdp_teacher"] is sharded
    a, b = metrics_rows(runs[True]), metrics_rows(runs[False])
    assert [r["step"] for r in a] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5), (x["step"], key)
        assert x["tokens"] == y["tokens"]


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's loss turns NaN at step 2 (rank 0's does not): both ranks stop at that step with
    the same line, before any backward, instead of rank 0 waiting for rank 1 in a collective."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.helpers import nan_at\n"
        "from mmdistill.methods.opd import OPD\n"
        "OPD.loss = nan_at(2, rank=1)\n"
        "from mmdistill.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "run"
    r = launch(f"train.output_dir={run}", "train.max_steps=4", "train.checkpoint_every=1", "eval.num_samples=0",
               "train.sample_every=0", config="tiny", script=script)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines()
             if line.startswith("mmdistill: step 2: the loss is not finite on rank(s) [1]")]
    assert len(lines) == 2, r.stderr[-3000:]  # one from each rank
    assert sorted("this rank's: nan" in line for line in lines) == [False, True]
    assert all("step_00000001" in line for line in lines)
    assert [row["step"] for row in metrics_rows(run)] == [1]


def test_a_damaged_rank_file_makes_every_rank_fall_back_together(ddp, tmp_path):
    """Only rank 1 reads (and checks) rank_00001.pt: emptied in the newest checkpoint, both ranks
    pass over that checkpoint together, resume from the one before, and end as the run that was
    never stopped. One rank falling back alone would have the two resume different steps."""
    full, _, _ = ddp
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "student")
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step_00000004" / "rank_00001.pt").write_bytes(b"")
    base = ["data.source=shards", f"data.train_path={full.parent / 'train'}", f"data.test_path={full.parent / 'test'}",
            "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=1", "eval.num_samples=2"]
    r = launch(*base, f"train.output_dir={run}", "train.resume=auto")
    assert r.returncode == 0, r.stderr[-4000:]
    passed = [line for line in r.stderr.splitlines() if "passing over damaged" in line]
    assert passed == [f"mmdistill: passing over damaged checkpoint(s): step_00000004: rank_00001.pt does not match its "
                      f"sha256 in SHA256SUMS: truncated or altered (0 bytes); resuming from the newest intact one, "
                      f"{run / 'checkpoints' / 'step_00000002'}"], r.stderr[-3000:]
    assert "at step 2" in r.stdout
    assert_resumed_like(full, run)


def test_a_checkpoint_of_one_process_is_not_resumed_by_two(tmp_path):
    run = tmp_path / "run"
    common = ["train.max_steps=2", "train.checkpoint_every=1", "eval.num_samples=0", "train.sample_every=0"]
    r = subprocess.run([sys.executable, "-m", "mmdistill", "train", "tiny", *common, f"train.output_dir={run}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "train.max_steps=3", f"train.output_dir={run}", "train.resume=auto", config="tiny")
    assert r.returncode != 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("mmdistill: train.resume=auto")]
    ckpt = run / "checkpoints" / "step_00000002"
    assert lines == [f"mmdistill: train.resume=auto: checkpoint {ckpt} cannot be resumed: rank_00001.pt is missing: "
                     "the checkpoint holds the state of 1 process(es) (rank_00000.pt) and this run has more; resume "
                     "with the same number of processes"] * 2, r.stderr[-3000:]
