"""The promotion gate's evidence base: a model artifact scored on another preprocessing output's split (its model
re-indexed to that output's vocabularies by id), and the gate's decision on figures measured on one split."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from cluster.gate import GateConfig, decide
from common.errors import InputError
from common.storage import read_table, resolve
from data import schema
from data.manifest import load_manifest
from data.pipeline import run_preprocess
from tests.tiny import tiny_config, tiny_preprocess_config
from train.artifact import BACKBONE_DIR, load_artifact, save_artifact
from train.evaluate import collate_eval_rows, evaluate, evaluate_artifact, evaluate_on
from train.tasks import VocabularyTable
from train.trainer import TrainingInputs, build_model, load_training_inputs, read_train_sequences
from train.transfer import reindex_artifact

NUM_USERS = 20
#: Both sort before every ml-100k id, so the new output moves every other item and user up by one index.
NEW_ITEM, NEW_USER = "0", "0"
NEW_ITEM_TITLE = "A Film Nobody Has Rated Before (2024)"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class TwoOutputs:
    old: str  # the artifact's training data: ratings centred per user
    new: str  # the old interactions plus a new user who rated a new item; ratings min-max scaled


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_local) -> TwoOutputs:
    old_config = tiny_preprocess_config(tmp_path_factory.mktemp("old"), num_users=NUM_USERS)
    old_config.features.rating_normalisation = "user_center"
    run_preprocess(old_config)

    new_folder = tmp_path_factory.mktemp("new")
    new_config = tiny_preprocess_config(new_folder, num_users=NUM_USERS)
    new_config.features.rating_normalisation = "minmax"
    ratings, items = pd.read_csv(new_folder / "ratings.csv"), pd.read_csv(new_folder / "items.csv")
    new_ratings = pd.DataFrame(
        {
            "user": [NEW_USER] * 5,
            "item": [NEW_ITEM, *items["item"][:4]],
            "rating": [5, 4, 2, 3, 5],
            "ts": [int(ratings["ts"].max()) + step for step in range(1, 6)],
        }
    )
    pd.concat([ratings, new_ratings]).to_csv(new_folder / "ratings.csv", index=False)
    new_item = pd.DataFrame({"item": [NEW_ITEM], "title": [NEW_ITEM_TITLE], "genres": ["Comedy|Drama"]})
    pd.concat([items, new_item]).to_csv(new_folder / "items.csv", index=False)
    run_preprocess(new_config)
    return TwoOutputs(old_config.output, new_config.output)


@pytest.fixture(scope="module")
def old_inputs(outputs) -> TrainingInputs:
    return load_training_inputs(outputs.old, read_train_sequences(resolve(outputs.old)))


@pytest.fixture(scope="module", params=["frozen", "full"])
def artifact(request, outputs, old_inputs, tmp_path_factory) -> Path:
    """An untrained model over the old output with every per-item and per-user row random (trained rows are not
    zero, and a row carried to the wrong index must show), and a history's ratings changing its answers."""
    folder = tmp_path_factory.mktemp(f"artifact-{request.param}")
    config = tiny_config(outputs.old, folder / "unused")
    config.model.backbone.mode = request.param
    torch.manual_seed(0)
    model = build_model(config, old_inputs)
    with torch.no_grad():
        for table in (module for module in model.modules() if isinstance(module, VocabularyTable)):
            table.weight.normal_(std=0.5)
        model.user_model.rating_direction.normal_(std=0.5)
        model.user_model.rated_embedding.normal_(std=0.5)
    # The data's tokenizer, saved beside the backbone so that the artifact can encode new items (as tests.serving_fixtures does).
    model.tokenizer = AutoTokenizer.from_pretrained(load_manifest(outputs.old).tokenizer.path)
    return save_artifact(
        model,
        folder / "artifact",
        items=old_inputs.items,
        users=read_table(resolve(outputs.old), schema.USER_VOCAB_PATH),
        model_version="v1",
        data_manifest_hash=old_inputs.data_hash,
        metrics={},
        rating=old_inputs.rating,
        training_data=outputs.old,
    )


