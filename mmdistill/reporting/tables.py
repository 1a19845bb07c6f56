"""Evaluation results to Markdown and PNG: one result, a continual-learning matrix, and the
side-by-side table of several runs (`mmdistill report`).

Inputs are the JSON files the evaluation writes: `RUN_DIR/eval/<label>.json` (one model scored
on every split) and `RUN_DIR/continual.json` (accuracy on every stage's test split after each
training stage). Accuracies are fractions in [0, 1] in the files and percentages in the tables.
matplotlib is imported only for the heatmap, through its Agg canvas (no display, no pyplot state).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

EVAL_DIR = "eval"
CONTINUAL_FILE = "continual.json"
# labels looked up as reference rows (the gap recovered is measured between teacher and student_init)
REFERENCES = ("teacher", "teacher_priv", "student_init", "student_init_priv")
MISSING = "-"
# A run directory's trailing seed marker: runs differing only in it are seeds of one experiment.
SEED_SUFFIX = re.compile(r"^(?P<stem>.+?)[-_](?:seed|s)(?P<seed>\d+)$")


class ReportError(Exception):
    """A problem with the inputs, reported as one line naming the file."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pct(x, digits: int = 1) -> str:
    """Fractions are stored, percentages are read: one place converts."""
    return f"{100 * x:.{digits}f}" if is_number(x) else MISSING


def signed_pct(x) -> str:
    """Transfer and forgetting are differences: the sign is the point, so always show it."""
    return f"{100 * x:+.1f}" if is_number(x) else MISSING


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


def atomic_write(path: Path, data: str | bytes) -> None:
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
        atomic_write(path, text)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def read_json(path: Path, what: str) -> dict:
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
    if is_number(acc):
        return float(acc)
    n, correct = split.get("n"), split.get("correct")
    return correct / n if is_number(n) and is_number(correct) and n > 0 else None


def _pass_ks(splits: dict) -> list[str]:
    """pass@k columns present in any split, by k (numerically: 16 after 4)."""
    ks = {str(k) for s in splits.values() for k in (s.get("pass_at_k") or {})}
    return sorted(ks, key=lambda k: (float(k) if k.replace(".", "", 1).isdigit() else math.inf, k))


def _acc_with_ci(split: dict) -> str:
    acc, ci = split_accuracy(split), split.get("ci95")
    if acc is None:
        return MISSING
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(c) for c in ci):
        return f"{pct(acc)} [{pct(ci[0])}, {pct(ci[1])}]"
    return pct(acc)


def _tokens(x) -> str:
    return f"{x:.1f}" if is_number(x) else MISSING


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


def splits_of(result: dict, where: str = "result") -> dict:
    splits = result.get("splits")
    if not isinstance(splits, dict) or not splits or not all(isinstance(s, dict) for s in splits.values()):
        raise ReportError(f"{where}: 'splits' must be a non-empty object of split name -> scores")
    return splits


def eval_markdown(result: dict) -> str:
    """One model's scores per split, then accuracy by response length (where a longer answer
    is right less often, the student may be padding or looping)."""
    splits = splits_of(result, f"eval result '{result.get('label', '?')}'")
    order = split_order(splits)
    ks = _pass_ks(splits)
    header = ["split", "n", "accuracy % [95% CI]", *(f"pass@{k} %" for k in ks),
              "mean tokens", "distinct %", "leakage %", "shortcut %"]
    rows = []
    for name in order:
        s = splits[name]
        pass_at = s.get("pass_at_k") or {}
        rows.append([name, str(s.get("n", MISSING)), _acc_with_ci(s), *(pct(pass_at.get(k)) for k in ks),
                     _tokens(s.get("mean_response_tokens")), pct(s.get("distinct_rate")), pct(s.get("leakage_rate")),
                     pct(s.get("shortcut_rate"))])
    parts = [_heading(result), ""]
    warnings = [str(w) for w in result.get("warnings") or []]
    if warnings:  # skipped samples, answers nothing could extract: read before the numbers
        parts += [*(f"> {w}" for w in warnings), ""]
    settings = _settings_line(result)
    if settings:
        parts += [settings, ""]
    parts.append(markdown_table(header, rows))
    by_length = [[name, str(b.get("bucket", MISSING)), str(b.get("n", MISSING)), pct(b.get("accuracy"))]
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
    atomic_write(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write(md_path, md)
    return json_path, md_path


def read_eval(path: str | Path) -> dict:
    path = Path(path)
    result = read_json(path, "eval result")
    splits_of(result, str(path))
    return result


