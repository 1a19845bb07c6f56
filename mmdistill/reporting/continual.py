"""The continual-learning record: ACC, BWT and FWT from the accuracy matrix R[i][j] (stage j's test
split after training stage i), as Markdown and a heatmap (matplotlib's Agg canvas: no display)."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from mmdistill.reporting.tables import (
    MISSING,
    ReportError,
    atomic_write,
    is_number,
    markdown_table,
    pct,
    read_json,
    signed_pct,
)

# ---------------------------------------------------------------------------------------------
# Continual learning


def mean_or_none(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _check_fraction(v, where: str) -> float:
    if not is_number(v) or not 0.0 <= v <= 1.0:
        raise ReportError(f"{where} = {v!r}: accuracies must be fractions in [0, 1]")
    return float(v)


def _check_matrix(R, baseline) -> tuple[list[list[float]], list[float]]:
    if not isinstance(R, (list, tuple)) or not R:
        raise ReportError("R must be a non-empty T x T list of lists")
    T = len(R)
    for i, row in enumerate(R):
        if not isinstance(row, (list, tuple)) or len(row) != T:
            got = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise ReportError(f"R must be {T} x {T} (one row per stage, one column per stage); row {i} has {got}")
    if not isinstance(baseline, (list, tuple)) or len(baseline) != T:
        got = len(baseline) if isinstance(baseline, (list, tuple)) else type(baseline).__name__
        raise ReportError(f"baseline must have one accuracy per stage ({T}), got {got}")
    R = [[_check_fraction(v, f"R[{i}][{j}]") for j, v in enumerate(row)] for i, row in enumerate(R)]
    return R, [_check_fraction(v, f"baseline[{j}]") for j, v in enumerate(baseline)]


def continual_metrics(R, baseline) -> dict:
    """Summary numbers of a sequence of T training stages (GEM, Lopez-Paz & Ranzato 2017).

    R[i][j] is the accuracy on stage j's test split after training stage i; baseline[j] the
    untrained student's accuracy on stage j.

    - ACC = mean_j R[T-1][j]: what the final model knows across all stages.
    - BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]): backward transfer, how later stages changed
      earlier ones; negative is forgetting.
    - FWT = mean_{j>0} (R[j-1][j] - baseline[j]): forward transfer, how much the stages before j
      help on j before it is trained.
    - forgetting[j] = max_{i<T-1} R[i][j] - R[T-1][j] (Chaudhry et al. 2018): the drop from the
      best accuracy stage j ever had; None for the last stage, which had no later stage to lose it.

    BWT and FWT are None when T == 1 (no pair of stages to compare).
    """
    R, baseline = _check_matrix(R, baseline)
    T = len(R)
    last = R[T - 1]
    forgetting = [max(R[i][j] for i in range(T - 1)) - last[j] if j < T - 1 else None for j in range(T)]
    return {
        "T": T,
        "ACC": mean_or_none(last),
        "BWT": mean_or_none([last[j] - R[j][j] for j in range(T - 1)]),
        "FWT": mean_or_none([R[j - 1][j] - baseline[j] for j in range(1, T)]),
        "forgetting": forgetting,
        "mean_forgetting": mean_or_none([f for f in forgetting if f is not None]),
    }


def stage_names(data: dict, where: str = "continual data") -> list[str]:
    """Stage names, checked against the matrix so a table never mislabels a row."""
    R = data.get("R")
    T = len(R) if isinstance(R, (list, tuple)) else 0
    stages = data.get("stages")
    if stages is None:
        return [f"stage {j}" for j in range(T)]
    if not isinstance(stages, (list, tuple)) or len(stages) != T:
        got = len(stages) if isinstance(stages, (list, tuple)) else type(stages).__name__
        raise ReportError(f"{where}: 'stages' must name the {T} stages of R, got {got}")
    return [str(s) for s in stages]


def _validated(data: dict, where: str = "continual data") -> tuple[list[str], dict]:
    if not isinstance(data, dict) or "R" not in data or "baseline" not in data:
        raise ReportError(f"{where}: expected an object with 'stages', 'R' and 'baseline'")
    try:
        metrics = continual_metrics(data["R"], data["baseline"])
    except ReportError as exc:
        raise ReportError(f"{where}: {exc}") from None
    return stage_names(data, where), metrics


def continual_markdown(data: dict) -> str:
    """The accuracy matrix (row: after training stage i; column: tested on stage j) and its
    summary numbers, in percent and percentage points."""
    stages, m = _validated(data)
    header = ["after \\ test on", *stages]
    rows = [["before training", *(pct(b) for b in data["baseline"])]]
    rows += [[f"after {s}", *(pct(v) for v in row)] for s, row in zip(stages, data["R"])]
    rows.append(["forgetting", *(signed_pct(f) if f is not None else MISSING for f in m["forgetting"])])
    summary = markdown_table(["metric", "value"], [
        ["ACC (final mean accuracy) %", pct(m["ACC"])],
        ["BWT (backward transfer) pp", signed_pct(m["BWT"])],
        ["FWT (forward transfer) pp", signed_pct(m["FWT"])],
        ["mean forgetting pp", signed_pct(m["mean_forgetting"])],
    ])
    return "\n".join([f"### Continual learning over {m['T']} stages", "",
                      "Accuracy % on each stage's test split:", "", markdown_table(header, rows), summary])


def continual_heatmap(data: dict, out_png: str | Path) -> Path:
    """The matrix as a picture: forgetting shows as a column fading downwards below its
    diagonal cell, forward transfer as colour above the diagonal."""
    stages, m = _validated(data)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = m["T"]
    side = max(4.0, 1.0 + 1.1 * T)
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(data["R"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
    for i, row in enumerate(data["R"]):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if v < 0.6 else "black", fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(T), [f"test on {s}" for s in stages], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(T), [f"after {s}" for s in stages], fontsize=8)
    ax.set_title(f"ACC {pct(m['ACC'])}%  BWT {signed_pct(m['BWT'])} pp  FWT {signed_pct(m['FWT'])} pp", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy", shrink=0.8)
    out_png = Path(out_png)
    buf = io.BytesIO()
    canvas.print_png(buf)
    atomic_write(out_png, buf.getvalue())
    return out_png


def read_continual(path: str | Path) -> dict:
    path = Path(path)
    data = read_json(path, "continual")
    _validated(data, str(path))
    return data


def write_continual(data: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """`continual.md` and `continual.png` in `out_dir` (the run directory, beside continual.json)."""
    out_dir = Path(out_dir)
    md_path, png_path = out_dir / "continual.md", out_dir / "continual.png"
    atomic_write(md_path, continual_markdown(data))
    continual_heatmap(data, png_path)
    return md_path, png_path


