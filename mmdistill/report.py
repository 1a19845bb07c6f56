"""Evaluation results to Markdown and PNG: one result, a continual-learning matrix, and the
side-by-side table of several runs (`mmdistill report`).

Inputs are the JSON files the evaluation writes: `RUN_DIR/eval/<label>.json` (one model scored
on every split) and `RUN_DIR/continual.json` (accuracy on every stage's test split after each
training stage). Accuracies are fractions in [0, 1] in the files and percentages in the tables.
matplotlib is imported only for the heatmap, through its Agg canvas (no display, no pyplot state).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EVAL_DIR = "eval"
CONTINUAL_FILE = "continual.json"
# labels looked up as reference rows (the gap recovered is measured between teacher and student_init)
REFERENCES = ("teacher", "teacher_priv", "student_init", "student_init_priv")
MISSING = "-"
# A run directory's trailing seed marker: runs differing only in it are seeds of one experiment.
_SEED_SUFFIX = re.compile(r"^(?P<stem>.+?)[-_](?:seed|s)(?P<seed>\d+)$")


class ReportError(Exception):
    """A problem with the inputs, reported as one line naming the file."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pct(x, digits: int = 1) -> str:
    """Fractions are stored, percentages are read: one place converts."""
    return f"{100 * x:.{digits}f}" if _is_number(x) else MISSING


def _signed_pct(x) -> str:
    """Transfer and forgetting are differences: the sign is the point, so always show it."""
    return f"{100 * x:+.1f}" if _is_number(x) else MISSING


def _escape(text) -> str:
    """A `|` in a name would split a Markdown cell."""
    return str(text).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """Padded so the table also reads as plain text on a terminal. `align`: one of l/r per
    column (default: first column left, the others right, as numbers read best)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[_escape(c) for c in header]] + [[_escape(c) for c in r] for r in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])]) + "\n"


def split_order(names) -> list[str]:
    """`test` first (the split everyone compares on), the rest alphabetically, so tables from
    different runs line up."""
    names = set(names)
    return (["test"] if "test" in names else []) + sorted(names - {"test"})


def _atomic_write(path: Path, data: str | bytes) -> None:
    """A reader (or a killed writer) never sees half a file: write beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """The report's --out: replaced in one step, parent directories made."""
    path = Path(path)
    try:
        _atomic_write(path, text)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ReportError(f"{path}: no such {what} file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# One eval result


def split_accuracy(split: dict) -> float | None:
    """`accuracy`, else correct / n: older or hand-written results may carry only the counts."""
    acc = split.get("accuracy")
    if _is_number(acc):
        return float(acc)
    n, correct = split.get("n"), split.get("correct")
    return correct / n if _is_number(n) and _is_number(correct) and n > 0 else None


def _pass_ks(splits: dict) -> list[str]:
    """pass@k columns present in any split, by k (numerically: 16 after 4)."""
    ks = {str(k) for s in splits.values() for k in (s.get("pass_at_k") or {})}
    return sorted(ks, key=lambda k: (float(k) if k.replace(".", "", 1).isdigit() else math.inf, k))


def _acc_with_ci(split: dict) -> str:
    acc, ci = split_accuracy(split), split.get("ci95")
    if acc is None:
        return MISSING
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(c) for c in ci):
        return f"{_pct(acc)} [{_pct(ci[0])}, {_pct(ci[1])}]"
    return _pct(acc)


def _tokens(x) -> str:
    return f"{x:.1f}" if _is_number(x) else MISSING


def _heading(result: dict) -> str:
    bits = [str(result[k]) for k in ("role", "method") if result.get(k)]
    if result.get("step") is not None:
        bits.append(f"step {result['step']}")
    label = result.get("label") or result.get("role") or "eval"
    return f"### {label}" + (f" ({', '.join(bits)})" if bits else "")


def _settings_line(result: dict) -> str | None:
    """The decoding and checking settings: two results are comparable only when these match."""
    settings = result.get("settings") or {}
    shown = [f"{k}={v}" for k, v in settings.items() if v is not None]
    return "Settings: " + ", ".join(shown) if shown else None


