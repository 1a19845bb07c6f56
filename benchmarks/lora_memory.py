"""Peak memory (resident set size, the kernel's VmHWM) of one `mmdistill train` run, in two phases.

    python benchmarks/lora_memory.py CONFIG [key=value ...]

Loading (models, self-teacher, data) up to the first step, then the training steps to the end
(rollouts, views, backward, optimizer, checkpoint and export): the kernel's high-water mark is
reset at the first step by writing 5 to /proc/self/clear_refs, so the second number is the
training phase's own peak, not the loader's. Linux only. Prints one line: PHASES {...} in MiB.
docs/lora.md has the LoRA-against-full-fine-tuning numbers it measured.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mmdistill.training.loop as loop
from mmdistill.cli import main

STATUS = Path("/proc/self/status")


def status(key: str) -> int:
    return int(re.search(rf"^{key}:\s*(\d+) kB", STATUS.read_text(), re.M).group(1)) * 1024


def measure(args: list[str]) -> int:
    phases: dict[str, int] = {}
    step = loop.train_step

    def first_step_resets(run, n, **kw):
        if "load_peak" not in phases:
            phases["load_peak"], phases["rss_at_first_step"] = status("VmHWM"), status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        return step(run, n, **kw)

    loop.train_step = first_step_resets
    code = main(["train", "--no-launch", *args])
    phases["train_peak"] = status("VmHWM")
    print("PHASES " + json.dumps({k: round(v / 2**20) for k, v in phases.items()}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(measure(sys.argv[1:]))
