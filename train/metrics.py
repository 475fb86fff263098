"""Evaluation metrics as pure functions: full-ranking metrics from target ranks, catalogue coverage,
binary-classification metrics for the like task and regression errors for the rating task.

Ranking protocol (leave-one-out, one held-out target per row):

* The candidates of a row are every catalogue item except the padding column and the items in the
  row's ``seen_items``; the target itself is always a candidate, even when the user saw it before.
* The rank of the target is pessimistic on ties: ``1 + #{candidates j != target : score_j >= score_target}``.
  A model that gives every item the same score therefore gets the worst rank, not the best.
  NaN scores count as ``-inf``.
* With one relevant item per row, HR@K equals Recall@K, and NDCG@K is ``1 / log2(rank + 1)`` when
  ``rank <= K`` (the ideal DCG is 1). K larger than the number of candidates is allowed: every
  target is then within the top K.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    mean_absolute_error,
    precision_recall_fscore_support,
    roc_auc_score,
    root_mean_squared_error,
)

from data.schema import PAD_INDEX

#: Probabilities at or above this are predicted positive for accuracy, precision, recall and F1.
DECISION_THRESHOLD = 0.5

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        # numpy has no bfloat16; widening half precision to float32 is exact.
        return (values.float() if values.dtype in (torch.bfloat16, torch.float16) else values).numpy()
    return np.asarray(values)


def candidate_mask(num_columns: int, targets: ArrayLike, mask_items: Sequence[Sequence[int]]) -> np.ndarray:
    """``[B, num_columns]`` booleans: True where an item competes in the row's ranking.

    False for the padding column and for every item of the row's ``mask_items``, except the row's
    target, which always competes.
    """
    targets = _as_numpy(targets).astype(np.int64)
    num_rows = len(targets)
    if len(mask_items) != num_rows:
        raise ValueError(f"mask_items has {len(mask_items)} rows, targets {num_rows}")
    if num_rows and (targets.min() <= PAD_INDEX or targets.max() >= num_columns):
        raise ValueError(f"target item out of range 1..{num_columns - 1}: {targets.min()}..{targets.max()}")
    candidates = np.ones((num_rows, num_columns), dtype=bool)
    candidates[:, PAD_INDEX] = False
    lengths = [len(items) for items in mask_items]
    if sum(lengths):
        masked = np.concatenate([np.asarray(items, dtype=np.int64) for items in mask_items])
        candidates[np.repeat(np.arange(num_rows), lengths), masked] = False
    candidates[np.arange(num_rows), targets] = True
    return candidates


def _nan_as_lowest(scores: ArrayLike) -> np.ndarray:
    scores = _as_numpy(scores)
    return np.where(np.isnan(scores), -np.inf, scores)


def rank_of_targets(scores: ArrayLike, targets: ArrayLike, mask_items: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based pessimistic rank of each row's target among its candidates (see the module docstring).

    ``scores`` is ``[B, N+1]`` with column 0 the padding; ``targets`` ``[B]`` item indices;
    ``mask_items`` the items each row has already seen (its ``seen_items``). Returns int64 ``[B]``.
    """
    return _target_ranks(*_masked(scores, targets, mask_items))


def top_k_items(scores: ArrayLike, targets: ArrayLike, mask_items: Sequence[Sequence[int]], k: int) -> list[np.ndarray]:
    """Each row's ``k`` best candidates, best first; fewer when the row has fewer candidates.

    Ties are broken towards the lower item index, so the lists are deterministic.
    """
    _check_k(k)
    scores, _, candidates = _masked(scores, targets, mask_items)
    return _top_k(scores, candidates, k)


