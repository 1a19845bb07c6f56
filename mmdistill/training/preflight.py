"""What can be checked before any model loads, checked in seconds: a user must not wait minutes
for a model to load to learn that a path is wrong, a column is missing or a template does not
render.

In order: every local path the config names (config/paths.py; nothing is fetched from the Hub),
the tokenizers or processors (a missing chat template, a template that would misplace the
response, teacher and student vocabularies that differ), then the first samples of every split
the run reads, rendered into every view the method reads: each field privileged.text names, the
partial view's field, the oracle `response` of off-policy methods, images that decode.
"""
from __future__ import annotations

from itertools import islice

from omegaconf import DictConfig, OmegaConf

from mmdistill.adapters import TextAdapter, build_adapter
from mmdistill.config import check_paths, method_options
from mmdistill.core.views import VIEW_SPEC
from mmdistill.data.records import matches
from mmdistill.data.shards import iter_samples
from mmdistill.data.sources import load_split
from mmdistill.data.stream import stages_of
from mmdistill.methods.registry import Method, build_method
from mmdistill.models.loading import check_same_vocab, load_processor, tokenizer_of
from mmdistill.models.served import served_teacher

SAMPLES = 8  # first samples of each split rendered into every view
PROCEDURAL = ("arith", "chain", "scenes")


def preflight(cfg: DictConfig) -> None:
    """Raise (one line: ConfigError, ValueError, KeyError naming the sample and field) on the
    first problem found; the run directory is not made yet and no model has loaded."""
    check_paths(cfg)
    method = build_method(cfg.method.name, **method_options(cfg))
    proc = load_processor(cfg.student)
    teacher_proc = None
    if cfg.teacher.mode == "model" and any(VIEW_SPEC[v][0] == "teacher" for v in method.views):
        teacher_proc = load_processor(cfg.teacher.model)
        check_same_vocab(tokenizer_of(proc), tokenizer_of(teacher_proc), f"teacher.model.path={cfg.teacher.model.path}")
    if cfg.teacher.mode == "served" and any(VIEW_SPEC[v][0] == "teacher" for v in method.views):
        served_teacher(cfg.teacher.server, tokenizer_of(proc)).close()  # reachable, and the student's vocabulary
    adapter = build_adapter(proc, cfg.privileged, 0, teacher_proc)  # checks the chat templates
    for name, _, data in stages_of(cfg):
        where = f"stage '{name}' " if cfg.train.stages else ""
        check_samples(adapter, method, first_samples(data, "train"), f"{where}train")
        if cfg.eval.num_samples:
            check_samples(adapter, None, first_samples(data, "test"), f"{where}test")


def first_samples(data: DictConfig, split: str, n: int = SAMPLES) -> list[dict]:
    """The split's first `n` samples (after data.select): a JSONL file is read whole (the run
    reads it whole too), shards only as far as needed, a procedural task makes `n`."""
    if data.source == "shards":
        path = data.train_path if split == "train" else data.test_path
        if not path:
            return []
        found = (s for s in iter_samples(path, on_bad=data.on_bad_sample) if matches(s, data.select))
        return list(islice(found, n))
    if data.source in PROCEDURAL:
        group = data[data.source]
        size = {"num_train": min(n, group.num_train), "num_test": min(n, group.num_test)}
        data = OmegaConf.merge(data, {data.source: size})
    return load_split(data, split)[:n]


def check_samples(adapter: TextAdapter, method: Method | None, samples: list[dict], where: str) -> None:
    """Every view `method` reads rendered for each sample (None: the plain student view that
    held-out accuracy reads), and the oracle response where the method trains on it."""
    if not samples:
        return
    samples = adapter.prepare(samples)
    views = method.views if method is not None else ("student",)
    for view in views:
        policy, level = VIEW_SPEC[view]
        adapter.prompt_texts(samples, level, "teacher" if policy == "teacher" else "student")
    if method is not None and _reads_oracle(method):
        for s in samples:
            if "response" not in s:
                raise KeyError(f"{where} sample '{s.get('id', '?')}' has no field 'response' "
                               f"(method={method.name} trains on the oracle response)")


def _reads_oracle(method: Method) -> bool:
    fraction = getattr(method, "on_policy_fraction", 1.0 if method.on_policy else 0.0)
    return fraction < 1.0
