"""Evaluation: what a user reads to judge a student, per split.

Accuracy (pass@1 over the responses drawn per prompt) with a 95% Wilson interval, pass@k,
mean response length, accuracy by response-length bucket, and two privileged-leakage
diagnostics on the responses (mmdistill/evaluation/leakage.py defines them): the share that reproduce a
span of the privileged text not derivable from the input, and the share that state the final
answer before the reasoning that would support it.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmdistill.adapters import build_adapter
from mmdistill.data.sources import load_split, skipped_line
from mmdistill.evaluation import checkers
from mmdistill.evaluation.leakage import is_shortcut, leaked_span
from mmdistill.evaluation.stats import length_buckets, pass_at_k, wilson_interval
from mmdistill.models.loading import load, max_positions


def is_correct(text: str, sample: dict, ev: Any = None) -> bool:
    """eval.checker, else the sample's own checker, else its domain's, else exact match."""
    if ev is None:
        return checkers.check(None, text, sample)
    return checkers.check(ev.checker, text, sample, extraction=ev.extraction, tag=ev.tag, pattern=ev.pattern,
                          tolerance=ev.tolerance)


EXAMPLES = 5  # responses kept per split in the eval JSON
NO_ANSWER_WARN = 0.5  # share of responses without an extractable answer above which a split warns


def has_answer(text: str, sample: dict, ev: Any) -> bool:
    """Whether the split's checker finds an answer in the response at all (right or wrong)."""
    return checkers.answer_found(ev.checker, text, sample, extraction=ev.extraction, tag=ev.tag, pattern=ev.pattern)


def extraction_name(ev: Any, samples: list[dict]) -> str:
    """What decides the answer of a split's responses, as the user would set it."""
    kinds = {checkers.kind_of(ev.checker, s) for s in samples}
    if kinds <= {"arith", "scenes"}:
        return f"the {'/'.join(sorted(kinds))} checker's own 'Answer:' extraction"
    how = {"tag": f"eval.tag={ev.tag!r}", "regex": f"eval.pattern={ev.pattern!r}"}.get(ev.extraction)
    return f"eval.extraction={ev.extraction}" + (f", {how}" if how else "")


def decoding(rollout: Any) -> dict[str, str]:
    """How a run's rollouts decode (rollout.fast, .sampler, .loop): evaluation decodes the same way."""
    return {key: getattr(rollout, key) for key in ("fast", "sampler", "loop")}


@torch.no_grad()
def responses(adapter, model, samples: list[dict], *, batch_size: int, max_new_tokens: int, k: int = 1,
              temperature: float = 0.0, top_p: float = 1.0, level: str | None = None, policy: str = "student",
              decode: dict[str, str] | None = None):
    """(texts, token lengths), k per sample in sample order. `decode`: see decoding() (defaults
    where None)."""
    settings = SimpleNamespace(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_rollouts=k,
                               **(decode or {}))
    texts, lengths = [], []
    with adapter.deployed():
        for i in range(0, len(samples), batch_size):
            batch = adapter.rollout(model, samples[i : i + batch_size], settings, level=level, policy=policy)
            texts += adapter.tok.batch_decode(batch.response_ids, skip_special_tokens=True)
            lengths += batch.response_mask.sum(1).tolist()
    return texts, lengths


def accuracy(adapter, model, samples: list[dict], batch_size: int, max_new_tokens: int,
             decode: dict[str, str] | None = None) -> float:
    """Greedy accuracy with each sample's own checker: the number printed before and after training."""
    if not samples:
        raise ValueError("no evaluation samples")
    texts, _ = responses(adapter, model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, decode=decode)
    return sum(is_correct(t, s) for t, s in zip(texts, samples)) / len(samples)


def _privileged(adapter, sample: dict) -> str | None:
    try:
        return adapter.privileged_text(sample, "full")
    except KeyError:  # the sample has no privileged fields for this config: nothing can leak
        return None


