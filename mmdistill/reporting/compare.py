"""The side-by-side table of several runs (`mmdistill report`): seeds grouped into one row, reference
rows (teacher, untrained student), the gap recovered."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmdistill.reporting.continual import continual_metrics, mean_or_none, read_continual, stage_names
from mmdistill.reporting.tables import (
    CONTINUAL_FILE,
    EVAL_DIR,
    MISSING,
    REFERENCES,
    SEED_SUFFIX,
    ReportError,
    markdown_table,
    pct,
    read_eval,
    signed_pct,
    split_accuracy,
    split_order,
    splits_of,
)

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
    m = SEED_SUFFIX.match(name)
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
    accs = {name: split_accuracy(s) for name, s in splits_of(refs[label][0]).items()}
    return {k: v for k, v in accs.items() if v is not None}


def _row_accs(row: Row) -> list[dict[str, float]]:
    """Per seed: split -> accuracy."""
    out = []
    for r in row.results:
        accs = {name: split_accuracy(s) for name, s in splits_of(r).items()}
        out.append({k: v for k, v in accs.items() if v is not None})
    return out


def _cell(values: Sequence[float], total: int, gap: float | None | str) -> str:
    """`mean [± std] [(gap%)] [n=k]`: std over seeds (sample std), n only when some seeds lack
    the split. `gap` is "" when there are no references, None when undefined."""
    if not values:
        return MISSING
    mean = sum(values) / len(values)
    text = pct(mean)
    if len(values) > 1:
        text += f" ± {pct(statistics.stdev(values))}"
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
        gap = _gap_for(sum(averages) / len(averages), mean_or_none([teacher[s] for s in splits]),
                       mean_or_none([init[s] for s in splits]))
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
            avg = mean_or_none(list(accs.values()))
            out.append([f"{label} (ref)", *(pct(accs.get(s)) for s in columns), pct(avg)])
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
        stage_lists = {tuple(stage_names(d)) for d in datas}
        stages = " → ".join(next(iter(stage_lists))) if len(stage_lists) == 1 else "differ across seeds"
        cells = []
        for key, fmt in (("ACC", pct), ("BWT", signed_pct), ("FWT", signed_pct), ("mean_forgetting", signed_pct)):
            values = [m[key] for m in metrics if m[key] is not None]
            text = fmt(mean_or_none(values)) if values else MISSING
            if len(values) > 1:
                text += f" ± {pct(statistics.stdev(values))}"
            cells.append(text)
        lines.append([row.name, str(len(found)), stages, *cells])
    if not lines:
        return None
    return markdown_table(["run", "runs", "stages", "ACC %", "BWT pp", "FWT pp", "forgetting pp"], lines,
                          align="lrlrrrr")


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
    columns = split_order({s for r in results for s in splits_of(r)})
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
