"""Procedural tasks with privileged information (samples in the project's sample-record format)."""
