"""benchmarks/gap.py's rule, on run folders written by hand: which variant qualifies, and the
fallback (the most stable variant) when none does."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gap  # noqa: E402


def _run(root: Path, name: str, accuracy: float, distinct: float) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "student.json").write_text(json.dumps(
        {"splits": {"test": {"accuracy": accuracy, "distinct_rate": distinct}}}))
    return run


def _tracks(tmp_path: Path, scores: dict[str, dict[str, list[tuple[float, float]]]]) -> dict:
    """scores[track][method] = [(accuracy, distinct) per seed]; the starting student is distinct 0.5."""
    tracks = {}
    for track, methods in scores.items():
        root = tmp_path / track
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "student_init.json").write_text(json.dumps({"splits": {"test": {"distinct_rate": 0.5}}}))
        runs = {m: [_run(root, f"{m}-seed{i}", a, d) for i, (a, d) in enumerate(seeds)] for m, seeds in methods.items()}
        tracks[track] = {"runs": runs, "refs": root / "refs"}
    return tracks


def _scores(**variants):
    base = {"opd": [(0.50, 1.0)] * 3, "full_opd": [(0.52, 1.0)] * 3}
    every = {v: [(0.0, 0.01)] * 3 for v in ["dopd", *gap.VARIANTS]}
    every.update(variants)
    return {**base, **every}


def test_a_variant_that_beats_both_baselines_on_both_tracks_without_collapsing_qualifies(tmp_path):
    good = [(0.60, 0.9), (0.58, 0.8), (0.59, 0.7)]
    tracks = _tracks(tmp_path, {"chain": _scores(dopd_mix=good), "scenes": _scores(dopd_mix=good)})
    d = gap.decide(tracks)
    assert d["decision"] == "dopd_mix qualifies" and d["dopd_default"] == "dopd_mix"
    assert d["variants"]["dopd_mix"]["qualifies"] and not d["variants"]["dopd"]["qualifies"]


@pytest.mark.parametrize("scenes_mix, expected", [
    ([(0.40, 0.6)] * 3, "dopd_mix"),                     # stable everywhere, best mean: the fallback's pick
    ([(0.40, 0.6), (0.40, 0.4), (0.40, 0.6)], "dopd_reject_rkl"),  # one seed below the start: collapsed
])
def test_when_none_qualifies_the_most_stable_variant_is_the_default(tmp_path, scenes_mix, expected):
    chain = _scores(dopd_mix=[(0.55, 1.0)] * 3, dopd_reject_rkl=[(0.45, 1.0)] * 3)  # mix beats both on chain only
    scenes = _scores(dopd_mix=scenes_mix, dopd_reject_rkl=[(0.30, 0.6)] * 3)
    d = gap.decide(_tracks(tmp_path, {"chain": chain, "scenes": scenes}))
    assert d["decision"] == "no variant qualifies" and d["dopd_default"] == expected


def test_when_every_variant_collapses_the_highest_lowest_distinct_rate_is_the_default(tmp_path):
    low = {v: [(0.0, 0.01)] * 3 for v in ["dopd", *gap.VARIANTS]}
    low["dopd_anchor"] = [(0.0, 0.3)] * 3
    tracks = _tracks(tmp_path, {"chain": {**_scores(), **low}, "scenes": {**_scores(), **low}})
    assert gap.decide(tracks)["dopd_default"] == "dopd_anchor"
