"""The shipped model assets are in the exact format the toolkit writes today, so rerunning a
recipe (configs/*_sft.yaml) and comparing its output with `cmp` checks that the asset is
reproducible. An asset saved by an older writer differs in bytes even when its weights agree."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from mmdistill.models.composite import CompositeVLM

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODELS = ["arith-teacher", "arith-student-init", "scenes-teacher", "scenes-student-init"]


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_is_stored_as_the_toolkit_saves_it(name, tmp_path):
    src = ASSETS / name
    composite = (src / "composite_processor.json").exists()
    model = (CompositeVLM if composite else AutoModelForCausalLM).from_pretrained(src)
    model.save_pretrained(tmp_path)
    rebuild = f"assets/{name}/%s is not in the current save format; rebuild it with its recipe"
    assert (tmp_path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes(), (
        rebuild % "model.safetensors")
    assert _config(tmp_path) == _config(src), rebuild % "config.json"


def _config(directory: Path) -> dict:
    """config.json without the transformers version that wrote it."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "transformers_version"}
    return strip(json.loads((directory / "config.json").read_text()))
