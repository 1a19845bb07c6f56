"""What can be sharded (the real 2-process FSDP runs are in test_distributed.py)."""
import pytest
import torch

from mmdistill.config import load_config
from mmdistill.distributed.fsdp import shard
from mmdistill.distributed.gather import full_parameters, whole_items
from mmdistill.models.loading import load
from mmdistill.models.weights import is_sharded, synced_generation


def test_a_composite_vlm_is_refused_by_name():
    student, _ = load(load_config("tiny_vlm").student, seed=0)
    with pytest.raises(ValueError, match="train.fsdp: a CompositeVLM student cannot be sharded"):
        shard(student)


def test_unsharded_models_pass_through_the_gathering_helpers():
    student, _ = load(load_config("tiny").student, seed=0)
    assert not is_sharded(student) and not synced_generation(student)
    state = dict(whole_items(student))
    assert state.keys() == student.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(full_parameters(student), student.parameters()))


def test_fsdp_in_one_process_is_a_config_error(tmp_path):
    from mmdistill.training.loop import train

    cfg = load_config("tiny", ["train.fsdp=true", f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="train.fsdp=true shards the student across processes"):
        train(cfg)


# What `accelerate launch` puts in the environment for an FSDP config file (accelerate/utils/launch.py).
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
             "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_OFFLOAD_PARAMS": "false",
             "FSDP_ACTIVATION_CHECKPOINTING": "false"}


@pytest.mark.parametrize("changes, expected", [
    ({}, (True, False)),
    ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, (False, False)),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, (True, True)),
    # FSDP1 files name a strategy, in the new key or (older files) in fsdp_sharding_strategy
    ({"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "shard_grad_op"}, (False, False)),
    ({"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "full_shard", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
     (True, False)),
    ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, (False, False)),
    ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "2"}, (False, False)),
    ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "1"}, (True, False)),
])
def test_an_accelerate_fsdp_file_maps_onto_mmdistills_fsdp2(changes, expected):
    from mmdistill.distributed.launch import launcher_fsdp

    got = launcher_fsdp({**FSDP2_ENV, **changes})
    assert (got["reshard_after_forward"], got["gradient_checkpointing"]) == expected


@pytest.mark.parametrize("changes, message", [
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params=true: CPU offload is not supported"),
    ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "NO_SHARD"},
     "NO_SHARD: nothing is sharded: use configs/accelerate/ddp.yaml"),
    ({"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "hybrid_shard"}, "HYBRID_SHARD: hybrid"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "maybe"}, "fsdp_reshard_after_forward='MAYBE'"),
])
def test_what_fsdp2_here_cannot_honour_is_refused_by_key(changes, message):
    from mmdistill.distributed.launch import launcher_fsdp

    with pytest.raises(ValueError, match=message):
        launcher_fsdp({**FSDP2_ENV, **changes})


def test_no_fsdp_launch_and_deepspeed_launches():
    from mmdistill.distributed.launch import launcher_fsdp

    assert launcher_fsdp({}) is None
    assert launcher_fsdp({**FSDP2_ENV, "ACCELERATE_USE_FSDP": "false"}) is None
    assert launcher_fsdp({"ACCELERATE_USE_DEEPSPEED": "true"}) is None  # deepspeed.py's


def test_the_default_accelerate_config_decides_whether_mmdistill_train_relaunches(tmp_path, monkeypatch):
    """`mmdistill train` goes through accelerate's launcher when `accelerate config` asked for
    several processes or for sharding, never from inside a launched process."""
    import accelerate.commands.config as accel_config

    from mmdistill.cli import _default_launch
    from mmdistill.config import ConfigError

    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    path = tmp_path / "default_config.yaml"
    monkeypatch.setattr(accel_config, "default_config_file", str(path))
    assert _default_launch() is None  # no file
    base = ("compute_environment: LOCAL_MACHINE\nmachine_rank: 0\nnum_machines: 1\nmixed_precision: 'no'\n"
            "use_cpu: false\n")
    path.write_text(base + "distributed_type: 'NO'\nnum_processes: 1\n")
    assert _default_launch() is None  # one process: train here
    path.write_text(base + "distributed_type: MULTI_GPU\nnum_processes: 2\n")
    assert _default_launch() == str(path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _default_launch() is None  # already launched
    monkeypatch.delenv("LOCAL_RANK")
    path.write_text("distributed_type: [unclosed\n")
    with pytest.raises(ConfigError,
                       match="accelerate's default config .*default_config.yaml: .*--no-launch ignores it") as err:
        _default_launch()
    assert "\n" not in str(err.value)


def test_an_unsupported_accelerate_config_is_one_line_at_the_cli(monkeypatch, capsys):
    from mmdistill.cli import main

    for k, v in {**FSDP2_ENV, "FSDP_OFFLOAD_PARAMS": "true", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "tiny", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmdistill: accelerate config fsdp_offload_params=true: CPU offload is not supported; set it to false"


@pytest.mark.parametrize("overrides, message", [
    (["teacher.mode=ema"], "teacher.mode=ema is a copy of the student"),
    (["teacher.mode=model"], "launch 2 or more"),
])
def test_a_teacher_that_cannot_be_sharded_is_refused(tmp_path, overrides, message):
    from mmdistill.config import ConfigError, load_config
    from mmdistill.training.loop import train

    cfg = load_config("tiny", ["method.name=dopd", "train.fsdp_teacher=true", "train.max_steps=1", "eval.num_samples=0",
                               f"train.output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message):
        train(cfg)