def _index(data: str, vocabulary: str) -> dict[str, int]:
    """id → index in the output's ``vocabulary`` (item or user)."""
    table = read_table(resolve(data), schema.ITEM_VOCAB_PATH if vocabulary == "item" else schema.USER_VOCAB_PATH)
    return dict(zip(table[f"{vocabulary}_id"].to_pylist(), table[f"{vocabulary}_idx"].to_pylist()))


def _validation(data: str) -> pa.Table:
    return read_table(resolve(data), f"{schema.SEQUENCES_DIR}/validation").sort_by("user_idx")


def _offsets_by_user_id(data: str) -> dict[str, float]:
    users = read_table(resolve(data), schema.USER_VOCAB_PATH)
    return dict(zip(users["user_id"].to_pylist(), users["rating_offset"].to_pylist()))


@pytest.mark.slow
def test_the_new_output_renumbers_both_vocabularies(outputs):
    old_items, new_items = _index(outputs.old, "item"), _index(outputs.new, "item")
    old_users, new_users = _index(outputs.old, "user"), _index(outputs.new, "user")
    assert new_items[NEW_ITEM] == 1 and new_users[NEW_USER] == 1
    assert all(new_items[item] == index + 1 for item, index in old_items.items())
    assert all(new_users[user] == index + 1 for user, index in old_users.items())


@pytest.mark.slow
def test_reindexed_artifact_scores_shared_users_and_items_as_the_original_model(outputs, artifact):
    original = load_artifact(artifact).model
    reindexed = reindex_artifact(artifact, outputs.new)
    old_rows = _validation(outputs.old)
    old_users = {index: user for user, index in _index(outputs.old, "user").items()}
    new_users = _index(outputs.new, "user")
    # The same users' rows in the new output, in the same order: the same interactions, renumbered and normalised its way.
    new_rows = _validation(outputs.new)
    by_user = {user: row for user, row in zip(new_rows["user_idx"].to_pylist(), range(new_rows.num_rows))}
    new_rows = new_rows.take([by_user[new_users[old_users[index]]] for index in old_rows["user_idx"].to_pylist()])
    max_history = load_manifest(outputs.old).config["features"]["max_history"]
    old_batch, _, _ = collate_eval_rows(old_rows, max_history)
    new_batch, _, _ = collate_eval_rows(new_rows, max_history)
    assert torch.equal(new_batch["input_items"], torch.where(old_batch["input_items"] > 0, old_batch["input_items"] + 1, 0))
    assert not torch.allclose(new_batch["input_ratings"].nan_to_num(), old_batch["input_ratings"].nan_to_num())

    with torch.no_grad():
        old_scores, new_scores = original.full_sort_predict(old_batch), reindexed.full_sort_predict(new_batch)
        old_predictions, new_predictions = original.predict(old_batch), reindexed.predict(new_batch)
    old_items, new_items = _index(outputs.old, "item"), _index(outputs.new, "item")
    shared = sorted(old_items)
    columns_old = torch.tensor([old_items[item] for item in shared])
    columns_new = torch.tensor([new_items[item] for item in shared])
    torch.testing.assert_close(new_scores[:, columns_new], old_scores[:, columns_old], atol=1e-5, rtol=1e-5)
    for task in ("rating", "like"):
        torch.testing.assert_close(new_predictions[task], old_predictions[task], atol=1e-5, rtol=1e-5)

    # On the raw scale, the artifact's rating predictions are its normalised ones plus its own offset of each user
    # (user_center: shift 0, scale 1), clipped to its data's rating range [1, 5], whatever the new output's min-max scaling.
    offsets = _offsets_by_user_id(outputs.old)
    expected_raw = np.clip(old_predictions["rating"].double().numpy() + [offsets[old_users[i]] for i in old_rows["user_idx"].to_pylist()], 1.0, 5.0)
    raw = reindexed.ratings.denormalise(new_predictions["rating"].double().numpy(), new_rows["user_idx"].to_numpy())
    np.testing.assert_allclose(raw, expected_raw, atol=1e-5)


