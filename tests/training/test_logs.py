import json

from mmdistill.training.logs import MetricsLogger
from tests.helpers import metrics_rows


def test_fresh_run_starts_a_new_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    log = MetricsLogger(tmp_path, 0)
    log.log(1, {"loss": 1.0})
    log.close()
    assert metrics_rows(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-line
    log = MetricsLogger(tmp_path, 2)
    log.log(3, {"loss": 30.0})
    log.close()
    assert metrics_rows(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
