"""Re-ranking: business rules, then diversity, over the Ranker's scored candidates.

Rules drop the items the user has seen, the request's ``exclude`` and the configured blocked items.
Diversity is maximal marginal relevance (MMR: each pick maximises λ·relevance − (1−λ)·its largest
cosine similarity to the items already picked, relevance being the score min-max scaled to [0, 1])
or a per-genre cap (an item is passed over while any of its genres already has ``genre_cap`` items;
passed-over items fill the list only when there are not ``k`` others).

The explanation of each chosen item (``because``) is computed here, where the final items are known:
the history items with the largest attention contribution × similarity to the item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import numpy as np

from serve.config import ReRankConfig
from serve.messages import Ranked


def final_items_of_batch(
    batch: Sequence[Ranked], ks: Sequence[int], drops: Sequence[Collection[str]], config: ReRankConfig
) -> list[list[tuple[int, list[str]]]]:
    """The re-ranking stage (the ReRanker's, or the last of the colocated graph's) for a batch of requests: per
    request its final ``k`` candidates (positions in its ``Ranked``), best first, each with its ``because``."""
    chosen = rerank_batch(batch, ks, drops, config)
    return [list(zip(positions, explain(ranked, positions, config.because_size))) for ranked, positions in zip(batch, chosen)]


def rerank_batch(batch: Sequence[Ranked], ks: Sequence[int], drops: Sequence[Collection[str]], config: ReRankConfig) -> list[list[int]]:
    """Per request, the positions (into its candidate lists) of its final ``k`` items, best first."""
    orders = [allowed_by_score(ranked, drop, config.blocked_items) for ranked, drop in zip(batch, drops, strict=True)]
    if config.diversity == "mmr":
        picks = maximal_marginal_relevance([r.score[o] for r, o in zip(batch, orders)], [r.keys[o] for r, o in zip(batch, orders)], ks, config.mmr_lambda)
        return [order[pick].tolist() for order, pick in zip(orders, picks)]
    if config.diversity == "genre_cap":
        return [genre_capped(order.tolist(), ranked.groups, k, config.genre_cap) for ranked, order, k in zip(batch, orders, ks)]
    return [order[:k].tolist() for order, k in zip(orders, ks)]


def allowed_by_score(ranked: Ranked, drop: Collection[str], blocked_items: Collection[str]) -> np.ndarray:
    """Positions of the candidates that may be shown (not in ``drop`` or ``blocked_items``; an item listed twice
    counts at its first place), highest score first, ties in the candidates' order."""
    blocked = set(drop).union(blocked_items)
    ids = ranked.item_ids
    allowed = [i for i, item_id in enumerate(ids) if item_id not in blocked]
    if len(set(ids)) < len(ids):
        first: dict[str, int] = {}
        for i in allowed:
            first.setdefault(ids[i], i)
        allowed = list(first.values())
    return np.asarray(allowed, dtype=np.int64)[np.argsort(-ranked.score[allowed], kind="stable")]


def maximal_marginal_relevance(scores: Sequence[np.ndarray], keys: Sequence[np.ndarray], ks: Sequence[int], lam: float) -> list[np.ndarray]:
    """Greedy MMR for a batch, all requests in one pass of numpy per pick: per request its candidates' scores [C]
    and unit keys [C, d], best first; returns per request the indices of its (at most k) picks in pick order."""
    if not len(scores):
        return []
    counts = np.array([len(s) for s in scores])
    rows, width = np.arange(len(scores)), int(counts.max())
    real = np.arange(width)[None, :] < counts[:, None]
    padded_scores = np.zeros((len(scores), width), dtype=np.float32)
    padded_keys = np.zeros((len(scores), width, keys[0].shape[-1]), dtype=np.float32)
    for row, (score, key) in enumerate(zip(scores, keys)):
        padded_scores[row, : len(score)], padded_keys[row, : len(score)] = score, key
    low = np.where(real, padded_scores, np.inf).min(1, initial=np.inf, keepdims=True)
    spread = np.where(real, padded_scores, -np.inf).max(1, initial=-np.inf, keepdims=True) - low
    relevance = np.where(spread > 0, (padded_scores - low) / np.where(spread > 0, spread, 1), 1.0)
    largest_similarity = np.full((len(scores), width), -np.inf, dtype=np.float32)
    available = real.copy()
    steps = np.minimum(np.asarray(ks), counts)
    picks = np.zeros((len(scores), int(steps.max())), dtype=np.int64)
    for step in range(picks.shape[1]):
        redundancy = np.where(np.isfinite(largest_similarity), largest_similarity, 0.0)
        best = np.where(available, lam * relevance - (1 - lam) * redundancy, -np.inf).argmax(1)
        picks[:, step] = best
        available[rows, best] = False
        largest_similarity = np.maximum(largest_similarity, np.einsum("bcd,bd->bc", padded_keys, padded_keys[rows, best]))
    return [picks[row, : steps[row]] for row in rows]


def genre_capped(order: list[int], groups: list[list[int]], k: int, cap: int) -> list[int]:
    counts: Counter[int] = Counter()
    chosen, passed_over = [], []
    for i in order:
        if len(chosen) == k:
            break
        if any(counts[group] >= cap for group in groups[i]):
            passed_over.append(i)
            continue
        chosen.append(i)
        counts.update(groups[i])
    return chosen + passed_over[: k - len(chosen)]


def explain(ranked: Ranked, positions: list[int], size: int) -> list[list[str]]:
    """Per chosen candidate, the ``size`` history items that brought the largest part of the user
    state pointing at it: attention contribution × cosine similarity to the candidate, summed over
    an item's repeats, positive shares only (ties: the item read first)."""
    if not size or not ranked.history_ids:
        return [[] for _ in positions]
    column: dict[str, int] = {}
    which = [column.setdefault(item_id, len(column)) for item_id in ranked.history_ids]
    distinct = list(column)
    shares = ranked.contributions[None, :] * (ranked.keys[positions] @ ranked.history_keys.T)  # [k, H]
    per_item = shares @ np.eye(len(distinct), dtype=np.float32)[which]  # [k, distinct]
    order = np.argsort(-per_item, axis=1, kind="stable")[:, :size]
    return [[distinct[j] for j in row if per_item[i, j] > 0] for i, row in enumerate(order.tolist())]
