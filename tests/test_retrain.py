"""Retraining from the feedback log: the log written by the serving stage's writer is read back as a source,
training warm-starts from the serving model, and the promotion gate decides."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow import MlflowClient

from cluster.cli import main as polyrec
from cluster.gate import GateConfig, decide
from cluster.retrain import RetrainConfig, _check_same_model, run_retrain
from data import schema
from data.manifest import load_manifest
from serve.feedback_log import FeedbackLog
from serve.versions import VersionHistory
from tests.tiny import tiny_config
from train.artifact import load_artifact, read_metadata
from train.batching import left_pad
from train.evaluate import evaluate_on

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _top_items(model, history: list[int], user_idx: int, k: int = 10) -> set[int]:
    with torch.no_grad():
        scores = model.full_sort_predict({"input_items": left_pad([history], 20), "user_idx": torch.tensor([user_idx])})
    return set(scores[0].topk(k).indices.tolist())


def _vocab(data_dir: str, path: str, key: str, value: str) -> dict:
    table = pq.read_table(f"{data_dir}/{path}").to_pydict()
    return dict(zip(table[key], table[value]))


def test_retrain_reads_logged_clicks_warm_starts_and_gates(tmp_path, ray_local, trained_run, monkeypatch):
    data_dir, serving_artifact = trained_run.data, trained_run.artifact

    # The user clicks on ten catalogue items they had never interacted with, three times each; the clicks are
    # logged by the serving stage's own writer, and a client retry repeats five of them (same event ids).
    user_id = "7"
    test_rows = pq.read_table(f"{data_dir}/{schema.SEQUENCES_DIR}/test").to_pylist()
    user_idx = _vocab(data_dir, schema.USER_VOCAB_PATH, "user_id", "user_idx")[user_id]
    old_row = next(row for row in test_rows if row["user_idx"] == user_idx)
    item_ids = _vocab(data_dir, schema.ITEM_VOCAB_PATH, "item_idx", "item_id")
    seen = set(old_row["seen_items"]) | {old_row["target_item"]}
    clicked = [item_ids[idx] for idx in sorted(item_ids) if idx not in seen][:10]
    rows = [
        {
            "event_id": uuid.uuid4().hex,
            "ts": 1_900_000_000_000 + i * 1000,
            "user_id": user_id,
            "item_id": item,
            "event": "click",
            "value": None,
            "request_id": None,
            "model_version": "v1",
            "position": None,
        }
        for i, item in enumerate(clicked * 3)
    ]
    log = FeedbackLog(str(tmp_path / "feedback"), tmp_path / "wal", writer="test")
    log.append(rows)
    log.append(rows[:5])
    log.close()

    # The serving model is named relative to the working directory, which Ray Train's workers do not share.
    monkeypatch.chdir(Path(serving_artifact).parent.parent)
    served = Path(serving_artifact).relative_to(Path.cwd())
    config = RetrainConfig(
        feedback_log=str(tmp_path / "feedback"),
        current_model=str(served),
        output=str(tmp_path / "retrain"),
        serve_state_dir=str(tmp_path / "serve"),
        train=tiny_config(data_dir, tmp_path / "unused", epochs=2),
        hot_swap=False,
    )
    config.preprocess = config.preprocess.model_validate(load_manifest(data_dir).config)
    outcome = run_retrain(config)

    # Both versions were scored on the new data's validation split, and the decision follows from those figures.
    new_data = str(next((tmp_path / "retrain").iterdir()) / "data")
    assert outcome.gate.serving == evaluate_on(serving_artifact, new_data, split="validation")
    assert outcome.gate.candidate == evaluate_on(outcome.new_model, new_data, split="validation")
    assert outcome.promoted == decide(outcome.gate.serving, outcome.gate.candidate, GateConfig()).promoted
    assert not outcome.swapped and ("hot_swap is off" in outcome.reason) == outcome.promoted
    recorded = VersionHistory(tmp_path / "serve").records()
    assert [r.status for r in recorded] == ([] if outcome.promoted else ["rejected"])
    # The candidate's MLflow run (in the store of the run folder holding the retrain output) carries the decision;
    # a promoted candidate is also a version of the registered model, with the same decision.
    tracked = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run] = tracked.search_runs([tracked.get_experiment_by_name("polyrec").experiment_id])
    assert run.data.tags["gate.promoted"] == str(outcome.promoted).lower() and run.data.tags["gate.reason"] == outcome.gate.reason
    assert run.data.metrics["gate/candidate/NDCG_at_10"] == pytest.approx(outcome.gate.candidate["NDCG@10"])
    if outcome.promoted:
        version = tracked.get_model_version("polyrec", outcome.registered_version)
        assert version.source == str(Path(outcome.new_model).resolve()) and version.run_id == run.info.run_id
        assert version.tags == {"gate.promoted": "true", "gate.reason": outcome.gate.reason}
    else:
        assert outcome.registered_version is None and not tracked.search_registered_models()

    manifest, base_manifest = load_manifest(new_data), load_manifest(data_dir)
    # Every logged click is read once; the retried duplicates are quarantined by the reader, not kept.
    assert manifest.num_input_interactions == base_manifest.num_input_interactions + len(rows)
    reasons = pq.read_table(f"{new_data}/{schema.QUARANTINE_DIR}").column("reason").to_pylist()
    assert reasons.count("duplicate event_id") == 5

    # The clicks are now the user's latest interactions, and what the new model recommends for them changes.
    new_user_idx = _vocab(new_data, schema.USER_VOCAB_PATH, "user_id", "user_idx")[user_id]
    new_row = next(row for row in pq.read_table(f"{new_data}/{schema.SEQUENCES_DIR}/test").to_pylist() if row["user_idx"] == new_user_idx)
    new_item_ids = _vocab(new_data, schema.ITEM_VOCAB_PATH, "item_idx", "item_id")
    assert new_item_ids[new_row["target_item"]] == clicked[-1]
    old_model, new_model = load_artifact(serving_artifact).model, load_artifact(outcome.new_model).model
    before = {item_ids[i] for i in _top_items(old_model, old_row["history"], user_idx)}
    after = {new_item_ids[i] for i in _top_items(new_model, new_row["history"], new_user_idx)}
    assert before != after


def test_retrain_refuses_another_model_than_the_one_in_service_before_any_work(tmp_path, trained_run, capsys):
    # The model in service was trained by `polyrec train` on tests.tiny's config; the retrain gets one 48 wide instead of 32.
    wider = tiny_config(trained_run.data, tmp_path / "unused", epochs=1)
    wider.model.user_model.hidden_size = 48
    (tmp_path / "train.yaml").write_text(wider.to_yaml())
    command = ["retrain", "--model", trained_run.artifact, "--feedback-log", str(tmp_path / "feedback"), "--output", str(tmp_path / "retrain")]

    assert polyrec([*command, "--train-config", str(tmp_path / "train.yaml")]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    served_width = read_metadata(trained_run.artifact)["model_config"]["user_model"]["hidden_size"]
    assert f"(model.user_model.hidden_size: {served_width} in service, 48 here)" in message
    assert "--train-config" in message

    # Without a training config the retrain's own train: section, the defaults, applies: every setting tests.tiny changes differs.
    assert polyrec(command) == 2
    (message,) = capsys.readouterr().err.splitlines()
    named = set(re.findall(r"model\.([\w.]+): .*? in service, ", message))
    assert named == {"backbone.random_init_config", "user_model.hidden_size", "towers.expert_hidden"}
    assert not (tmp_path / "retrain").exists()  # refused before preprocessing

    # The config that trained it passes.
    _check_same_model(trained_run.artifact, tiny_config(trained_run.data, tmp_path / "unused", epochs=1))
