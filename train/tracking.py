"""Training and retraining runs tracked with MLflow, so that they can be browsed and compared.

The driver opens a run with the flattened training config as parameters (``start_tracking``); Ray Train's controller
logs each epoch's metrics into it as the workers report them (``EpochMetricsCallback``, a ``ray.train.UserCallback``);
after the export the driver adds the test metrics and the reports and plots as artifacts (``TrackedRun.finish``).
Retraining records the gate's decision on the candidate's run, and registers each promoted version in the model
registry with that decision (``record_gate``).

A plain folder as ``tracking.uri`` is a local store: ``<folder>/mlflow.db`` (SQLite) and ``<folder>/artifacts``;
browse it with ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from train.config import TrackingConfig, TrainConfig

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
#: What a run's output folder holds for people to read: the test report, its plot, the training curves.
ARTIFACT_SUFFIXES = (".md", ".json", ".png")
#: MLflow metric names may not hold "@"; ``validation/NDCG@10`` is logged as ``validation/NDCG_at_10``.
_AT = "_at_"

# Nothing leaves the machine on its own: MLflow's usage telemetry is off unless asked for.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(config: TrackingConfig, run_folder: Path) -> str:
    """The MLflow tracking URI of ``config``: a URI as given, a folder (default: ``run_folder/mlruns``) as a SQLite store in it."""
    if config.uri and "://" in config.uri:
        return config.uri
    return f"sqlite:///{_store_folder(config, run_folder) / STORE_FILE}"


def _store_folder(config: TrackingConfig, run_folder: Path) -> Path:
    folder = Path(config.uri).resolve() if config.uri else run_folder.resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def metric_name(name: str) -> str:
    return name.replace("@", _AT)


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: ``model.backbone.mode`` → ``"frozen"``."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    numbers = [Metric(metric_name(key), float(value), now, step) for key, value in metrics.items() if isinstance(value, int | float)]
    _client(uri).log_batch(run_id, metrics=numbers)


class EpochMetricsCallback(UserCallback):
    """Ray Train's controller logs rank 0's metrics of every report (one per epoch) into the driver's MLflow run."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        _log_metrics(self.uri, self.run_id, metrics[0], step=int(metrics[0].get("epoch", 0)))


@dataclass
class TrackedRun:
    """One training run's MLflow run."""

    uri: str
    run_id: str

    def callback(self) -> EpochMetricsCallback:
        return EpochMetricsCallback(self.uri, self.run_id)

    def finish(self, output: Path, test_metrics: Mapping[str, float]) -> None:
        """The test metrics and the output's reports and plots, then the run marked finished."""
        client = _client(self.uri)
        _log_metrics(self.uri, self.run_id, {f"test/{key}": value for key, value in test_metrics.items()}, step=0)
        for path in sorted(output.iterdir()):
            if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
                client.log_artifact(self.run_id, str(path))
        client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        _client(self.uri).set_terminated(self.run_id, "FAILED")


def run_folder(config: TrainConfig) -> Path:
    """The folder that holds the training output (``runs/default`` for ``runs/default/model``); ``runs`` for an output URI."""
    return Path("runs").resolve() if "://" in config.output else Path(config.output).resolve().parent


def start_tracking(config: TrainConfig) -> TrackedRun | None:
    """An MLflow run for this training (None when tracking is off), with the config as parameters."""
    settings = config.tracking
    if not settings.enabled:
        return None
    uri = tracking_uri(settings, run_folder(config))
    client = _client(uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # Beside the store, not in the working directory (MLflow's default for a database store).
        artifacts = (_store_folder(settings, run_folder(config)) / ARTIFACTS_DIR).as_uri() if "://" not in (settings.uri or "") else None
        experiment_id = client.create_experiment(settings.experiment, artifact_location=artifacts)
    run = client.create_run(experiment_id, run_name=config.model_version or config.run_name, tags={"output": config.output})
    params = flat_params(config.model_dump(mode="json", exclude={"tracking"}))
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    return TrackedRun(uri, run.info.run_id)


def record_gate(uri: str, run_id: str, registered_model: str, decision: Mapping[str, Any], artifact: str) -> str | None:
    """The gate's decision as tags of the candidate's run (``gate.promoted``, ``gate.reason``) and its figures as
    metrics; a promoted candidate also becomes a version of ``registered_model`` (its source: the artifact folder)
    with the same tags. Returns that version's number, None when the candidate was not promoted."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    tags = {"gate.promoted": str(decision["promoted"]).lower(), "gate.reason": decision["reason"]}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for version in ("serving", "candidate"):
        _log_metrics(uri, run_id, {f"gate/{version}/{key}": value for key, value in decision[version].items()}, step=0)
    if not decision["promoted"]:
        return None
    try:
        client.create_registered_model(registered_model)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(registered_model, source=str(Path(artifact).resolve()), run_id=run_id, tags=tags).version
