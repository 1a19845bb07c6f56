"""What can be sharded (the real 2-process FSDP runs are in test_distributed.py)."""
import pytest
import torch

from mmdistill.config import load_config
from mmdistill.models import load
from mmdistill.sharding import full_parameters, full_state_dict, is_sharded, shard, synced_generation


def test_a_composite_vlm_is_refused_by_name():
    student, _ = load(load_config("tiny_vlm").student, seed=0)
    with pytest.raises(ValueError, match="train.fsdp: a CompositeVLM student cannot be sharded"):
        shard(student)


def test_unsharded_models_pass_through_the_gathering_helpers():
    student, _ = load(load_config("tiny").student, seed=0)
    assert not is_sharded(student) and not synced_generation(student)
    state = full_state_dict(student)
    assert state.keys() == student.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(full_parameters(student), student.parameters()))


def test_fsdp_in_one_process_is_a_config_error(tmp_path):
    from mmdistill.train import train

    cfg = load_config("tiny", ["train.fsdp=true", f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="train.fsdp=true shards the student across processes"):
        train(cfg)
