"""mmdistill: on-policy distillation with privileged information, for text and vision-language models."""

__version__ = "0.1.0"
