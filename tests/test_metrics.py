"""Evaluation metrics and the evaluator, checked against rankings and numbers worked out by hand."""

from __future__ import annotations

import functools
import itertools
import json
import math

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from common.console import BARS_ENV
from common.errors import InputError
from data.schema import EVAL_SEQUENCE, TRAIN_SEQUENCE
from train.batching import left_pad
from train.evaluate import ActorPool, PopularityScorer, eval_batches, evaluate, write_report
from train.metrics import (
    binary_classification_metrics,
    coverage_at_k,
    hit_rate_at_k,
    mae,
    mrr_at_k,
    ndcg_at_k,
    rank_of_targets,
    ranks_and_top_k,
    rmse,
    top_k_items,
)


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# --- A 6-item catalogue, worked by hand -------------------------------------------------------
#
# Columns are [padding, item 1, ..., item 6].
#   row 0: target 3 (0.5); seen 2 (0.9) and 4 (0.7) are masked; item 5 ties the target at 0.5,
#          so the pessimistic rank is 2. The padding column's 9.0 is masked too.
#   row 1: target 2 (0.8) was seen by row 0 but not by row 1, so it stays; row 1's seen item 6
#          (0.9) is masked, so the target ranks 1 (it would rank 2 unmasked).
#   row 2: every score equal; the target 5 is in its own seen items and still competes; seen
#          item 1 is masked; items 2, 3, 4, 6 tie the target: rank 5.
#   row 3: nothing seen; the target 6 has the lowest score: rank 6, still within K = 10 > 6 items.
SCORES = torch.tensor(
    [
        [9.0, 0.1, 0.9, 0.5, 0.7, 0.5, 0.2],
        [0.0, 0.3, 0.8, 0.6, 0.1, 0.4, 0.9],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    ]
)
TARGETS = torch.tensor([3, 2, 5, 6])
SEEN = [[2, 4], [6], [5, 1], []]
RANKS = [2, 1, 5, 6]


def test_ranks_mask_seen_items_and_are_pessimistic_on_ties():
    assert rank_of_targets(SCORES, TARGETS, SEEN).tolist() == RANKS


def test_nan_target_score_ranks_last():
    scores = torch.tensor([[0.0, 0.2, float("nan"), 0.1]])
    assert rank_of_targets(scores, torch.tensor([2]), [[]]).tolist() == [3]


def test_target_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        rank_of_targets(SCORES, torch.tensor([3, 2, 5, 7]), SEEN)


def test_hit_rate_ndcg_mrr_from_the_hand_ranks():
    assert hit_rate_at_k(RANKS, 1) == 0.25
    assert hit_rate_at_k(RANKS, 2) == 0.5
    assert hit_rate_at_k(RANKS, 5) == 0.75
    assert hit_rate_at_k(RANKS, 10) == 1.0  # K larger than the catalogue
    assert ndcg_at_k(RANKS, 2) == pytest.approx((1 / math.log2(3) + 1) / 4)
    assert ndcg_at_k(RANKS, 10) == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(6) + 1 / math.log2(7)) / 4)
    # MRR@K counts nothing for ranks beyond K.
    assert mrr_at_k(RANKS, 2) == pytest.approx((1 / 2 + 1) / 4)
    assert mrr_at_k(RANKS, 5) == pytest.approx((1 / 2 + 1 + 1 / 5) / 4)
    assert mrr_at_k(RANKS, 10) == pytest.approx((1 / 2 + 1 + 1 / 5 + 1 / 6) / 4)


