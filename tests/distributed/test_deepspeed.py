"""What mmdistill takes from an accelerate DeepSpeed config, and what it refuses (distributed/deepspeed.py).

The configs are accelerate's own DeepSpeedPlugin's, built from the same arguments its config
files set; the 2-process training runs are in test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin

from mmdistill.config import ConfigError, load_config
from mmdistill.distributed import deepspeed as zero
from mmdistill.distributed.launch import accelerator_options, launched


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
    for stage in (1, 2, 3):  # CPU offload of the optimizer state at any stage, of the parameters at 3
        zero.configure(plugin(zero_stage=stage, offload_optimizer_device="cpu",
                              offload_param_device="cpu" if stage == 3 else "none", zero3_init_flag=False), cfg,
                       num_processes=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(zero_stage=3, zero3_init_flag=True), "zero3_init_flag=true: mmdistill builds its models whole"),
    (dict(zero_stage=0), "zero_stage=0: stage 0 shards nothing; use configs/accelerate/ddp.yaml"),
    (dict(zero_stage=2, offload_optimizer_device="nvme"),
     "offload_optimizer_device=nvme: mmdistill offloads to the CPU only"),
    (dict(zero_stage=3, offload_param_device="nvme"), "offload_param_device=nvme"),
    (dict(zero_stage=2, offload_param_device="cpu"),
     "offload_param_device=cpu: parameters are offloaded at zero_stage 3 only"),
    (dict(hf_ds_config={"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}), "mixed_precision=fp16"),
])
def test_what_mmdistill_cannot_honour_is_refused_by_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        zero.configure(plugin(**kwargs), load_config("tiny", []), num_processes=2)


def test_a_deepspeed_launch_is_recognised_from_accelerates_environment():
    assert launched({"ACCELERATE_USE_DEEPSPEED": "true"})
    assert not launched({"ACCELERATE_USE_DEEPSPEED": "false"}) and not launched({})
    if not torch.cuda.is_available():  # without GPUs, DeepSpeed processes need a named backend to see each other
        handler, = accelerator_options(True)["kwargs_handlers"]
        assert handler.backend == "gloo"
        assert accelerator_options(False) == {"cpu": True}


def test_a_zero_checkpoint_resumes_only_with_the_process_count_that_wrote_it(tmp_path):
    for rank in range(2):
        (tmp_path / f"zero_optimizer_rank_{rank:05d}.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 4"):
        zero.load_optimizer(tmp_path, optimizer=None, rank=0, world_size=4)


ONE_BY_ONE = '''
import os, socket, sys
from pathlib import Path
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed, torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from mmdistill.distributed.deepspeed import load_partitioned
from mmdistill.distributed.gather import full_parameters, untied_copies, whole_items
from mmdistill.models.weights import partitioned
from mmdistill.models.teachers import Teacher, frozen_copy
from mmdistill.training.export import weights_checksum

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
whole = {n: t.clone() for n, t in model.state_dict().items()}
ema = Teacher("ema", model, frozen_copy(model), ema_decay=0.5)
deepspeed.init_distributed(dist_backend="gloo")
deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
assert partitioned(model)
params = list(model.parameters())
seen = []

class Recorded(deepspeed.zero.GatheredParameters):
    def __enter__(self):
        super().__enter__()
        seen.append(sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in params))

deepspeed.zero.GatheredParameters = Recorded
state = untied_copies(model)
assert sorted(state) == sorted(n for n in whole if n != "lm_head.weight")
assert all(torch.equal(state[n], whole[n]) for n in state)
assert untied_copies(model, keep=False) == {}
ema.model.apply(lambda m: [p.data.zero_() for p in m.parameters(recurse=False)])
ema.update(full_parameters(model))  # 0.5 * 0 + 0.5 * student
assert all(torch.equal(t, 0.5 * whole[n]) for n, t in ema.model.state_dict().items() if n in state)
checksum = weights_checksum(whole_items(model))
changed = {n: t + 1 for n, t in state.items()}
save_file(changed, sys.argv[1] + "/w.safetensors")
load_partitioned(model, Path(sys.argv[1] + "/w.safetensors"), 0)
assert all(torch.equal(t, changed[n]) for n, t in untied_copies(model).items())
assert weights_checksum(whole_items(model)) != checksum
save_file({**changed, "extra": torch.zeros(1)}, sys.argv[1] + "/bad.safetensors")
try:
    load_partitioned(model, Path(sys.argv[1] + "/bad.safetensors"), 0)
    raise SystemExit("a file with an extra weight was loaded")
except ValueError as e:
    assert "unexpected ['extra']" in str(e), e
assert sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in params) == 0
print("GATHERS", len(seen), "MOST", max(seen))
'''


def test_zero3_weights_are_gathered_one_parameter_at_a_time(tmp_path):
    """Checkpoints (save and resume), the final save, the EMA update and the replica checksum
    read a ZeRO-3 student's weights with at most one parameter gathered at a time (a whole
    gather would put the whole model on every rank's device), and read them right: a real
    DeepSpeed engine, one process on gloo."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", ONE_BY_ONE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = r.stdout.split("GATHERS")[-1].split()
    assert int(counts[0]) > 50 and counts[1:] == ["MOST", "1"], r.stdout
