"""The trained student as a loadable model directory with its model card, and a digest that
shows every replica ended with the same weights."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmdistill.config import method_options
from mmdistill.models import lora
from mmdistill.models.weights import tied_names
from mmdistill.training.checkpoint import newest_line, not_finite
from mmdistill.training.setup import Run


def save_student(run: Run, step: int) -> Path:
    """RUN_DIR/student, written by the main process (every rank takes part in gathering a sharded
    student's weights). Weights that are not finite are never saved: FloatingPointError on
    every rank instead."""
    final = run.run_dir / "student"
    if lora.has_lora(run.plain):
        return _save_lora(run, step, final)
    weights = run.backend.export_weights(run.plain)
    if weights is None:  # the model's own, whole on every rank
        bad = not_finite(dict(run.plain.state_dict()))
    else:  # gathered by the backend, on the main process
        bad = not_finite(weights) if run.backend.main else None
    bad = next((found for found in run.backend.gather_objects(bad) if found), None)
    if bad:
        raise FloatingPointError(f"after step {step}: the student's weights are not finite ({bad}); the student "
                                 f"was not saved; {newest_line(run.run_dir)}")
    if run.accelerator.is_main_process:
        save_pretrained(run.plain, final, weights)
        run.proc.save_pretrained(final)
    return final


def _save_lora(run: Run, step: int, final: Path) -> Path:
    """train.export: merged (a plain model: base + each adapter's delta, as peft merges it) or
    adapter (peft's directory). LoRA students train data-parallel: every rank holds them whole."""
    weights = lora.merged_state_dict(run.plain) if run.cfg.train.export == "merged" else None
    bad = not_finite(weights if weights is not None else lora.adapter_parameters(run.plain))
    if bad:
        raise FloatingPointError(f"after step {step}: the student's weights are not finite ({bad}); the student "
                                 f"was not saved; {newest_line(run.run_dir)}")
    if run.accelerator.is_main_process:
        if weights is not None:
            save_pretrained(run.plain, final, weights)
        else:
            lora.handle(run.plain).save_pretrained(str(final), selected_adapters=[lora.ADAPTER])
        run.proc.save_pretrained(final)
    return final


def save_pretrained(model: torch.nn.Module, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """`weights`: a sharded model's gathered ones, or a DeepSpeed student's copies; None: the
    model's own."""
    if weights is None:
        model.save_pretrained(directory)
        return
    tied = tied_names(model)
    model.save_pretrained(directory, state_dict={k: v for k, v in weights.items() if k not in tied})
    config = json.loads((directory / "config.json").read_text())  # FSDP2 renames the class to FSDP<Name>
    config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def weights_checksum(items) -> str:
    """A digest of (name, whole tensor) pairs (Backend.whole_items): equal across ranks when
    data-parallel training keeps them in sync."""
    digest = hashlib.sha256()
    for name, tensor in items:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_card(run: Run, final: Path) -> None:
    """README.md of the exported student: where it came from and how it was trained, then its
    files given the modes the umask asks for (see ordinary_modes)."""
    (final / "README.md").write_text(model_card(run.cfg, run.summary))
    ordinary_modes(final)


def _model_line(cfg, seed: int) -> str:
    if cfg.path:
        return f"`{cfg.path}`" + (f" (GGUF `{cfg.gguf_file}`, dequantised)" if cfg.gguf_file else "")
    if cfg.vision.tower.name:
        lm = f"`{cfg.vision.lm_path}`" if cfg.vision.lm_path else f"a random {cfg.arch.model_type}"
        return f"a new composite VLM: {cfg.vision.tower.source} tower `{cfg.vision.tower.name}` + {lm}"
    return (f"a random {cfg.arch.model_type} ({cfg.arch.num_hidden_layers} layers, hidden "
            f"{cfg.arch.hidden_size}, seed {seed})")


def model_card(cfg, summary: dict) -> str:
    """The card's text: base model, teacher, method and its options, data, steps, held-out
    accuracy before and after (where measured), LoRA settings, and the resolved config."""
    name = cfg.method.name
    options = ", ".join(f"{k}={v}" for k, v in method_options(cfg).items())
    teacher = {"model": f"a separate model, {_model_line(cfg.teacher.model, cfg.train.seed + 1)}",
               "frozen_student": "the initial student, frozen (a self-teacher)",
               "ema": f"an EMA of the student, decay {cfg.teacher.ema_decay} (a self-teacher)",
               "live": "the student itself, without gradient",
               "served": f"served at {cfg.teacher.server.url} ({cfg.teacher.server.api} api, model "
                         f"{cfg.teacher.server.model or 'the first it lists'}, top-{cfg.teacher.server.topk}, "
                         f"full vocabulary: {cfg.teacher.server.full_vocabulary})"}[cfg.teacher.mode]
    data = cfg.data.source
    if cfg.data.source in ("jsonl", "shards"):
        data += f" `{cfg.data.train_path}`"
    if cfg.data.source in ("arith", "chain", "scenes"):
        data += f" (built-in task, seed {cfg.data[cfg.data.source].seed})"
    lines = [("base model", _model_line(cfg.student, cfg.train.seed)), ("teacher", teacher),
             ("method", f"{name} ({options})"),
             ("privileged information", f"`{cfg.privileged.text}` in `{cfg.privileged.template}`".replace("\n", " ")),
             ("data", data), ("steps", str(summary.get("steps", "?"))),
             ("processes", f"{summary.get('processes', 1)} ({summary.get('distributed', 'NO')})")]
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None or after is not None:
        shown = [f"{x:.3f}" if x is not None else "not measured" for x in (before, after)]
        lines.append(("held-out accuracy", f"{shown[0]} before, {shown[1]} after ({cfg.eval.num_samples} samples "
                                           f"of `{cfg.data.test_path or cfg.data.source}`)"))
    else:
        lines.append(("held-out accuracy", "not measured (eval.num_samples=0)"))
    lo = cfg.student.lora
    adapter = lo.enabled and cfg.train.export == "adapter"
    if lo.enabled:
        tower = f"vision tower: {', '.join(lo.vision_target_modules)}" if lo.vision else "vision tower frozen"
        lines.append(("LoRA", f"rank {lo.rank}, alpha {lo.alpha}, dropout {lo.dropout}, modules "
                              f"{', '.join(lo.target_modules)}; {tower}; exported {cfg.train.export}"))
    table = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in lines)
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if cfg.student.path:
        front.append(f"base_model: {cfg.student.path}")
    front += ["tags:", "- mmdistill", f"- {name}"] + (["- lora"] if lo.enabled else []) + ["---"]
    if adapter:
        load = ("from peft import PeftModel\nmodel = PeftModel.from_pretrained(BASE_MODEL, "
                "\"path/to/student\")  # BASE_MODEL: the base model above, loaded with transformers")
    else:
        load = ("from transformers import AutoModelForCausalLM\n"
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/student\")")
    config = OmegaConf.to_yaml(cfg, resolve=True)
    return ("\n".join(front) + "\n\n# Distilled student\n\nTrained with mmdistill "
            f"(`mmdistill train`).\n\n| | |\n| --- | --- |\n{table}\n\n## Loading\n\n```python\n{load}\n```\n\n"
            f"## Resolved config\n\n```yaml\n{config}```\n")


def _umask() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        found = re.search(r"^Umask:\s*([0-7]+)$", status.read_text(), re.M)
        if found:
            return int(found.group(1), 8)
    mask = os.umask(0o022)  # no /proc: read it the only other way, by setting it, and put it back
    os.umask(mask)
    return mask


def ordinary_modes(directory: Path) -> None:
    """Files as open() would create them: 0666 less the umask. safetensors (0.8) writes each
    file through a temporary file (Rust's tempfile::NamedTempFile: mode 0600, whatever the umask)
    that it renames into place, so model.safetensors, as transformers' save_pretrained leaves it
    here, would be unreadable to everyone but the writer."""
    mode = 0o666 & ~_umask()
    for f in Path(directory).iterdir():
        if f.is_file():
            f.chmod(mode)
