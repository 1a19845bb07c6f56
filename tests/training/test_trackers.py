"""train.report_to: accelerate's trackers, fed the rows of metrics.jsonl; tensorboard and mlflow
(offline, a file store) for real."""
import pytest
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from mmdistill.config import ConfigError, load_config
from mmdistill.config.validation import TRACKERS
from tests.helpers import metrics_rows, run_mmdistill


def test_the_tracker_names_are_accelerates():
    assert sorted(TRACKERS) == sorted(t for t in LoggerType.list() if t != "all")


@pytest.mark.parametrize("value, shown", [("[tensorbord]", "['tensorbord']"), ("[wandb,wandb]", "repeats")])
def test_unknown_or_repeated_trackers_are_refused(value, shown):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [f"train.report_to={value}"])
    assert str(info.value).startswith(f"config key 'train.report_to' has {shown}; allowed: tensorboard, wandb")


def test_a_tracker_not_installed_is_one_line_before_any_model_loads(tmp_path):
    missing = next(t for t in TRACKERS if t not in {str(x) for x in get_available_trackers()})
    run = tmp_path / "run"
    proc = run_mmdistill("train", "tiny", f"train.output_dir={run}", f"train.report_to=[{missing}]")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"mmdistill: config key 'train.report_to' names {missing}, which is not installed here (pip install ")
    assert not run.exists()  # nothing written, nothing loaded


def test_tensorboard_and_mlflow_get_every_row(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, store = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database store; offline
    proc = run_mmdistill("train", "tiny", f"train.output_dir={run}", "train.max_steps=3",
                         "train.report_to=[tensorboard,mlflow]", "train.tracker_project=trackers-test",
                         "eval.num_samples=0", MLFLOW_TRACKING_URI=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [(r["step"], r["loss"]) for r in metrics_rows(run)]
    assert [s for s, _ in losses] == [1, 2, 3]

    client = MlflowClient(store)
    mlflow_run, = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == losses
    assert mlflow_run.data.params["method.name"] == "opd"  # the resolved config, flattened

    events = EventAccumulator(str(run / "tensorboard" / "trackers-test"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses


def test_no_trackers_writes_metrics_jsonl_only(tmp_path):
    run = tmp_path / "run"
    proc = run_mmdistill("train", "tiny", f"train.output_dir={run}", "train.max_steps=1", "train.report_to=[]",
                         "eval.num_samples=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(metrics_rows(run)) == 1 and not (run / "tensorboard").exists()
