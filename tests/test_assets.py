"""The shipped model assets are in the exact format the toolkit writes today, so rerunning a
recipe (configs/*_sft.yaml) and comparing its output with `cmp` checks that the asset is
reproducible. An asset saved by an older writer differs in bytes even when its weights agree."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from mmdistill.composite import CompositeVLM

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODELS = ["arith-teacher", "arith-student-init", "scenes-teacher", "scenes-student-init"]


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_resaves_byte_for_byte(name, tmp_path):
    src = ASSETS / name
    composite = (src / "composite_processor.json").exists()
    model = (CompositeVLM if composite else AutoModelForCausalLM).from_pretrained(src)
    model.save_pretrained(tmp_path)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / f).read_bytes() == (src / f).read_bytes(), (
            f"assets/{name}/{f} is not in the current save format; rebuild it with its recipe")
