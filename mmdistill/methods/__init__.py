"""Objectives: each a small object that names the views it reads and maps their aligned log-probs
to a loss (base.py). registry.py builds one by name; options.py holds their config groups."""
