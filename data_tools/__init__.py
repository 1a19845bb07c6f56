"""Command-line data tools: ``python -m data_tools --help``."""