def _splits_of(result: dict, where: str = "result") -> dict:
    splits = result.get("splits")
    if not isinstance(splits, dict) or not splits or not all(isinstance(s, dict) for s in splits.values()):
        raise ReportError(f"{where}: 'splits' must be a non-empty object of split name -> scores")
    return splits


def eval_markdown(result: dict) -> str:
    """One model's scores per split, then accuracy by response length (where a longer answer
    is right less often, the student may be padding or looping)."""
    splits = _splits_of(result, f"eval result '{result.get('label', '?')}'")
    order = split_order(splits)
    ks = _pass_ks(splits)
    header = ["split", "n", "accuracy % [95% CI]", *(f"pass@{k} %" for k in ks),
              "mean tokens", "distinct %", "leakage %", "shortcut %"]
    rows = []
    for name in order:
        s = splits[name]
        pass_at = s.get("pass_at_k") or {}
        rows.append([name, str(s.get("n", MISSING)), _acc_with_ci(s), *(_pct(pass_at.get(k)) for k in ks),
                     _tokens(s.get("mean_response_tokens")), _pct(s.get("distinct_rate")), _pct(s.get("leakage_rate")),
                     _pct(s.get("shortcut_rate"))])
    parts = [_heading(result), ""]
    settings = _settings_line(result)
    if settings:
        parts += [settings, ""]
    parts.append(markdown_table(header, rows))
    by_length = [[name, str(b.get("bucket", MISSING)), str(b.get("n", MISSING)), _pct(b.get("accuracy"))]
                 for name in order for b in (splits[name].get("by_length") or []) if isinstance(b, dict)]
    if by_length:
        parts += ["Accuracy by response length (tokens):", "",
                  markdown_table(["split", "length", "n", "accuracy %"], by_length, align="llrr")]
    return "\n".join(parts)


def _safe_label(result: dict) -> str:
    """The label names files: refuse anything that would land outside the eval directory."""
    label = result.get("label")
    if not isinstance(label, str) or not label or label in (".", "..") or "/" in label or "\\" in label:
        raise ReportError(f"eval result label {label!r} cannot name a file")
    return label


def write_eval(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """`<label>.json` and `<label>.md` in `out_dir`, each replaced in one step so `report`
    never reads a half-written result."""
    label = _safe_label(result)
    out_dir = Path(out_dir)
    md = eval_markdown(result)  # before writing anything: a bad result leaves no files behind
    json_path, md_path = out_dir / f"{label}.json", out_dir / f"{label}.md"
    _atomic_write(json_path, json.dumps(result, indent=2) + "\n")
    _atomic_write(md_path, md)
    return json_path, md_path


def read_eval(path: str | Path) -> dict:
    path = Path(path)
    result = _read_json(path, "eval result")
    _splits_of(result, str(path))
    return result


# ---------------------------------------------------------------------------------------------
# Continual learning


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _check_fraction(v, where: str) -> float:
    if not _is_number(v) or not 0.0 <= v <= 1.0:
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
        "ACC": _mean(last),
        "BWT": _mean([last[j] - R[j][j] for j in range(T - 1)]),
        "FWT": _mean([R[j - 1][j] - baseline[j] for j in range(1, T)]),
        "forgetting": forgetting,
        "mean_forgetting": _mean([f for f in forgetting if f is not None]),
    }


def _stages(data: dict, where: str = "continual data") -> list[str]:
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
    return _stages(data, where), metrics