def test_top_k_lists_and_coverage():
    # Ties break towards the lower index (row 0: items 3 and 5 at 0.5); masked items never appear.
    top_2 = top_k_items(SCORES, TARGETS, SEEN, 2)
    assert [items.tolist() for items in top_2] == [[3, 5], [2, 3], [2, 3], [1, 2]]
    ranks, top_2_again = ranks_and_top_k(SCORES, TARGETS, SEEN, 2)  # the evaluator's call: both from one masking
    assert ranks.tolist() == RANKS and [items.tolist() for items in top_2_again] == [[3, 5], [2, 3], [2, 3], [1, 2]]
    assert coverage_at_k(top_2, num_items=6) == pytest.approx(4 / 6)
    # K above a row's candidate count: the whole candidate list, nothing masked.
    top_10 = top_k_items(SCORES, TARGETS, SEEN, 10)
    assert [items.tolist() for items in top_10] == [
        [3, 5, 6, 1],
        [2, 3, 5, 1, 4],
        [2, 3, 4, 5, 6],
        [1, 2, 3, 4, 5, 6],
    ]
    assert coverage_at_k(top_10, num_items=6) == 1.0


def _top_k_by_full_sort(scores: np.ndarray, candidates: np.ndarray, k: int) -> list[list[int]]:
    """The definition, one row at a time: candidates by descending score (NaN lowest), then by index."""
    lists = []
    for row_scores, row_candidates in zip(scores, candidates):
        items = [int(item) for item in np.flatnonzero(row_candidates)]
        items.sort(key=lambda item: (-(-math.inf if math.isnan(row_scores[item]) else row_scores[item]), item))
        lists.append(items[:k])
    return lists


