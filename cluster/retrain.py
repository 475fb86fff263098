"""Retraining from logged feedback (``polyrec retrain``): the closed loop's way back.

1. Find the version in service: the running Ray Serve application's (local or ``ray.address``), or the
   KubeRay RayService's (``serving.kind: kubernetes``), or ``current_model`` when given.
2. Preprocess the base data plus the feedback log (one more source, duplicate event ids removed) and the
   items registered at run time, which join the catalogue with their text.
3. Train, warm-started from the version in service (its item and user rows carried over by id).
4. Gate: both versions are scored on the same new validation split (``train.evaluate.evaluate_on``:
   items the serving version never saw are cold items for it, encoded from their text) and the
   candidate must hold NDCG@10 with guardrails on the other tasks (``cluster.gate``).
5. Promote: the candidate is loaded in full, then swapped into the service in place (only the model
   deployments' ``user_config`` changes); the decision and both versions' figures go to the
   service's versions record and to ``retrain.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cluster.gate import GateConfig, GateDecision, decide
from common.config import RayConfig, StageConfig
from common.errors import InputError
from data.config import PreprocessConfig, SourceConfig
from data.feedback_log import REGISTRY_FILE
from data.pipeline import run_preprocess
from serve.versions import VersionHistory
from train.config import TrainConfig
from train.tracking import record_gate


class ServingConfig(StageConfig):
    """Where the version in service runs, to read it and to promote into it."""

    #: ``ray``: a Ray Serve application on a Ray cluster (``ray.address``, else the local one);
    #: ``kubernetes``: the KubeRay RayService ``rayservice`` (the scheduled retrain's RayCronJob).
    kind: Literal["ray", "kubernetes"] = "ray"
    ray: RayConfig = Field(default_factory=RayConfig)
    rayservice: str = "polyrec-serve"
    namespace: str | None = None  # None: the namespace of the pod's service account, else the kubeconfig's


class RetrainConfig(StageConfig):
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    feedback_log: str = "runs/default/feedback"
    #: The artifact in service (warm start and the gate's reference); None: the version the service runs.
    current_model: str | None = None
    #: The service's state folder (registered items, versions record) when no running service names its own.
    serve_state_dir: str = "runs/default/serve"
    output: str = "runs/default/retrain"  # a new folder per run is made under it
    gate: GateConfig = Field(default_factory=GateConfig)
    #: Swap a promoted version into the service (a no-op when none runs).
    hot_swap: bool = True
    serving: ServingConfig = Field(default_factory=ServingConfig)


@dataclass
class RetrainResult:
    promoted: bool
    swapped: bool
    reason: str
    new_model: str
    current_model: str
    gate: GateDecision
    test_metrics: dict  # by model, on the new data's test split
    registered_version: str | None = None  # the promoted version's number in the MLflow model registry (train.tracking)


class _Service:
    """The version in service and how to promote into it, wherever it runs."""

    def __init__(self, config: RetrainConfig):
        self.kind = config.serving.kind
        self.rayservice = None
        self.application = None
        self.state_dir = config.serve_state_dir
        self.live_model: str | None = None
        if self.kind == "kubernetes":
            from cluster.kubernetes import RayServiceTarget

            self.rayservice = RayServiceTarget(config.serving.rayservice, config.serving.namespace)
            self.live_model = self.rayservice.live_model()
            self.state_dir = self.rayservice.serve_args().get("state_dir", self.state_dir)
        else:
            from serve.runner import RunningApplication

            self.application = RunningApplication.find(config.serving.ray.address)
            if self.application is not None:
                self.live_model, self.state_dir = self.application.live_model, self.application.config.state_dir
                self.application.flush_feedback()  # what it logged so far, the write-ahead part included

    @property
    def running(self) -> bool:
        return self.rayservice is not None or self.application is not None

    def history(self) -> VersionHistory:
        return VersionHistory(self.state_dir)

    def promote(self, model: str, gate: dict[str, Any]) -> None:
        """Load ``model`` in full, then swap it in; the service keeps its version if either fails."""
        from serve.runner import check_model, swap_model

        if self.rayservice is not None:
            check_model(model)
            self.rayservice.promote(model)
            self.history().record_live(model, gate)
        else:
            swap_model(model, gate=gate)


def run_retrain(config: RetrainConfig) -> RetrainResult:
    from train.evaluate import evaluate_on
    from train.trainer import run_training

    service = _Service(config)
    current = config.current_model or service.live_model
    if current is None:
        raise InputError("retrain: no service runs and current_model is not set: name the artifact in service with --model")
    run_dir = Path(config.output) / time.strftime("%Y%m%d-%H%M%S")
    train = config.train.model_copy(deep=True)
    train.data, train.output, train.warm_start_from = str(run_dir / "data"), str(run_dir / "model"), current
    _check_same_model(current, train)

    preprocess = config.preprocess.model_copy(deep=True)
    registry = Path(service.state_dir) / REGISTRY_FILE
    feedback = SourceConfig(format="feedback", path=config.feedback_log, items_path=str(registry) if registry.is_file() else None)
    preprocess.extra_sources = [*preprocess.extra_sources, feedback]
    preprocess.output = train.data
    manifest = run_preprocess(preprocess)
    print(f"[polyrec retrain] data: {manifest.num_interactions:,} interactions incl. feedback from {config.feedback_log}")

    if train.tracking.uri is None and "://" not in config.output:
        # The store of the run folder that holds the retrain output (runs/default/mlruns), where the first training went.
        train.tracking.uri = str(Path(config.output).resolve().parent / "mlruns")
    result = run_training(train)

    decision = decide(
        evaluate_on(current, preprocess.output, split="validation"), evaluate_on(result.artifact, preprocess.output, split="validation"), config.gate
    )
    swapped, reason = False, decision.reason
    if not decision.promoted:
        service.history().record_rejected(result.artifact, asdict(decision))
    elif not config.hot_swap:
        reason += "; hot_swap is off, so it is not put in service"
    elif service.running:
        service.promote(result.artifact, asdict(decision))
        swapped = True
    else:
        service.history().record_live(result.artifact, asdict(decision))
        reason += "; no service runs: `polyrec serve` serves it next"
    print(f"[polyrec retrain] {reason}")
    registered = None
    if result.tracking is not None:
        registered = record_gate(result.tracking.uri, result.tracking.run_id, train.tracking.registered_model, asdict(decision), result.artifact)
    if registered is not None:
        print(f"[polyrec retrain] registered as version {registered} of {train.tracking.registered_model} in {result.tracking.uri}")
    outcome = RetrainResult(decision.promoted, swapped, reason, result.artifact, current, decision, result.test_metrics, registered)
    (run_dir / "retrain.json").write_text(json.dumps(asdict(outcome), indent=2))
    return outcome


def _check_same_model(current: str, train: TrainConfig) -> None:
    """Retraining continues the model in service, so ``train.model`` must be the one it was trained with. Another
    backbone or shape would carry little of it over (the warm start takes only what matches) and the gate would judge
    another recipe: refused before any work, naming what differs."""
    from train.artifact import artifact_model_config, read_metadata
    from train.trainer import absolute_start_points

    in_service = _settings(artifact_model_config(read_metadata(current)))
    configured = _settings(absolute_start_points(train).get("model", train.model))
    differences = [f"model.{name}: {value!r} in service, {configured[name]!r} here" for name, value in in_service.items() if value != configured[name]]
    if differences:
        raise InputError(
            f"{current}, the model in service, was trained with another train.model ({'; '.join(differences)}); "
            "retraining continues that model: give it the training config that trained it (--train-config FILE, or the train: section)"
        )


def _settings(section: BaseModel, prefix: str = "") -> dict[str, Any]:
    """A config section's settings by dotted name (``{"backbone.name_or_path": ...}``)."""
    flat: dict[str, Any] = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            flat.update(_settings(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