def score_split(adapter, model, samples: list[dict], ev: Any, *, level: str | None = None, policy: str = "student",
                decode: dict[str, str] | None = None) -> dict:
    """Every number of one split's row."""
    if not samples:
        raise ValueError("no evaluation samples")
    k = ev.samples
    texts, lengths = responses(adapter, model, samples, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                               k=k, temperature=ev.temperature, top_p=ev.top_p, level=level, policy=policy,
                               decode=decode)
    correct = [is_correct(t, samples[i // k], ev) for i, t in enumerate(texts)]
    no_answer = sum(not has_answer(t, samples[i // k], ev) for i, t in enumerate(texts)) / len(texts)
    per_sample = [sum(correct[i * k : (i + 1) * k]) for i in range(len(samples))]
    n_right = sum(correct)
    leaks, shortcuts = [], []
    for i, text in enumerate(texts):
        s = samples[i // k]
        p = _privileged(adapter, s)
        if p:
            leaks.append(leaked_span(text, p, _prompt_text(s)) is not None)
        if s.get("answer") not in (None, ""):
            shortcuts.append(is_shortcut(text, str(s["answer"]), tag=ev.tag))
    ks = sorted({2**e for e in range(int(math.log2(k)) + 1)} | {k})
    return {
        "n": len(samples),
        "responses": len(texts),
        "correct": n_right,
        "accuracy": n_right / len(texts),
        "ci95": list(wilson_interval(n_right, len(texts))),
        "pass_at_k": {str(j): sum(pass_at_k(k, c, j) for c in per_sample) / len(samples) for j in ks},
        "mean_response_tokens": sum(lengths) / len(lengths),
        # low when the student answers every question alike (a collapsed policy ignores its input)
        "distinct_rate": len({" ".join(t.split()) for t in texts}) / len(texts),
        "by_length": length_buckets(lengths, correct),
        "leakage_rate": sum(leaks) / len(leaks) if leaks else None,
        "shortcut_rate": sum(shortcuts) / len(shortcuts) if shortcuts else None,
        # responses in which the checker found no answer at all: high means the extraction does not
        # fit what the model writes (run_eval warns above NO_ANSWER_WARN)
        "no_answer_rate": no_answer,
        # the first responses as they were scored: the quickest answer to "why is this 0%?"
        "examples": [{"id": samples[i // k].get("id"), "answer": samples[i // k].get("answer"), "response": texts[i],
                      "correct": bool(correct[i])} for i in range(min(EXAMPLES, len(texts)))],
    }


def _prompt_text(sample: dict) -> str:
    if "messages" in sample:
        return "\n".join(p if isinstance(p, str) else " ".join(x.get("text", "") for x in p)
                         for p in (m["content"] for m in sample["messages"]))
    return str(sample.get("prompt", ""))


def eval_splits(cfg: DictConfig, skipped: dict | None = None) -> dict[str, list[dict]]:
    """Split name -> samples: eval.splits, else the data config's test split. Under
    data.on_bad_sample=skip, ``skipped`` gets each split's load stats (``{"bad": n, "errors": [...]}``)."""
    paths = dict(cfg.eval.splits) or ({"test": cfg.data.test_path} if cfg.data.test_path else {})
    skipped = {} if skipped is None else skipped
    out = {}
    if not paths:  # a built-in procedural task: its own test split
        out["test"] = load_split(cfg.data, "test", skipped.setdefault("test", {}))
    for name, path in paths.items():
        data = OmegaConf.merge(cfg.data, {"test_path": path, "source": "shards" if _is_shards(path) else "jsonl"})
        out[name] = load_split(data, "test", skipped.setdefault(name, {}))
    if cfg.eval.max_per_split:
        out = {name: samples[: cfg.eval.max_per_split] for name, samples in out.items()}
    for name, samples in out.items():
        if not samples:
            raise ValueError(f"eval split '{name}' has no samples")
    return out


def _is_shards(path: str) -> bool:
    p = Path(path)
    return p.is_dir() or p.suffix in (".tar", ".json") or "{" in str(path)


def run_eval(cfg: DictConfig, run_dir: Path | None = None) -> tuple[dict, Path]:
    """`mmdistill eval`: score one model (a run's student, the untrained student, the teacher with or
    without privileged context) on every split. Returns the result and the folder it belongs in
    (reporting.write_eval writes it there)."""
    ev, role = cfg.eval, cfg.eval.model
    model_cfg = cfg.teacher.model if role.startswith("teacher") else cfg.student
    if role in ("student", "student_priv") and run_dir is not None:
        model_cfg = OmegaConf.merge(cfg.student, {"path": str(run_dir / "student"), "gguf_file": None,
                                                  "tokenizer": None, "vision": {"tower": {"name": None}}})
    if role.startswith("teacher") and cfg.teacher.mode != "model":
        raise ValueError(f"eval.model={role} needs teacher.mode=model "
                         f"(this config's teacher is a {cfg.teacher.mode} self-teacher)")
    model, proc = load(model_cfg, seed=cfg.train.seed + (1 if role.startswith("teacher") else 0))
    model.eval()
    adapter = build_adapter(proc, cfg.privileged, max_positions(model))
    level = "full" if role.endswith("_priv") else None
    skipped: dict = {}
    samples_of = eval_splits(cfg, skipped)
    splits = {name: score_split(adapter, model, samples, ev, level=level, decode=decoding(cfg.rollout))
              for name, samples in samples_of.items()}
    warnings = []
    for name, split in splits.items():
        split["bad_skipped"] = skipped.get(name, {}).get("bad", 0)
        line = skipped_line(skipped.get(name, {}), f"split '{name}'")
        if line:
            warnings.append(line)
        if split["no_answer_rate"] > NO_ANSWER_WARN:
            warnings.append(f"warning: split '{name}': {split['no_answer_rate']:.0%} of the responses have no answer "
                            f"that {extraction_name(ev, samples_of[name])} can extract, so its accuracy measures "
                            "the format; set eval.extraction / eval.tag to what the model writes")
    label = ev.label or role
    result = {
        "label": label,
        "role": role,
        "run_dir": str(run_dir) if run_dir else None,
        "method": cfg.method.name,
        "model_path": model_cfg.path,
        "splits": splits,
        "warnings": warnings,
        "settings": {k: ev[k] for k in ("checker", "extraction", "tag", "pattern", "tolerance", "samples",
                                        "temperature", "top_p", "max_new_tokens")},
    }
    out_dir = Path(ev.output_dir) if ev.output_dir else Path(run_dir or cfg.train.output_dir) / "eval"
    return result, out_dir