@pytest.mark.parametrize("seed", range(5))
def test_top_k_agrees_with_a_full_sort_under_ties_nan_and_masks(seed):
    # Few distinct values, so the k-th best score is usually tied across the cut; NaN and -inf scores
    # and rows with fewer candidates than K check that a -inf candidate still beats a masked item.
    rng = np.random.default_rng(seed)
    num_rows, num_columns = 40, 30
    scores = rng.integers(0, 4, size=(num_rows, num_columns)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = np.nan
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    targets = rng.integers(1, num_columns, size=num_rows)
    seen = [rng.choice(np.arange(1, num_columns), size=rng.integers(0, num_columns - 1), replace=False).tolist() for _ in range(num_rows)]
    candidates = np.ones_like(scores, dtype=bool)
    candidates[:, 0] = False
    for row, items in enumerate(seen):
        candidates[row, items] = False
    candidates[np.arange(num_rows), targets] = True
    for k in (1, 3, 10, num_columns + 5):
        expected = _top_k_by_full_sort(scores, candidates, k)
        for given in (torch.from_numpy(scores), torch.from_numpy(scores).to(torch.bfloat16), scores.astype(np.float64), scores.T.copy().T):
            assert [items.tolist() for items in top_k_items(given, targets, seen, k)] == expected
    assert top_k_items(np.empty((0, num_columns)), np.empty(0, dtype=np.int64), [], 3) == []


def test_classification_metrics_by_hand():
    probabilities = [0.9, 0.2, 0.6, 0.4]
    labels = [1, 0, 0, 1]
    metrics = binary_classification_metrics(probabilities, labels)
    # Predicted [1, 0, 1, 0]: one TP, one FP, one FN, one TN.
    assert metrics["accuracy"] == metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.5
    assert metrics["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.4)) / 4)
    assert metrics["auc"] == pytest.approx(3 / 4)  # positives 0.9 and 0.4 beat 3 of the 4 negatives pairs
    assert "auc" not in binary_classification_metrics([0.3, 0.8], [1, 1])  # one class: undefined


def test_auc_equals_a_brute_force_pairwise_count():
    generator = np.random.default_rng(7)
    labels = generator.integers(0, 2, size=200)
    probabilities = np.round(generator.random(200) * 0.5 + labels * 0.3, 1)  # rounded: many ties
    positives, negatives = probabilities[labels == 1], probabilities[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    expected = wins / (len(positives) * len(negatives))
    assert binary_classification_metrics(probabilities, labels)["auc"] == pytest.approx(expected, abs=1e-12)


def test_regression_errors_by_hand():
    # Errors -1, 0, 3.
    assert mae([3.0, 4.0, 5.0], [4.0, 4.0, 2.0]) == pytest.approx(4 / 3)
    assert rmse([3.0, 4.0, 5.0], [4.0, 4.0, 2.0]) == pytest.approx(math.sqrt(10 / 3))


# --- Batches ----------------------------------------------------------------------------------


def _eval_table(rows: list[dict]) -> pa.Table:
    defaults = {"target_timestamp": 0, "target_rating_raw": None, "is_cold_target": False}
    return pa.Table.from_pylist([defaults | {"history_ratings": [float("nan")] * len(row["history"])} | row for row in rows], schema=EVAL_SEQUENCE)


def test_left_pad_keeps_the_most_recent_items():
    assert left_pad([[1, 2, 3], [4], []], 2).tolist() == [[2, 3], [0, 4], [0, 0]]


def test_eval_batches_collate_rows():
    table = _eval_table(
        [
            {"user_idx": 1, "history": [5, 6, 7], "seen_items": [5, 6, 7], "target_item": 2, "target_rating": 0.5, "target_like": 1, "is_cold_target": True},
            {"user_idx": 2, "history": [3], "seen_items": [3], "target_item": 4, "target_rating": None, "target_like": -1},
            {"user_idx": 3, "history": [1], "seen_items": [9, 1], "target_item": 1, "target_rating": float("nan"), "target_like": 0},
        ]
    )
    batches = list(eval_batches(table, max_history=2, batch_size=2))
    assert len(batches) == 2
    batch, seen, cold = batches[0]
    assert batch["input_items"].tolist() == [[6, 7], [0, 3]]
    assert batch["input_items"].dtype == torch.long
    assert batch["user_idx"].tolist() == [1, 2]
    assert batch["target_items"].tolist() == [2, 4]
    assert batch["target_ratings"][0].item() == 0.5 and math.isnan(batch["target_ratings"][1].item())
    assert batch["target_likes"].tolist() == [1, -1]
    assert seen == [[5, 6, 7], [3]]
    assert cold.tolist() == [True, False]
    assert batches[1][1] == [[9, 1]] and math.isnan(batches[1][0]["target_ratings"][0].item())


def test_missing_column_names_the_field():
    with pytest.raises(InputError, match="seen_items"):
        evaluate(PopularityScorer(_tiny_train(), 5), _tiny_eval().drop_columns(["seen_items"]), num_items=5, max_history=3, batch_size=2)


# --- Popularity baseline on a tiny table, worked by hand --------------------------------------
#
# Training counts: item 1: 3, item 2: 2, item 3: 1, item 4: 1, item 5: 0.
#   user 1 saw 1, 2, 3 -> candidates 4 (1), 5 (0): target 4 ranks 1.
#   user 2 saw 1, 2    -> candidates 3 (1), 4 (1), 5: target 3 ties item 4: rank 2.
#   user 3 saw 1, 4    -> candidates 2 (2), 3 (1), 5 (0): target 5 ranks 3 (a cold target).
# Ratings (normalised) 5, 3, 4 | 4, NaN | 2, 1: global mean 19/6; with one pseudo-observation of it,
# item 4's mean is (1 + 19/6) / 2 = 25/12 and item 5's (never rated) 19/6.
# Likes 1, 0, 1 | 1, ? | 0, 0: global rate 1/2; item 4: (0 + 1/2) / 2 = 1/4, item 3: (1 + 1/2) / 2 = 3/4.


def _tiny_train() -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"user_idx": 1, "items": [1, 2, 3], "ratings": [5, 3, 4], "likes": [1, 0, 1], "timestamps": [1, 2, 3]},
            {"user_idx": 2, "items": [1, 2], "ratings": [4, float("nan")], "likes": [1, -1], "timestamps": [1, 2]},
            {"user_idx": 3, "items": [1, 4], "ratings": [2, 1], "likes": [0, 0], "timestamps": [1, 2]},
        ],
        schema=TRAIN_SEQUENCE,
    )


