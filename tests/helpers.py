"""Plain helpers the tests share (import them: `from tests.helpers import ...`); the shared
fixtures are in tests/conftest.py. A helper that means something different in each file (the
logits of one method's case, one task's samples) stays in that file."""
from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmdistill.core.batch import Batch
from mmdistill.data.shards import ShardWriter

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- commands in a subprocess


def command_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout on PYTHONPATH (a subprocess imports the code under test), plus `extra`."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run_mmdistill(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m mmdistill ARGS` from the repository root, in command_env(**env), output captured as text."""
    return subprocess.run([sys.executable, "-m", "mmdistill", *args], cwd=REPO, env=command_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- what a run writes


# Metrics that depend on the run's state only (not on wall-clock time).
DETERMINISTIC = ("loss", "lr", "grad_norm", "tokens", "rollout_len")


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl (one JSON object per line)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(proc: subprocess.Popen, run: Path, n: int) -> None:
    """Until the running `proc` has logged `n` steps into `run`."""
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and len(metrics_rows(run)) >= n):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.01)


def nan_at(step: int, rank: int | None = None):
    """OPD's loss, made NaN on its `step`-th call (on one rank only, when given): a diverged step.
    Patch it in with monkeypatch, or in a launched script (`OPD.loss = nan_at(2, rank=1)`)."""
    from mmdistill.methods.opd import OPD

    real, calls = OPD.loss, []

    def loss(self, views, batch):
        value, metrics = real(self, views, batch)
        calls.append(1)
        if len(calls) == step and (rank is None or int(os.environ.get("RANK", "0")) == rank):
            value = value * float("nan")
        return value, metrics
    return loss


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the Markdown row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def table_header(text: str) -> list[str]:
    """The cells of the first Markdown table row in `text`."""
    return [c.strip()
            for c in next(line for line in text.splitlines() if line.startswith("|")).strip().strip("|").split("|")]


# ---------------------------------------------------------------- data on disk


def write_lines(path: Path, records) -> Path:
    """A JSONL file: each record on its own line, strings as they are, anything else as JSON."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_shards(out: Path, samples: list[dict], max_count: int = 4) -> Path:
    """`samples` as a shard directory `out` (s-000000.tar, ...), `max_count` samples a shard."""
    with ShardWriter(out, prefix="s", max_count=max_count) as w:
        for s in samples:
            w.write(s)
    return out


# ---------------------------------------------------------------- hostile inputs


def fifo(path: Path, release_after: float = 3.0) -> Path:
    """A real named pipe (os.mkfifo) at `path`. Code that opens it to read blocks until a writer
    comes, so a daemon thread comes as that writer after `release_after` seconds and closes at once
    (the reader sees EOF): a test that code refuses FIFOs then fails when the code opens one,
    instead of hanging the test run."""
    os.mkfifo(path)

    def release() -> None:
        time.sleep(release_after)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads
            except OSError:
                time.sleep(0.2)
                continue
            os.close(fd)
            return

    threading.Thread(target=release, daemon=True).start()
    return Path(path)


@functools.lru_cache(maxsize=None)
def huge_png(width: int = 12000, height: int = 12000) -> bytes:
    """A real, valid PNG of width x height (144 megapixels by default) written chunk by chunk that
    takes about 18 KB on disk: one bit per pixel, all black, so it compresses away. Decoded as RGB
    it would take 432 MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes(-(-width // 8))) * height  # filter byte 0, then the packed bits of a row
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def tar_offsets(path) -> list[tuple[str, int, int]]:
    """(name, header offset, end of data, padded to 512) of each member of a real tar."""
    with tarfile.open(path) as t:
        return [(m.name, m.offset, m.offset_data + -(-m.size // 512) * 512) for m in t.getmembers()]


# ---------------------------------------------------------------- adapters


def varied_model(cfg, tok):
    """The tiny student with larger random weights and a likelier EOS: greedy responses that
    differ between rows and over time, and that stop at different lengths (random tiny models
    repeat one token and never stop)."""
    from mmdistill.models.loading import load_model

    model = load_model(cfg.student, tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.get_output_embeddings().weight[tok.eos_token_id].mul_(3.0)
    return model


def rollout_cfg(max_new_tokens: int = 16, **kw):
    """The rollout settings an adapter reads: one sample at temperature 1, `kw` changed."""
    base = dict(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, num_rollouts=1)
    return OmegaConf.create({**base, **kw})


# ---------------------------------------------------------------- methods: hand-built cases

# The case of the SFT, OPD and GKD tests: three responses of 4, 2 and 1 tokens, a 7-token vocabulary.
# AR-OPD and DOPD have their own (skipped first tokens, four routing regimes).
B, N, V = 3, 4, 7
MASK = torch.tensor(
    [[True, True, True, True], [True, True, False, False], [True, False, False, False]]
)


def make_logits(seed: int, *, scale: float = 2.0, shape: tuple[int, ...] = (B, N, V), dtype=torch.float32):
    """Random logits, drawn in float64 (a float32 and a float64 draw hold the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_batch(*, mask: torch.Tensor = MASK, vocab: int = V, seed: int = 0, on_policy: bool = True) -> Batch:
    """Random response ids over `mask` (0 off it), one empty sample a row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, mask.shape, generator=g).masked_fill(~mask, 0)
    return Batch(response_ids=ids, response_mask=mask.clone(), samples=[{}] * mask.shape[0], on_policy=on_policy)


def run_loss(method, views: dict[str, torch.Tensor], batch: Batch):
    """(loss, metrics, gradient w.r.t. the student's logits): `method.loss` on raw-logit views,
    the student's view a fresh leaf, the others as given."""
    s = views["student"].clone().requires_grad_(True)
    loss, metrics = method.loss({**views, "student": s}, batch)
    loss.backward()
    return loss, metrics, s.grad


def ref_reduce(per_token, mask: torch.Tensor, reduction: str):
    """The masked mean as loops over per_token[b][n] (nested lists or a tensor): "token" over
    every token on the mask, "seq" over each response's tokens, then over the responses with any."""
    rows, cols = mask.shape
    if reduction == "token":
        vals = [per_token[b][n] for b in range(rows) for n in range(cols) if mask[b, n]]
        return sum(vals) / len(vals)
    means = []
    for b in range(rows):
        vals = [per_token[b][n] for n in range(cols) if mask[b, n]]
        if vals:
            means.append(sum(vals) / len(vals))
    return sum(means) / len(means)
