"""`mmdistill plot`: metrics.jsonl (gaps, malformed lines, varying keys) to a PNG of training curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from mmdistill.cli import main
from mmdistill.reporting.plot import PlotError, panels, plot_runs, read_metrics, smooth_series

SHARES = ("share_ht", "share_lh", "share_hs", "share_ll")


def write_run(run_dir: Path, steps, *, dopd: bool = True, tail: str | None = '{"step": 99, "loss": 0.') -> Path:
    """A fake run: common keys on every row, DOPD shares/losses, a key missing on some rows, and
    (by default) a half-written last line as a kill leaves it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, step in enumerate(steps):
        row = {"step": step, "loss": 2.0 / (1 + step), "lr": 1e-4 * min(1.0, step / 5),
               "grad_norm": 1.0 + math.sin(step),
               "tokens_per_s": 900.0 + step, "rollout_len": 30.0 + i % 3, "step_s": 0.5,
               "time_rollout": 0.3, "time_view_student": 0.1}
        if dopd:
            raw = [1.0 + (step + k) % 4 for k in range(4)]
            row |= {k: v / sum(raw) for k, v in zip(SHARES, raw)}
            row |= {"loss_ht": 0.1, "loss_ll": 0.2, "reverse_kl": 0.5 / (1 + step), "student_entropy": 1.2}
        if i % 2 == 0:
            row["belief_shift"] = 0.01 * step  # missing on odd rows
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n" + (tail or "")
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    return run_dir


def assert_png(path: Path, min_side: int = 200) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert w >= min_side and h >= min_side, (w, h)
    return w, h


STEPS = [*range(1, 11), *range(21, 31)]  # resumed run: steps 11..20 missing


def test_read_metrics_skips_malformed_lines_with_warning(tmp_path):
    run = write_run(tmp_path / "r", STEPS)
    warnings = []
    rows = read_metrics(run, warn=warnings.append)
    assert [r["step"] for r in rows] == STEPS
    assert len(warnings) == 1 and f"metrics.jsonl:{len(STEPS) + 1}:" in warnings[0], warnings


def test_read_metrics_sorts_and_keeps_later_duplicate(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 1.0}\n\n{"step": 1, "loss": 3.0}\n[1, 2]\n{"step": 2, "loss": 0.5}\n', encoding="utf-8")
    warnings = []
    rows = read_metrics(run, warn=warnings.append)
    assert rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 0.5}]
    assert len(warnings) == 1 and "metrics.jsonl:4:" in warnings[0]


def test_default_layout_groups_shares_and_times(tmp_path):
    run = write_run(tmp_path / "r", STEPS)
    from mmdistill.reporting.plot import numeric_keys, ordered_keys

    layout = panels(ordered_keys(numeric_keys(read_metrics(run, warn=lambda m: None))))
    titles = [t for t, _ in layout]
    share_panels = [ks for _, ks in layout if ks[0].startswith("share_")]
    assert len(share_panels) == 1 and sorted(share_panels[0]) == sorted(SHARES)
    time_panels = [ks for _, ks in layout if ks[0].startswith("time_")]
    assert time_panels == [["time_rollout", "time_view_student"]]
    assert titles[0] == "loss"  # loss parts first, then optimiser, throughput, diagnostics
    flat = [k for _, ks in layout for k in ks]
    assert flat.index("loss_ht") < flat.index("lr") < flat.index("grad_norm") < flat.index("tokens_per_s")
    assert flat.index("tokens_per_s") < flat.index("share_ht") < flat.index("belief_shift")
    assert "step" not in flat


def test_plot_runs_default_output(tmp_path, capsys):
    run = write_run(tmp_path / "r", STEPS)
    out = plot_runs([run])
    assert out == run / "curves.png"
    assert_png(out, min_side=500)
    assert "metrics.jsonl:21: malformed line skipped" in capsys.readouterr().err


def test_plot_runs_keys_and_smoothing(tmp_path):
    run = write_run(tmp_path / "r", STEPS)
    full = plot_runs([run], tmp_path / "all.png", warn=lambda m: None)
    few = plot_runs([run], tmp_path / "few.png", keys=["loss", "share_*"], smooth=4, warn=lambda m: None)
    one = plot_runs([run], tmp_path / "one.png", keys=["reverse_kl"], warn=lambda m: None)
    w_full, h_full = assert_png(full)
    w_few, h_few = assert_png(few)
    w_one, h_one = assert_png(one)
    assert w_few * h_few < w_full * h_full  # two subplots, not fifteen
    assert w_one * h_one < w_few * h_few


def test_smooth_series():
    assert smooth_series([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    got = smooth_series([1.0, 3.0, 5.0, math.nan, 7.0], 2)
    assert got[:3] == [1.0, 2.0, 4.0] and math.isnan(got[3]) and got[4] == 7.0


def test_two_runs_overlaid(tmp_path):
    a = write_run(tmp_path / "a" / "run", STEPS)
    b = write_run(tmp_path / "b" / "run", range(1, 16), dopd=False, tail=None)  # other method: no share_*
    out = plot_runs([a, b], tmp_path / "both.png", smooth=3, warn=lambda m: None)
    assert_png(out, min_side=500)


def test_cli_plot(tmp_path, capsys):
    a = write_run(tmp_path / "a", STEPS)
    b = write_run(tmp_path / "b", range(1, 16), dopd=False, tail=None)
    assert main(["plot", str(a)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(a / "curves.png")
    assert "warning" in captured.err and "metrics.jsonl:21" in captured.err
    assert_png(a / "curves.png")

    out = tmp_path / "sub" / "cmp.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--keys", "loss, reverse_kl,share_*", "--smooth", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out)


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "no_numeric", "unknown_key", "bad_format"])
def test_cli_plot_errors(tmp_path, capsys, case):
    run = tmp_path / "r"
    args = ["plot", str(run)]
    if case == "no_metrics":
        run.mkdir()
    elif case == "no_numeric":
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 1, "note": "x"}\n{"step": 2, "loss": null}\n', encoding="utf-8")
    elif case in ("unknown_key", "bad_format"):
        write_run(run, STEPS, tail=None)
        args += ["--keys", "loss,nope"] if case == "unknown_key" else ["--out", str(tmp_path / "x.nope")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mmdistill: ")
    expected = {"missing_dir": "run directory not found", "no_metrics": "no metrics.jsonl in",
                "no_numeric": "no numeric metrics", "unknown_key": "unknown key 'nope'; available: loss, loss_ht",
                "bad_format": "unsupported output format"}[case]
    assert expected in err, err
    if case == "unknown_key":
        assert "share_ht" in err and "time_rollout" in err
    assert not (run / "curves.png").exists()


def test_plot_runs_errors(tmp_path):
    with pytest.raises(PlotError, match="no run directory"):
        plot_runs([])
    run = write_run(tmp_path / "r", STEPS, tail=None)
    with pytest.raises(PlotError, match="--smooth"):
        plot_runs([run], smooth=0)
