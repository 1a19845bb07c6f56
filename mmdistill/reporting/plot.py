"""Training curves from `runs/NAME/metrics.jsonl` to a PNG (`mmdistill plot`).

One subplot per metric, x = step, one line per run. Keys that belong together share a subplot:
`share_*` (DOPD's regime fractions, which sum to 1), `loss_*` (DOPD's per-regime loss
contributions) and `time_*` (per-phase seconds). matplotlib is imported only when plotting,
through its Agg canvas (no display, no pyplot global state).
"""
from __future__ import annotations

import fnmatch
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

# Prefixes whose keys share one subplot, with the subplot's title.
GROUPS = {
    "loss_": "loss_* (per-regime contribution)",
    "share_": "share_* (token fraction per regime)",
    "time_": "time_* (seconds per step)",
}

# Display order. Sections: loss parts, optimiser, throughput, diagnostics; a group stands for all
# its keys; keys not listed go after the listed diagnostics (alphabetically), `data_*` last.
ORDER = [
    "loss", "loss_", "loss_ht", "loss_lh", "loss_hs", "loss_ll",
    "nll", "reverse_kl", "sampled_reverse_kl", "forward_kl", "full_opd", "partial_opd",
    "lr", "grad_norm",
    "tokens_per_s", "tokens", "rollout_len", "step_s", "time_",
    "share_", "share_ht", "share_lh", "share_hs", "share_ll",
    "student_entropy", "teacher_entropy", "target_entropy", "entropy_gap", "self_kl", "self_entropy",
    "belief_shift", "anchor_drift", "residual_uptake", "top16_overlap",
    "threshold_a", "threshold_qs", "threshold_qt", "adv_gap", "on_policy",
]

_RUN_STYLES = ["-", "--", ":", "-."]


class PlotError(Exception):
    """A problem with the inputs, reported as one line."""


def _warn_stderr(msg: str) -> None:
    print(f"mmdistill: warning: {msg}", file=sys.stderr)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Rows of `run_dir/metrics.jsonl`, sorted by step; for a step logged twice the later line wins.

    A line that is not a JSON object with a numeric `step` (a half-written last line after a
    kill, say) is skipped with a warning naming file:line. Raises PlotError for a missing run
    directory or metrics file.
    """
    warn = warn or _warn_stderr
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run directory not found: {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"no {METRICS_FILE} in {run_dir}")
    by_step: dict[float, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                warn(f"{path}:{lineno}: malformed line skipped")
                continue
            if not isinstance(row, dict) or not is_number(row.get("step")):
                warn(f"{path}:{lineno}: no numeric 'step'; line skipped")
                continue
            by_step.pop(row["step"], None)  # a re-logged step: keep the later row
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def numeric_keys(rows: Sequence[dict]) -> set[str]:
    """Keys (other than `step`) with a numeric value in at least one row."""
    return {k for row in rows for k, v in row.items() if k != "step" and is_number(v)}


def _group_of(key: str) -> str | None:
    return next((p for p in GROUPS if key.startswith(p)), None)


def _rank(key: str) -> tuple:
    """Sort key for a metric or a group prefix."""
    if key in ORDER:
        return (0, ORDER.index(key), key)
    group = _group_of(key)
    if group is not None:
        return (0, ORDER.index(group), key)
    return (2 if key.startswith("data_") else 1, 0, key)


def ordered_keys(keys: set[str] | Sequence[str]) -> list[str]:
    return sorted(set(keys), key=_rank)


def panels(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(title, keys) per subplot, in the order of `keys`; a group's keys share the subplot placed
    where the group's first key is."""
    out: list[tuple[str, list[str]]] = []
    where: dict[str, int] = {}
    for key in keys:
        group = _group_of(key)
        if group is None:
            out.append((key, [key]))
        elif group in where:
            out[where[group]][1].append(key)
        else:
            where[group] = len(out)
            out.append((GROUPS[group], [key]))
    # a group holding a single key reads better under the key's own name
    return [(ks[0] if len(ks) == 1 else title, ks) for title, ks in out]


def select_keys(requested: Sequence[str], available: set[str]) -> list[str]:
    """Keys named in --keys (exact names or glob patterns such as `share_*`), in the given order."""
    chosen: list[str] = []
    for item in requested:
        matches = [item] if item in available else [k for k in ordered_keys(available) if fnmatch.fnmatchcase(k, item)]
        if not matches:
            raise PlotError(f"unknown key '{item}'; available: {', '.join(ordered_keys(available))}")
        chosen += [k for k in matches if k not in chosen]
    return chosen