def _tiny_eval() -> pa.Table:
    return _eval_table(
        [
            {
                "user_idx": 1,
                "history": [1, 2, 3],
                "seen_items": [1, 2, 3],
                "target_item": 4,
                "target_rating": 2.0,
                "target_rating_raw": 2 * 2.0 + 1,
                "target_like": 0,
            },
            {"user_idx": 2, "history": [1, 2], "seen_items": [1, 2], "target_item": 3, "target_rating": None, "target_like": 1},
            {
                "user_idx": 3,
                "history": [1, 4],
                "seen_items": [1, 4],
                "target_item": 5,
                "target_rating": 3.0,
                "target_rating_raw": 2 * 3.0 + 3,
                "target_like": -1,
                "is_cold_target": True,
            },
        ]
    )


def _double_plus_user(predictions: np.ndarray, user_idx: np.ndarray) -> np.ndarray:
    return 2 * predictions + user_idx


def test_popularity_baseline_by_hand():
    metrics = evaluate(PopularityScorer(_tiny_train(), 5), _tiny_eval(), ks=(1, 2), num_items=5, max_history=3, batch_size=2)
    assert metrics["num_rows"] == 3
    assert metrics["HR@1"] == pytest.approx(1 / 3)
    assert metrics["HR@2"] == pytest.approx(2 / 3)
    assert metrics["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert metrics["MRR@2"] == pytest.approx((1 + 1 / 2) / 3)
    assert metrics["coverage@10"] == pytest.approx(4 / 5)  # candidates {4, 5} ∪ {3, 4, 5} ∪ {2, 3, 5}
    assert metrics["cold/num_rows"] == 1
    assert metrics["cold/HR@2"] == 0.0
    # Ratings on rows 1 and 3: errors 25/12 - 2 = 1/12 and 19/6 - 3 = 1/6.
    assert metrics["rating/num_rows"] == 2
    assert metrics["rating/rmse"] == pytest.approx(math.sqrt((1 / 144 + 1 / 36) / 2))
    assert metrics["rating/mae"] == pytest.approx(1 / 8)
    # Likes on rows 1 and 2: probabilities 1/4 (label 0) and 3/4 (label 1).
    assert metrics["like/num_rows"] == 2
    assert metrics["like/auc"] == 1.0 and metrics["like/accuracy"] == 1.0
    assert metrics["like/log_loss"] == pytest.approx(-math.log(3 / 4))

    raw = evaluate(PopularityScorer(_tiny_train(), 5), _tiny_eval(), ks=(1, 2), num_items=5, max_history=3, batch_size=2, rating_denormalise=_double_plus_user)
    # Raw = 2 * normalised + user_idx on both sides: the raw-scale errors are twice the normalised ones.
    assert raw["rating/rmse"] == pytest.approx(2 * metrics["rating/rmse"])
    assert raw["rating/mae"] == pytest.approx(2 * metrics["rating/mae"])
    assert raw["HR@2"] == metrics["HR@2"]


def test_a_labelled_evaluation_shows_one_bar_over_its_batches_on_a_terminal(monkeypatch, capsys):
    """The test-split evaluation is a long step of ``polyrec train``: with bars wanted (a terminal) it draws one bar
    over its batches (3 rows in batches of 2: 2 batches); without, nothing; the metrics are the same either way."""
    options = dict(ks=(1, 2), num_items=5, max_history=3, batch_size=2)
    monkeypatch.setenv(BARS_ENV, "1")
    with_bar = evaluate(PopularityScorer(_tiny_train(), 5), _tiny_eval(), **options, progress_label="evaluate polyrec")
    drawn = capsys.readouterr().err
    assert "evaluate polyrec" in drawn and "2/2" in drawn
    monkeypatch.setenv(BARS_ENV, "0")
    without = evaluate(PopularityScorer(_tiny_train(), 5), _tiny_eval(), **options, progress_label="evaluate polyrec")
    assert capsys.readouterr().err == ""
    assert with_bar == without


# --- The Ray Data path ------------------------------------------------------------------------


def _random_tables(num_items: int, num_users: int, seed: int) -> tuple[pa.Table, pa.Table]:
    generator = np.random.default_rng(seed)
    train_rows, eval_rows = [], []
    for user in range(1, num_users + 1):
        items = generator.choice(np.arange(1, num_items + 1), size=int(generator.integers(3, 12))).tolist()
        ratings = np.round(generator.random(len(items)) * 2 - 1, 2)
        ratings[generator.random(len(items)) < 0.2] = np.nan
        train_rows.append(
            {
                "user_idx": user,
                "items": items[:-1],
                "ratings": ratings[:-1].tolist(),
                "likes": generator.integers(-1, 2, len(items) - 1).tolist(),
                "timestamps": list(range(len(items) - 1)),
            }
        )
        eval_rows.append(
            {
                "user_idx": user,
                "history": items[-6:-1],
                "history_ratings": ratings[-6:-1].tolist(),
                "seen_items": items[:-1],
                "target_item": items[-1],
                "target_rating": float(ratings[-1]),
                "target_rating_raw": float(2 * ratings[-1] + user),
                "target_like": int(generator.integers(-1, 2)),
                "is_cold_target": bool(user % 7 == 0),
            }
        )
    return pa.Table.from_pylist(train_rows, schema=TRAIN_SEQUENCE), _eval_table(eval_rows)


def test_ray_data_path_equals_the_in_process_path(ray_instance, tmp_path):
    num_items = 40
    train_table, eval_table = _random_tables(num_items, num_users=90, seed=3)
    for part in range(3):
        pq.write_table(eval_table.slice(part * 30, 30), tmp_path / f"part-{part}.parquet")
    options = {"ks": (5, 10), "num_items": num_items, "max_history": 5, "rating_denormalise": _double_plus_user}

    in_process = evaluate(PopularityScorer(train_table, num_items), eval_table, batch_size=16, **options)
    # Ray reads the three files into blocks of its own and returns the rows in another order than
    # pyarrow's; per-row values make the metrics independent of that and of the batch sizes.
    through_ray = evaluate(
        functools.partial(PopularityScorer, train_table, num_items),
        str(tmp_path),
        batch_size=7,
        actors=ActorPool(num_cpus=0.5),
        **options,
    )
    assert through_ray == in_process
    assert in_process["num_rows"] == 90 and in_process["cold/num_rows"] == 12
    assert {"like/auc", "rating/rmse", "coverage@10", "cold/NDCG@10"} <= in_process.keys()


# --- Report -----------------------------------------------------------------------------------


def test_report_files(tmp_path):
    metrics_by_model = {
        "polyrec": {"num_rows": 90, "HR@10": 0.31234, "NDCG@10": 0.15, "HR@20": 0.45, "NDCG@20": 0.19, "like/auc": 0.7},
        "popularity": {"num_rows": 90, "HR@10": 0.1, "NDCG@10": 0.05, "HR@20": 0.18, "NDCG@20": 0.07},
    }
    write_report(metrics_by_model, tmp_path / "report")

    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == metrics_by_model

    header, separator, *rows = (tmp_path / "report" / "metrics.md").read_text().splitlines()
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["model", "num_rows", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "like/auc"]
    assert set(separator) <= set("|-:")
    assert [cell.strip() for cell in rows[0].strip("|").split("|")] == ["polyrec", "90", "0.3123", "0.1500", "0.4500", "0.1900", "0.7000"]
    assert [cell.strip() for cell in rows[1].strip("|").split("|")] == ["popularity", "90", "0.1000", "0.0500", "0.1800", "0.0700", "–"]

    image = matplotlib.image.imread(tmp_path / "report" / "metrics.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
