"""What mmdistill takes from an accelerate DeepSpeed config, and what it refuses (zero.py).

The configs are accelerate's own DeepSpeedPlugin's, built from the same arguments its config
files set; the 2-process training runs are in test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin

from mmdistill import zero
from mmdistill.config import ConfigError, load_config


def plugin(**kwargs) -> DeepSpeedPlugin:
    return DeepSpeedPlugin(**kwargs)


def test_mmdistills_batch_accumulation_and_clipping_are_written_into_deepspeeds_config():
    cfg = load_config("tiny", ["train.batch_size=3", "train.grad_accum=4", "optim.grad_clip=0.5"])
    made = plugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    zero.configure(made, cfg, num_processes=2)
    ds = made.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    no_clip = load_config("tiny", ["optim.grad_clip=0"])
    made = plugin(zero_stage=1)
    zero.configure(made, no_clip, num_processes=2)
    ds = made.deepspeed_config
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    zero.configure(plugin(zero_stage=3, zero3_init_flag=False), cfg, num_processes=2)  # ZeRO-3, models built whole


@pytest.mark.parametrize("kwargs, message", [
    (dict(zero_stage=3, zero3_init_flag=True), "zero3_init_flag=true: mmdistill builds its models whole"),
    (dict(zero_stage=0), "zero_stage=0: stage 0 shards nothing; use configs/accelerate/ddp.yaml"),
    (dict(zero_stage=2, offload_optimizer_device="cpu"), "offload_optimizer_device=cpu: DeepSpeed offload is not supported"),
    (dict(zero_stage=2, offload_param_device="nvme"), "offload_param_device=nvme"),
    (dict(hf_ds_config={"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}), "mixed_precision=fp16"),
])
def test_what_mmdistill_cannot_honour_is_refused_by_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        zero.configure(plugin(**kwargs), load_config("tiny", []), num_processes=2)


def test_a_deepspeed_launch_is_recognised_from_accelerates_environment():
    assert zero.launched({"ACCELERATE_USE_DEEPSPEED": "true"})
    assert not zero.launched({"ACCELERATE_USE_DEEPSPEED": "false"}) and not zero.launched({})
    if not torch.cuda.is_available():  # without GPUs, DeepSpeed processes need a named backend to see each other
        handler, = zero.accelerator_options(True)["kwargs_handlers"]
        assert handler.backend == "gloo"
        assert zero.accelerator_options(False) == {"cpu": True}


def test_a_zero_checkpoint_resumes_only_with_the_process_count_that_wrote_it(tmp_path):
    for rank in range(2):
        (tmp_path / f"zero_optimizer_rank_{rank:05d}.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 4"):
        zero.load_optimizer(tmp_path, optimizer=None, rank=0, world_size=4)
