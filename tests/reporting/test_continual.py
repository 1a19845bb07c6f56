"""Continual-learning metrics (ACC, BWT, FWT, forgetting), their table and heatmap."""
from __future__ import annotations

import pytest
from PIL import Image

from mmdistill.reporting.continual import continual_heatmap, continual_markdown, continual_metrics, write_continual
from mmdistill.reporting.tables import ReportError
from tests.helpers import table_header, table_row

R2 = [[0.8, 0.1], [0.6, 0.9]]
B2 = [0.2, 0.05]
R3 = [[0.9, 0.2, 0.1], [0.95, 0.8, 0.3], [0.6, 0.5, 0.95]]
B3 = [0.1, 0.1, 0.2]


def test_continual_metrics_2x2_by_hand():
    m = continual_metrics(R2, B2)
    assert m["T"] == 2
    assert m["ACC"] == pytest.approx((0.6 + 0.9) / 2)
    assert m["BWT"] == pytest.approx(0.6 - 0.8)
    assert m["FWT"] == pytest.approx(0.1 - 0.05)
    assert m["forgetting"][0] == pytest.approx(0.2) and m["forgetting"][1] is None


def test_continual_metrics_3x3_by_hand():
    m = continual_metrics(R3, B3)
    assert m["ACC"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)  # against the diagonal
    assert m["FWT"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    # forgetting uses the best earlier accuracy (0.95 after stage 1), not the diagonal
    assert m["forgetting"][:2] == pytest.approx([0.95 - 0.6, 0.8 - 0.5]) and m["forgetting"][2] is None
    assert m["mean_forgetting"] == pytest.approx((0.35 + 0.3) / 2)


def test_continual_metrics_single_stage_has_no_transfer():
    m = continual_metrics([[0.7]], [0.1])
    assert m["ACC"] == pytest.approx(0.7) and m["BWT"] is None and m["FWT"] is None


@pytest.mark.parametrize("R, baseline, match", [
    ([[0.1, 0.2]], [0.1], "1 x 1"),
    ([[0.1, 0.2], [0.3]], [0.1, 0.2], r"2 x 2.*row 1 has 1"),
    (R2, [0.1], "baseline must have one accuracy per stage \\(2\\), got 1"),
    ([], [], "non-empty"),
    ([[0.5, 75.0], [0.5, 0.5]], B2, r"R\[0\]\[1\] = 75.0.*\[0, 1\]"),
    (R2, [0.1, float("nan")], r"baseline\[1\]"),
])
def test_continual_metrics_rejects_bad_shapes(R, baseline, match):
    with pytest.raises(ReportError, match=match):
        continual_metrics(R, baseline)


def test_continual_markdown_matrix_and_metrics():
    md = continual_markdown({"stages": ["count", "attribute", "spatial"], "R": R3, "baseline": B3})
    assert table_header(md) == ["after \\ test on", "count", "attribute", "spatial"]
    assert table_row(md, "after attribute") == ["after attribute", "95.0", "80.0", "30.0"]
    assert table_row(md, "before training") == ["before training", "10.0", "10.0", "20.0"]
    assert table_row(md, "forgetting") == ["forgetting", "+35.0", "+30.0", "-"]
    assert table_row(md, "ACC (final mean accuracy) %")[1] == "68.3"
    assert table_row(md, "BWT (backward transfer) pp")[1] == "-30.0"
    assert table_row(md, "FWT (forward transfer) pp")[1] == "+10.0"


def test_continual_stage_names_must_match_the_matrix():
    with pytest.raises(ReportError, match="'stages' must name the 2 stages"):
        continual_markdown({"stages": ["a"], "R": R2, "baseline": B2})


def test_continual_heatmap_is_a_png(tmp_path):
    out = continual_heatmap({"stages": ["count", "attribute", "spatial"], "R": R3, "baseline": B3}, tmp_path / "h.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert min(im.size) >= 200


def test_write_continual_next_to_the_json(tmp_path):
    data = {"stages": ["a", "b"], "R": R2, "baseline": B2}
    md, png = write_continual(data, tmp_path)
    assert (md, png) == (tmp_path / "continual.md", tmp_path / "continual.png")
    assert "+5.0" in md.read_text()
    with Image.open(png) as im:
        im.verify()