def continual_markdown(data: dict) -> str:
    """The accuracy matrix (row: after training stage i; column: tested on stage j) and its
    summary numbers, in percent and percentage points."""
    stages, m = _validated(data)
    header = ["after \\ test on", *stages]
    rows = [["before training", *(_pct(b) for b in data["baseline"])]]
    rows += [[f"after {s}", *(_pct(v) for v in row)] for s, row in zip(stages, data["R"])]
    rows.append(["forgetting", *(_signed_pct(f) if f is not None else MISSING for f in m["forgetting"])])
    summary = markdown_table(["metric", "value"], [
        ["ACC (final mean accuracy) %", _pct(m["ACC"])],
        ["BWT (backward transfer) pp", _signed_pct(m["BWT"])],
        ["FWT (forward transfer) pp", _signed_pct(m["FWT"])],
        ["mean forgetting pp", _signed_pct(m["mean_forgetting"])],
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
    ax.set_title(f"ACC {_pct(m['ACC'])}%  BWT {_signed_pct(m['BWT'])} pp  FWT {_signed_pct(m['FWT'])} pp", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy", shrink=0.8)
    out_png = Path(out_png)
    buf = io.BytesIO()
    canvas.print_png(buf)
    _atomic_write(out_png, buf.getvalue())
    return out_png


def read_continual(path: str | Path) -> dict:
    path = Path(path)
    data = _read_json(path, "continual")
    _validated(data, str(path))
    return data


def write_continual(data: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """`continual.md` and `continual.png` in `out_dir` (the run directory, beside continual.json)."""
    out_dir = Path(out_dir)
    md_path, png_path = out_dir / "continual.md", out_dir / "continual.png"
    _atomic_write(md_path, continual_markdown(data))
    continual_heatmap(data, png_path)
    return md_path, png_path


# ---------------------------------------------------------------------------------------------
# Several runs side by side


@dataclass
class Row:
    """One line of the report: a run, or the seeds of one experiment averaged."""

    method: str
    stem: str  # run-directory name, seed marker removed
    run_dirs: list[Path] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    name: str = ""


def seed_stem(name: str) -> tuple[str, bool]:
    """(name without a trailing -seedN / _seedN / -sN / _sN, whether it had one)."""
    m = _SEED_SUFFIX.match(name)
    return (m.group("stem"), True) if m else (name, False)


def _dir_name(run_dir: Path) -> str:
    return run_dir.name or run_dir.resolve().name


def group_runs(run_dirs: Sequence[Path], results: Sequence[dict]) -> list[Row]:
    """Seeds of one experiment (same method, same directory name up to the seed marker) become
    one row; everything else stays a row of its own, in the order given."""
    rows: list[Row] = []
    by_key: dict[tuple, Row] = {}
    for d, r in zip(run_dirs, results):
        method = str(r.get("method") or _dir_name(d))
        stem, seeded = seed_stem(_dir_name(d))
        key = (method, stem) if seeded else (method, stem, str(d.resolve()))
        if key not in by_key:
            by_key[key] = Row(method=method, stem=stem)
            rows.append(by_key[key])
        by_key[key].run_dirs.append(d)
        by_key[key].results.append(r)
    _name_rows(rows)
    return rows


def _name_rows(rows: list[Row]) -> None:
    """Method alone where it is unique, with the directory name where methods repeat, with the
    path where even that repeats."""
    per_method: dict[str, int] = {}
    for row in rows:
        per_method[row.method] = per_method.get(row.method, 0) + 1
    for row in rows:
        row.name = _row_name(row, row.stem if per_method[row.method] > 1 else None)
    seen: dict[str, int] = {}
    for row in rows:
        seen[row.name] = seen.get(row.name, 0) + 1
    for row in rows:
        if seen[row.name] > 1:
            where = row.run_dirs[0] if len(row.run_dirs) == 1 else row.run_dirs[0].parent / row.stem
            row.name = _row_name(row, str(where))


def _row_name(row: Row, where: str | None) -> str:
    quals = [q for q in (where, f"{len(row.results)} seeds" if len(row.results) > 1 else None) if q]
    return row.method + (f" ({', '.join(quals)})" if quals else "")


def find_references(run_dirs: Sequence[Path], refs_dir: str | Path | None = None) -> dict[str, tuple[dict, Path]]:
    """Reference label -> (result, file), from `refs_dir` (an eval output directory holding
    LABEL.json) first, else the first run that has it: all runs of one comparison share the
    teacher and the untrained student, so one copy is enough."""
    found: dict[str, tuple[dict, Path]] = {}
    places = ([Path(refs_dir)] if refs_dir else []) + [d / EVAL_DIR for d in run_dirs]
    for label in REFERENCES:
        for d in places:
            path = d / f"{label}.json"
            if path.is_file():
                found[label] = (read_eval(path), path)
                break
    return found


def gap_recovered(acc: float, teacher: float, init: float) -> float | None:
    """Share of the teacher's lead over the untrained student that training won back: 0 is no
    progress, 1 matches the teacher. None when the teacher has no lead to recover."""
    if teacher <= init or math.isclose(teacher, init, rel_tol=0.0, abs_tol=1e-12):
        return None
    return (acc - init) / (teacher - init)


def _ref_accs(refs: dict, label: str) -> dict[str, float]:
    if label not in refs:
        return {}
    accs = {name: split_accuracy(s) for name, s in _splits_of(refs[label][0]).items()}
    return {k: v for k, v in accs.items() if v is not None}


def _row_accs(row: Row) -> list[dict[str, float]]:
    """Per seed: split -> accuracy."""
    out = []
    for r in row.results:
        accs = {name: split_accuracy(s) for name, s in _splits_of(r).items()}
        out.append({k: v for k, v in accs.items() if v is not None})
    return out


def _cell(values: Sequence[float], total: int, gap: float | None | str) -> str:
    """`mean [± std] [(gap%)] [n=k]`: std over seeds (sample std), n only when some seeds lack
    the split. `gap` is "" when there are no references, None when undefined."""
    if not values:
        return MISSING
    mean = sum(values) / len(values)
    text = _pct(mean)
    if len(values) > 1:
        text += f" ± {_pct(statistics.stdev(values))}"
    if gap != "":
        text += " (n/a)" if gap is None else f" ({100 * gap:.0f}%)"
    if len(values) < total:
        text += f" n={len(values)}"
    return text


def _gap_for(mean: float, teacher: float | None, init: float | None) -> float | None | str:
    if teacher is None or init is None:
        return ""
    return gap_recovered(mean, teacher, init)


def _average_cell(per_seed: list[dict[str, float]], teacher: dict, init: dict) -> str:
    """Mean over splits per seed, then over seeds. The gap is that of the averages, over the
    same splits, and shown only when both references have every one of them."""
    splits = sorted({k for accs in per_seed for k in accs})
    if not splits:
        return MISSING
    averages = [sum(accs.values()) / len(accs) for accs in per_seed if accs]
    same = all(set(accs) == set(splits) for accs in per_seed)
    gap: float | None | str = ""
    if same and all(s in teacher and s in init for s in splits):
        gap = _gap_for(sum(averages) / len(averages), _mean([teacher[s] for s in splits]),
                       _mean([init[s] for s in splits]))
    return _cell(averages, len(per_seed), gap) + ("" if same else " †")


def _accuracy_rows(rows: list[Row], columns: list[str], refs: dict) -> list[list[str]]:
    teacher, init = _ref_accs(refs, "teacher"), _ref_accs(refs, "student_init")
    out = []
    for row in rows:
        per_seed = _row_accs(row)
        cells = []
        for split in columns:
            values = [accs[split] for accs in per_seed if split in accs]
            gap = _gap_for(sum(values) / len(values), teacher.get(split), init.get(split)) if values else ""
            cells.append(_cell(values, len(per_seed), gap))
        out.append([row.name, *cells, _average_cell(per_seed, teacher, init)])
    for label in REFERENCES:
        if label in refs:
            accs = _ref_accs(refs, label)
            avg = _mean(list(accs.values()))
            out.append([f"{label} (ref)", *(_pct(accs.get(s)) for s in columns), _pct(avg)])
    return out


def _continual_table(rows: list[Row]) -> str | None:
    """ACC / BWT / FWT per row, mean ± std over the seeds that have a continual.json."""
    lines = []
    for row in rows:
        found = [(d / CONTINUAL_FILE) for d in row.run_dirs if (d / CONTINUAL_FILE).is_file()]
        if not found:
            continue
        datas = [read_continual(p) for p in found]
        metrics = [continual_metrics(d["R"], d["baseline"]) for d in datas]
        stage_lists = {tuple(_stages(d)) for d in datas}
        stages = " → ".join(next(iter(stage_lists))) if len(stage_lists) == 1 else "differ across seeds"
        cells = []
        for key, fmt in (("ACC", _pct), ("BWT", _signed_pct), ("FWT", _signed_pct), ("mean_forgetting", _signed_pct)):
            values = [m[key] for m in metrics if m[key] is not None]
            text = fmt(_mean(values)) if values else MISSING
            if len(values) > 1:
                text += f" ± {_pct(statistics.stdev(values))}"
            cells.append(text)
        lines.append([row.name, str(len(found)), stages, *cells])
    if not lines:
        return None
    return markdown_table(["run", "runs", "stages", "ACC %", "BWT pp", "FWT pp", "forgetting pp"], lines, align="lrlrrrr")


def _dedupe(run_dirs: Sequence[str | Path]) -> list[Path]:
    """A shell glob may name a run twice; it should count once."""
    seen, out = set(), []
    for d in run_dirs:
        p = Path(d)
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def report_markdown(run_dirs: Sequence[str | Path], label: str = "student", refs_dir: str | Path | None = None) -> str:
    """Every run's `eval/<label>.json` in one table (rows: runs, columns: splits and their
    average), the teacher and untrained student as reference rows (from `refs_dir` or the runs)
    and the gap recovered against them, then continual-learning numbers for the runs that have them."""
    if not run_dirs:
        raise ReportError("no run directory given")
    dirs = _dedupe(run_dirs)
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: run directory not found")
    results = [read_eval(d / EVAL_DIR / f"{label}.json") for d in dirs]
    rows = group_runs(dirs, results)
    if refs_dir is not None and not Path(refs_dir).is_dir():
        raise ReportError(f"{refs_dir}: reference directory not found")
    refs = find_references(dirs, refs_dir)
    columns = split_order({s for r in results for s in _splits_of(r)})
    table_rows = _accuracy_rows(rows, columns, refs)
    table = markdown_table(["run", *columns, "avg"], table_rows)
    parts = [f"## Accuracy % ({label})", "", table, *_notes(rows, refs, table_rows)]
    continual = _continual_table(rows)
    if continual:
        parts += ["", "## Continual learning", "", continual,
                  "ACC: final mean accuracy; BWT: backward transfer (negative = forgetting); FWT: forward transfer; "
                  "forgetting: mean drop from each stage's best accuracy. ACC/BWT/FWT as in GEM "
                  "(Lopez-Paz & Ranzato 2017), forgetting as in Chaudhry et al. 2018."]
    return "\n".join(parts).rstrip("\n") + "\n"


def _notes(rows: list[Row], refs: dict, table_rows: list[list[str]]) -> list[str]:
    """The footnotes a reader needs to trust the table: what a cell holds and where the
    references came from."""
    notes = []
    if "teacher" in refs and "student_init" in refs:
        notes.append("In parentheses: gap recovered, (accuracy - student_init) / (teacher - student_init); "
                     "n/a where the teacher does not score above the untrained student.")
    elif refs.keys() & {"teacher", "student_init"}:
        missing = "teacher" if "teacher" not in refs else "student_init"
        notes.append(f"No gap recovered: no run has eval/{missing}.json.")
    if any(len(r.results) > 1 for r in rows):
        notes.append("Rows over several seeds: mean ± sample std over seeds; n=k where only k seeds have the split.")
    notes.append("avg: mean over the splits the run has.")
    if any(cell.endswith(" †") for line in table_rows for cell in line):
        notes.append("†: the seeds do not all have the same splits; avg is each seed's own mean, then averaged.")
    for label in REFERENCES:
        if label in refs:
            result, path = refs[label]
            step = f", step {result['step']}" if result.get("step") is not None else ""
            notes.append(f"{label} (ref): from {path}{step}.")
    return [f"- {n}" for n in notes]
