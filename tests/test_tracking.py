"""Runs you can browse: the session's real `polyrec train` run is in its run folder's MLflow store with its config as
parameters, one point per epoch of each task's loss and of the validation metrics, the test metrics its artifact
records, and its reports as artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from train.config import TrainConfig
from train.tracking import flat_params, metric_name, tracking_uri


def test_a_nested_config_is_flattened_into_dotted_parameters():
    assert flat_params({"epochs": 2, "model": {"backbone": {"mode": "lora", "extra": {}}, "ks": [10, 20]}}) == {
        "epochs": "2",
        "model.backbone.mode": "lora",
        "model.backbone.extra": "{}",
        "model.ks": "[10, 20]",
    }
    assert metric_name("validation/NDCG@10") == "validation/NDCG_at_10"


def test_the_store_is_the_run_folders_unless_a_uri_is_given(tmp_path):
    default = TrainConfig(output=str(tmp_path / "run" / "model"))
    assert tracking_uri(default.tracking, tmp_path / "run") == f"sqlite:///{tmp_path / 'run' / 'mlruns' / 'mlflow.db'}"
    remote = default.tracking.model_copy(update={"uri": "http://mlflow.internal:5000"})
    assert tracking_uri(remote, tmp_path / "run") == "http://mlflow.internal:5000"


def test_the_cli_training_run_is_tracked_with_its_config_epochs_test_metrics_and_reports(trained_run):
    root = Path(trained_run.artifact).parents[1]
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("polyrec").experiment_id])
    assert run.info.status == "FINISHED"

    config = TrainConfig.from_yaml(root / "train.yaml")
    params = run.data.params
    assert params["epochs"] == str(config.epochs) == "2"
    assert params["batch_size"] == str(config.batch_size)
    assert params["model.user_model.hidden_size"] == str(config.model.user_model.hidden_size)
    assert params["model.backbone.random_init_config.hidden_size"] == str(config.model.backbone.random_init_config["hidden_size"])

    tasks = [task for task in ("retrieval", "rating", "like", "attributes") if getattr(config.model.tasks, task)]
    names = [f"train/loss_{task}" for task in ["total", *tasks]] + ["validation/NDCG_at_10"]
    per_epoch = {name: client.get_metric_history(run.info.run_id, name) for name in names}
    for name, history in per_epoch.items():
        assert sorted(point.step for point in history) == [1, 2], name

    recorded = json.loads((Path(trained_run.artifact) / "artifact.json").read_text())["metrics"]
    assert run.data.metrics["test/NDCG_at_10"] == pytest.approx(recorded["test"]["NDCG@10"])
    # The artifact is the best epoch's model: its validation figure is one of the epochs' points.
    assert recorded["validation"]["NDCG@10"] in [pytest.approx(point.value) for point in per_epoch["validation/NDCG_at_10"]]

    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"metrics.md", "training_curves.png"} <= artifacts
