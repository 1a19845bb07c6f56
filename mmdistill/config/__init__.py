"""Run configuration: structured dataclasses (schema.py), YAML files and dotted overrides
(loading.py), checked before any model loads (validation.py)."""
from mmdistill.config.loading import (
    RESUME_FREE,
    config_changes,
    load_config,
    method_options,
    resolve_config_path,
    save_config,
)
from mmdistill.config.paths import check_paths
from mmdistill.config.schema import CONFIG_DIR, DEFAULT_CONFIG, REPO_ROOT, Config, ConfigError
from mmdistill.config.validation import validate

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "REPO_ROOT", "Config", "ConfigError", "load_config", "method_options",
           "resolve_config_path", "save_config", "validate", "check_paths",
           "config_changes", "RESUME_FREE"]