@pytest.mark.slow
def test_a_new_item_is_its_text_alone_and_a_new_user_has_no_rows(outputs, artifact):
    original = load_artifact(artifact).model
    reindexed = reindex_artifact(artifact, outputs.new).model
    new_item, new_user = _index(outputs.new, "item")[NEW_ITEM], _index(outputs.new, "user")[NEW_USER]

    # The artifact's own text encoding of the item's text, as serving encodes a registered item.
    items = read_table(resolve(outputs.new), schema.ITEMS_DIR)
    text = items.filter(pc.equal(items["item_id"], NEW_ITEM))["text"][0].as_py()
    assert NEW_ITEM_TITLE in text
    tokenizer = AutoTokenizer.from_pretrained(Path(artifact) / BACKBONE_DIR)
    tokens = tokenizer([text], max_length=original.item_encoder.input_ids.shape[1], truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_key = F.normalize(original.encode_item_text(tokens["input_ids"], tokens["attention_mask"]), dim=-1)[0]
        torch.testing.assert_close(reindexed.retrieval_keys()[new_item], expected_key, atol=1e-5, rtol=1e-5)

    for table in (reindexed.item_encoder.id_embedding, reindexed.tasks["rating"].item_bias, reindexed.tasks["like"].item_bias):
        assert not table.weight[new_item].any()
    for table in (reindexed.user_model.user_embedding, reindexed.tasks["rating"].user_bias):
        assert not table.weight[new_user].any()
        assert table.weight[new_user + 1].any()  # the artifact's first user, carried over (its rows are random)
    assert reindexed.tasks["retrieval"].trainable_targets[new_item].item() is False  # cold to the artifact


@pytest.mark.slow
def test_evaluate_on_the_artifacts_own_data_is_its_plain_evaluation(outputs, artifact):
    manifest = load_manifest(outputs.old)
    users = read_table(resolve(outputs.old), schema.USER_VOCAB_PATH)
    with torch.no_grad():
        expected = evaluate(
            load_artifact(artifact).model,
            _validation(outputs.old),
            ks=(10, 20),
            num_items=manifest.num_items,
            max_history=manifest.config["features"]["max_history"],
            batch_size=64,
            rating_denormalise=manifest.rating.denormaliser(users),
        )
    figures = evaluate_on(str(artifact), outputs.old, split="validation")
    assert figures.keys() == expected.keys()
    for metric, value in expected.items():
        assert figures[metric] == pytest.approx(value, rel=1e-6, abs=1e-9), metric


@pytest.mark.slow
def test_evaluate_on_new_data_compares_the_artifacts_raw_predictions_with_the_raw_ratings(outputs, artifact):
    figures = evaluate_on(str(artifact), outputs.new, split="validation")
    rows = _validation(outputs.new)
    assert figures["num_rows"] == rows.num_rows == NUM_USERS + 1

    # By hand: normalised predictions + the artifact's offset of each user (for the user it never saw, the mean of
    # its users' offsets), clipped to the rating range [1, 5], against the raw ratings.
    offsets = _offsets_by_user_id(outputs.old)
    user_ids = {index: user for user, index in _index(outputs.new, "user").items()}
    unknown = float(np.mean(list(offsets.values())))
    batch, _, _ = collate_eval_rows(rows, load_manifest(outputs.new).config["features"]["max_history"])
    with torch.no_grad():
        predicted = reindex_artifact(artifact, outputs.new).predict(batch)["rating"].double().numpy()
    unclipped = predicted + [offsets.get(user_ids[index], unknown) for index in rows["user_idx"].to_pylist()]
    assert ((unclipped < 1.0) | (unclipped > 5.0)).any()  # the artifact's random rows take some predictions off the scale
    raw = np.clip(unclipped, 1.0, 5.0)
    targets = rows["target_rating_raw"].to_numpy()
    assert figures["rating/rmse"] == pytest.approx(math.sqrt(np.mean((raw - targets) ** 2)), rel=1e-5)


@pytest.mark.slow
def test_polyrec_evaluate_scores_the_artifact_on_new_data_the_same_in_process_and_through_ray_data(outputs, artifact):
    in_process = evaluate_artifact(str(artifact), outputs.new, split="validation")["polyrec"]
    through_ray = evaluate_artifact(str(artifact), outputs.new, split="validation", use_ray_data=True)["polyrec"]
    assert in_process == pytest.approx(evaluate_on(str(artifact), outputs.new, split="validation"), rel=1e-6)
    assert through_ray == pytest.approx(in_process, rel=1e-6)


# --- The gate's decision on figures from one split, computed by hand ---------------------------

NUM_ITEMS = 5
RATINGS = [4.0, 2.0, 5.0, 1.0]
LIKES = [1, 0, 1, 0]


def _split() -> pa.Table:
    """Four users, each with no history and one target (item u); their ratings and likes."""
    return pa.Table.from_pylist(
        [
            {
                "user_idx": user,
                "history": [],
                "history_ratings": [],
                "seen_items": [],
                "target_item": user,
                "target_rating": rating,
                "target_rating_raw": rating,
                "target_like": like,
                "target_timestamp": 0,
                "is_cold_target": False,
            }
            for user, rating, like in zip(range(1, 5), RATINGS, LIKES)
        ],
        schema=schema.EVAL_SEQUENCE,
    )


class FixedScorer:
    """Puts user u's target at rank ``ranks[u - 1]`` and predicts the given ratings and like probabilities."""

    def __init__(self, ranks: list[int], ratings: list[float], likes: list[float] | None = None):
        self.ranks, self.ratings, self.likes = ranks, ratings, likes

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = torch.full((len(batch["user_idx"]), NUM_ITEMS + 1), float("-inf"))
        for row, (user, target) in enumerate(zip(batch["user_idx"].tolist(), batch["target_items"].tolist())):
            order = [item for item in range(1, NUM_ITEMS + 1) if item != target]
            order.insert(self.ranks[user - 1] - 1, target)
            scores[row, order] = torch.arange(NUM_ITEMS, 0, -1, dtype=torch.float)
        return scores

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users = batch["user_idx"] - 1
        predictions = {"rating": torch.tensor(self.ratings)[users]}
        if self.likes is not None:
            predictions["like"] = torch.tensor(self.likes)[users]
        return predictions


def _figures(scorer: FixedScorer) -> dict[str, float]:
    return evaluate(scorer, _split(), ks=(10,), num_items=NUM_ITEMS, max_history=2, batch_size=8)


@pytest.fixture(scope="module")
def serving() -> dict[str, float]:
    return _figures(FixedScorer([1, 3, 1, 3], RATINGS, likes=[0.9, 0.1, 0.8, 0.2]))


#: Each figure worse than the serving version's by exactly the tolerances of ``AT_THE_EDGES``.
@pytest.fixture(scope="module")
def worse_by_the_tolerances() -> dict[str, float]:
    return _figures(FixedScorer([3, 3, 3, 3], [rating + 0.5 for rating in RATINGS], likes=[0.9, 0.8, 0.2, 0.1]))


AT_THE_EDGES = GateConfig(ndcg_tolerance=0.25, rmse_tolerance=0.5, like_auc_tolerance=0.25)


def test_figures_from_the_split_are_the_hand_computed_ones(serving, worse_by_the_tolerances):
    # NDCG@10 of a rank r is 1 / log2(r + 1): rank 1 gives 1, rank 3 gives 1/2.
    assert serving["NDCG@10"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert worse_by_the_tolerances["NDCG@10"] == pytest.approx(0.5)
    assert serving["rating/rmse"] == 0.0
    assert worse_by_the_tolerances["rating/rmse"] == pytest.approx(0.5)
    # AUC: every like above every dislike; then 3 of the 4 (like, dislike) pairs (0.2 < 0.8).
    assert serving["like/auc"] == 1.0
    assert worse_by_the_tolerances["like/auc"] == pytest.approx(0.75)


def test_exactly_at_every_tolerance_is_promoted(serving, worse_by_the_tolerances):
    decision = decide(serving, worse_by_the_tolerances, AT_THE_EDGES)
    assert decision.promoted
    assert [(check.metric, check.passed) for check in decision.checks] == [("NDCG@10", True), ("rating/rmse", True), ("like/auc", True)]
    assert decision.reason == (
        "promoted: NDCG@10 serving 0.7500, candidate 0.5000 (may drop 0.25): pass; "
        "rating/rmse serving 0.0000, candidate 0.5000 (may rise 0.5): pass; "
        "like/auc serving 1.0000, candidate 0.7500 (may drop 0.25): pass"
    )


@pytest.mark.parametrize("field, metric", [("ndcg_tolerance", "NDCG@10"), ("rmse_tolerance", "rating/rmse"), ("like_auc_tolerance", "like/auc")])
def test_beyond_one_tolerance_is_kept_back_by_that_check_alone(serving, worse_by_the_tolerances, field, metric):
    tighter = AT_THE_EDGES.model_copy(update={field: getattr(AT_THE_EDGES, field) - 0.01})
    decision = decide(serving, worse_by_the_tolerances, tighter)
    assert not decision.promoted
    assert [check.metric for check in decision.checks if not check.passed] == [metric]
    assert decision.reason.startswith("kept the serving version: ")
    assert f"{metric} serving {serving[metric]:.4f}, candidate {worse_by_the_tolerances[metric]:.4f}" in decision.reason


def test_a_failing_guardrail_blocks_promotion_even_when_ranking_improves(serving):
    candidate = _figures(FixedScorer([1, 1, 1, 1], [rating + 0.6 for rating in RATINGS], likes=[0.9, 0.1, 0.8, 0.2]))
    assert candidate["NDCG@10"] == 1.0 and candidate["rating/rmse"] == pytest.approx(0.6)
    decision = decide(serving, candidate, AT_THE_EDGES)
    assert not decision.promoted
    assert {check.metric: check.passed for check in decision.checks} == {"NDCG@10": True, "rating/rmse": False, "like/auc": True}


def test_a_guardrail_a_version_lacks_is_skipped_and_says_so(serving):
    without_likes = _figures(FixedScorer([1, 3, 1, 3], RATINGS))
    assert "like/auc" not in without_likes
    decision = decide(serving, without_likes, GateConfig())
    assert decision.promoted
    like = next(check for check in decision.checks if check.metric == "like/auc")
    assert like.skipped and like.passed and like.serving == 1.0 and like.candidate is None
    assert "like/auc skipped (the candidate version has none)" in decision.reason
    with pytest.raises(InputError, match="no NDCG@10"):
        decide({"rating/rmse": 1.0}, serving, GateConfig())


def test_default_tolerances_hold_at_their_edge_despite_floating_point():
    config = GateConfig()
    assert (config.ndcg_tolerance, config.rmse_tolerance, config.like_auc_tolerance) == (0.005, 0.02, 0.01)
    assert 0.1 - 0.095 > 0.005  # the difference is not exactly the tolerance in binary floating point
    assert decide({"NDCG@10": 0.1}, {"NDCG@10": 0.095}, config).promoted
    assert not decide({"NDCG@10": 0.1}, {"NDCG@10": 0.0949}, config).promoted
    assert decide({"NDCG@10": 0.1, "rating/rmse": 0.9}, {"NDCG@10": 0.1, "rating/rmse": 0.92}, config).promoted
    assert not decide({"NDCG@10": 0.1, "rating/rmse": 0.9}, {"NDCG@10": 0.1, "rating/rmse": 0.9201}, config).promoted


def test_the_decision_is_json(serving, worse_by_the_tolerances):
    decision = decide(serving, worse_by_the_tolerances, AT_THE_EDGES)
    record = json.loads(json.dumps(asdict(decision)))
    assert record["promoted"] is True and record["serving"]["NDCG@10"] == pytest.approx(0.75)
    assert record["checks"][1] == {"metric": "rating/rmse", "serving": 0.0, "candidate": pytest.approx(0.5), "tolerance": 0.5, "passed": True, "skipped": False}