def ranks_and_top_k(scores: ArrayLike, targets: ArrayLike, mask_items: Sequence[Sequence[int]], k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`rank_of_targets` and :func:`top_k_items` of one batch, its candidates worked out once."""
    _check_k(k)
    scores, targets, candidates = _masked(scores, targets, mask_items)
    return _target_ranks(scores, targets, candidates), _top_k(scores, candidates, k)


def _masked(scores: ArrayLike, targets: ArrayLike, mask_items: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scores with NaN as -inf, the targets as int64 and the ``candidate_mask``."""
    scores = _nan_as_lowest(scores)
    targets = _as_numpy(targets).astype(np.int64)
    return scores, targets, candidate_mask(scores.shape[1], targets, mask_items)


def _target_ranks(scores: np.ndarray, targets: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    target_scores = scores[np.arange(len(targets)), targets]
    # The target is a candidate scoring at least its own score, so this count is 1 + the others that tie or beat it.
    return ((scores >= target_scores[:, None]) & candidates).sum(axis=1)


def _top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> list[np.ndarray]:
    # A full sort of every row is the cost of evaluating a large catalogue, so take each row's k-th best
    # candidate score with a partial selection, keep every candidate above it and, of those tied with
    # it, the lowest indices; only those k items are then sorted. NaN already counts as -inf, so a
    # candidate scored -inf still beats a masked item: the tie-fill below only ever takes candidates.
    num_rows = len(candidates)
    if not num_rows:
        return []
    masked = np.where(candidates, scores, -np.inf)
    kth_best = torch.topk(torch.from_numpy(masked), min(k, masked.shape[1]), dim=1).values[:, -1].numpy()[:, None]
    above_rows, above_items = np.nonzero(candidates & (scores > kth_best))
    tied_rows, tied_items = np.nonzero(candidates & (scores == kth_best))
    tied_counts = np.bincount(tied_rows, minlength=num_rows)
    place_among_tied = np.arange(len(tied_rows)) - np.repeat(np.cumsum(tied_counts) - tied_counts, tied_counts)
    room = k - np.bincount(above_rows, minlength=num_rows)
    fill = place_among_tied < room[tied_rows]
    rows = np.concatenate([above_rows, tied_rows[fill]])
    items = np.concatenate([above_items, tied_items[fill]])
    # lexsort's last key is the primary one: by row, then by descending score, then by index.
    order = np.lexsort((items, -scores[rows, items], rows))
    return np.split(items[order], np.cumsum(np.bincount(rows, minlength=num_rows))[:-1])


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")


def _ranks(ranks: ArrayLike) -> np.ndarray:
    ranks = _as_numpy(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to average")
    return ranks


def hit_rate_at_k(ranks: ArrayLike, k: int) -> float:
    """Share of rows whose target ranks within the top ``k`` (equals Recall@K with one target)."""
    _check_k(k)
    return float(np.mean(_ranks(ranks) <= k))


def ndcg_at_k(ranks: ArrayLike, k: int) -> float:
    """Mean of ``1 / log2(rank + 1)`` over rows, counting 0 for a rank beyond ``k``."""
    _check_k(k)
    ranks = _ranks(ranks).astype(np.float64)
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def mrr_at_k(ranks: ArrayLike, k: int) -> float:
    """Mean reciprocal rank, counting 0 for a rank beyond ``k``."""
    _check_k(k)
    ranks = _ranks(ranks).astype(np.float64)
    return float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0)))


def coverage_at_k(topk_lists: Sequence[Sequence[int]], num_items: int) -> float:
    """Share of the catalogue's ``num_items`` items (padding excluded) recommended to some row."""
    lists = [np.asarray(items, dtype=np.int64) for items in topk_lists]
    recommended = np.unique(np.concatenate(lists)) if lists else np.empty(0, dtype=np.int64)
    return int(np.count_nonzero(recommended != PAD_INDEX)) / num_items


def binary_classification_metrics(probabilities: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """AUC, log loss, and accuracy / precision / recall / F1 at ``DECISION_THRESHOLD``.

    AUC is left out when the labels hold only one class (it is undefined then).
    """
    probabilities = _as_numpy(probabilities).astype(np.float64)
    labels = _as_numpy(labels).astype(np.int64)
    if labels.size == 0:
        raise ValueError("no labelled rows")
    predicted = (probabilities >= DECISION_THRESHOLD).astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="binary", pos_label=1, zero_division=0.0)
    metrics = {
        "log_loss": float(log_loss(labels, probabilities, labels=[0, 1])),
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    if len(np.unique(labels)) == 2:
        metrics = {"auc": float(roc_auc_score(labels, probabilities)), **metrics}
    return metrics


def rmse(predictions: ArrayLike, targets: ArrayLike) -> float:
    return float(root_mean_squared_error(_as_numpy(targets), _as_numpy(predictions)))


def mae(predictions: ArrayLike, targets: ArrayLike) -> float:
    return float(mean_absolute_error(_as_numpy(targets), _as_numpy(predictions)))
