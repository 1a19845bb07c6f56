"""mmdistill: on-policy distillation with privileged information, for text and vision-language models.

The Python API (docs/api.md) is mmdistill.api's names, imported on first use: `import mmdistill`
stays free of torch, so the command line answers a bad config in a fraction of a second."""
from importlib import import_module

__version__ = "0.1.0"

__all__ = ["Batch", "ConfigError", "Views", "build_adapter", "build_method", "evaluate", "load", "load_config",
           "method_options", "student_and_adapter", "train"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("mmdistill.api"), name)
    raise AttributeError(f"module 'mmdistill' has no attribute {name!r}")
