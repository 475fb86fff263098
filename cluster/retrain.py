"""Retraining from logged feedback (``polyrec retrain``).

The base data plus the feedback log go through the same preprocessing stage (the feedback log is one more
source, read by its reader, duplicate event ids removed); training warm-starts from the model in service;
the new version is promoted only when its validation NDCG@10 is not worse than the serving version's by more
than a tolerance, and then swapped into the running application in place.

The gate compares against the validation metric recorded in the serving artifact: each version is measured by
the same protocol on its own data (its vocabulary may differ from the new data's, so the old model cannot be
scored on the new split directly).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field

from data.config import PreprocessConfig, SourceConfig, StageConfig
from data.errors import InputError
from data.pipeline import run_preprocess
from train.config import TrainConfig

GATE_METRIC = "validation/NDCG@10"


class RetrainConfig(StageConfig):
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    feedback_log: str = "runs/default/feedback"
    #: The artifact in service (warm start and the gate's reference); None: the serving app's current version.
    current_model: str = "runs/default/model/artifact"
    output: str = "runs/default/retrain"  # a new folder per run is made under it
    tolerance: float = Field(0.005, ge=0)  # allowed drop of validation NDCG@10
    #: Swap the promoted version into the running application (a no-op when none is running).
    hot_swap: bool = True
    serve_state_dir: str = "runs/default/serve"


@dataclass
class RetrainResult:
    promoted: bool
    reason: str
    new_model: str
    current_model: str
    new_validation: float
    current_validation: float
    swapped: bool
    test_metrics: dict


def _recorded_validation(artifact: str) -> float:
    metadata_file = Path(artifact) / "artifact.json"
    if not metadata_file.is_file():
        raise InputError(f"{artifact}: not a model artifact (no artifact.json)")
    metrics = json.loads(metadata_file.read_text()).get("metrics", {}).get("validation", {})
    if GATE_METRIC not in metrics:
        raise InputError(f"{metadata_file}: no {GATE_METRIC} recorded; cannot gate against it")
    return float(metrics[GATE_METRIC])


def passes_gate(new_validation: float, current_validation: float, tolerance: float) -> bool:
    """Promote unless the new version is worse than the serving one by more than ``tolerance``."""
    return new_validation >= current_validation - tolerance


def run_retrain(config: RetrainConfig) -> RetrainResult:
    from train.trainer import run_training

    current_validation = _recorded_validation(config.current_model)
    run_dir = Path(config.output) / time.strftime("%Y%m%d-%H%M%S")

    preprocess = config.preprocess.model_copy(deep=True)
    preprocess.extra_sources = [*preprocess.extra_sources, SourceConfig(format="feedback", path=config.feedback_log)]
    preprocess.output = str(run_dir / "data")
    manifest = run_preprocess(preprocess)
    print(f"[polyrec retrain] data: {manifest.num_interactions:,} interactions incl. feedback from {config.feedback_log}")

    train = config.train.model_copy(deep=True)
    train.data, train.output, train.warm_start_from = preprocess.output, str(run_dir / "model"), config.current_model
    result = run_training(train)
    new_validation = float(result.best_validation[GATE_METRIC])

    promoted = passes_gate(new_validation, current_validation, config.tolerance)
    reason = (
        f"validation NDCG@10 {new_validation:.4f} vs serving {current_validation:.4f} "
        f"(tolerance {config.tolerance}): {'promoted' if promoted else 'kept the serving version'}"
    )
    swapped = False
    if promoted and config.hot_swap:
        swapped = _hot_swap(result.artifact, config.serve_state_dir)
        if not swapped:
            reason += "; no running application to swap (serve it with `polyrec serve --model`)"
    print(f"[polyrec retrain] {reason}")
    outcome = RetrainResult(
        promoted=promoted,
        reason=reason,
        new_model=result.artifact,
        current_model=config.current_model,
        new_validation=new_validation,
        current_validation=current_validation,
        swapped=swapped,
        test_metrics=result.test_metrics,
    )
    (run_dir / "retrain.json").write_text(json.dumps(asdict(outcome), indent=2))
    return outcome


def _hot_swap(artifact: str, state_dir: str) -> bool:
    import ray
    from ray import serve

    from serve.config import ServeConfig
    from serve.runner import APP_NAME, swap_model

    if not ray.is_initialized() or APP_NAME not in serve.status().applications:
        return False
    swap_model(ServeConfig(state_dir=state_dir), artifact)
    return True