def smooth_series(y: Sequence[float], n: int) -> list[float]:
    """Trailing moving average over up to `n` points (fewer at the start); NaNs are skipped
    and stay NaN."""
    if n <= 1:
        return list(y)
    import numpy as np

    y = np.asarray(y, dtype=float)
    valid = ~np.isnan(y)
    total = np.concatenate([[0.0], np.cumsum(np.where(valid, y, 0.0))])
    count = np.concatenate([[0], np.cumsum(valid)])
    lo = np.maximum(np.arange(1, len(y) + 1) - n, 0)
    hi = np.arange(1, len(y) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total[hi] - total[lo]) / (count[hi] - count[lo])
    return np.where(valid, mean, np.nan).tolist()


def _series(rows: Sequence[dict], key: str) -> list[tuple[list[float], list[float]]]:
    """(steps, values) segments of `key`; a segment ends where the step gap is well above the
    run's usual logging interval (a resumed run's missing steps), so no line bridges it."""
    pts = []
    for row in rows:
        v = row.get(key)
        if is_number(v):
            v = float(v)
            pts.append((float(row["step"]), v if math.isfinite(v) else math.nan))
    if not pts:
        return []
    gaps = sorted(b[0] - a[0] for a, b in zip(pts, pts[1:]))
    usual = gaps[len(gaps) // 2] if gaps else 1.0
    segments, xs, ys = [], [], []
    for x, y in pts:
        if xs and x - xs[-1] > max(2.0 * usual, usual + 1.0):
            segments.append((xs, ys))
            xs, ys = [], []
        xs.append(x)
        ys.append(y)
    segments.append((xs, ys))
    return segments


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Run directory names, with parents added until they tell the runs apart."""
    labels = [p.name or str(p) for p in run_dirs]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 8:
        depth += 1
        labels = ["/".join(p.resolve().parts[-depth:]) for p in run_dirs]
    return labels


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, keys: Sequence[str] | None = None,
              smooth: int = 1, warn: Callable[[str], None] | None = None) -> Path:
    """Plot the runs' curves to `out` (default: first run dir / curves.png); returns the path.

    `keys`: metric names or glob patterns (default: every numeric key but `step`). `smooth`:
    moving-average window in logged points (1: raw curves; above 1 the raw curve stays faint behind).
    """
    if not run_dirs:
        raise PlotError("no run directory given")
    if smooth < 1:
        raise PlotError(f"--smooth must be >= 1, got {smooth}")
    run_dirs = [Path(d) for d in run_dirs]
    runs = [read_metrics(d, warn=warn) for d in run_dirs]
    available: set[str] = set()
    for d, rows in zip(run_dirs, runs):
        found = numeric_keys(rows)
        if not found:
            raise PlotError(f"{d / METRICS_FILE}: no numeric metrics to plot"
                            + ("" if rows else " (no rows)"))
        available |= found
    chosen = select_keys(keys, available) if keys else ordered_keys(available)
    layout = panels(chosen)

    out = Path(out) if out is not None else run_dirs[0] / "curves.png"
    fmt = out.suffix[1:].lower() or "png"

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise PlotError(f"unsupported output format '.{fmt}' (use .png, .pdf or .svg)")

    ncols = 1 if len(layout) == 1 else 2 if len(layout) <= 4 else 3 if len(layout) <= 12 else 4
    nrows = math.ceil(len(layout) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.2 * nrows + (0.5 if len(runs) > 1 else 0.0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels = _run_labels(run_dirs)
    run_colors = [f"C{i % 10}" for i in range(len(runs))]
    run_styles = [_RUN_STYLES[i % len(_RUN_STYLES)] for i in range(len(runs))]

    for ax, (title, panel_keys) in zip(axes, layout):
        grouped = len(panel_keys) > 1
        for j, key in enumerate(panel_keys):
            labelled = False
            for i, rows in enumerate(runs):
                color = f"C{j % 10}" if grouped else run_colors[i]
                style = run_styles[i] if (grouped or len(runs) > 1) else "-"
                for xs, ys in _series(rows, key):
                    label = key if grouped and not labelled else None
                    labelled = True
                    if smooth > 1:
                        ax.plot(xs, ys, color=color, linestyle=style, alpha=0.25, linewidth=0.8)
                        ys = smooth_series(ys, smooth)
                    ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.3, label=label,
                            marker="." if len(xs) == 1 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if all(k.startswith("share_") for k in panel_keys):
            ax.set_ylim(-0.02, 1.02)
        if grouped:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[len(layout):]:
        ax.set_visible(False)
    if len(runs) > 1:
        handles = [Line2D([], [], color=c, linestyle=s, label=lab) for c, s, lab in zip(run_colors, run_styles, labels)]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), fontsize=9)
    if smooth > 1:
        fig.suptitle(f"moving average over {smooth} logged points (raw curves faint)", fontsize=9)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format=fmt)
    return out
