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
    """The re-ranking stage (the ReRanker's, or the last of the colocated graph's) for a batch of requests."""
    return [final_items(ranked, k, drop, config) for ranked, k, drop in zip(batch, ks, drops, strict=True)]


def final_items(ranked: Ranked, k: int, drop: Collection[str], config: ReRankConfig) -> list[tuple[int, list[str]]]:
    """One request's final ``k`` candidates (positions in ``ranked``), best first, each with its ``because``."""
    positions = rerank(ranked, k, drop, config)
    return list(zip(positions, explain(ranked, positions, config.because_size)))


def rerank(ranked: Ranked, k: int, drop: Collection[str], config: ReRankConfig) -> list[int]:
    """Positions (into the candidate lists of ``ranked``) of the final ``k`` items, best first."""
    blocked = set(drop).union(config.blocked_items)
    allowed: list[int] = []
    for i, item_id in enumerate(ranked.item_ids):
        if item_id not in blocked:
            blocked.add(item_id)  # an item listed twice counts at its first place
            allowed.append(i)
    by_score = np.argsort(-ranked.score[allowed], kind="stable")  # ties keep the candidates' order
    order = np.asarray(allowed, dtype=np.int64)[by_score].tolist()
    if config.diversity == "mmr":
        return maximal_marginal_relevance(ranked.score[order], ranked.keys[order], k, config.mmr_lambda, order)
    if config.diversity == "genre_cap":
        return genre_capped(order, ranked.groups, k, config.genre_cap)
    return order[:k]


def maximal_marginal_relevance(scores: np.ndarray, keys: np.ndarray, k: int, lam: float, positions: list[int]) -> list[int]:
    """Greedy MMR over candidates given best first; returns their ``positions`` in pick order."""
    if not positions:
        return []
    spread = float(scores.max() - scores.min())
    relevance = (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    largest_similarity = np.full(len(positions), -np.inf, dtype=np.float32)
    available = np.ones(len(positions), dtype=bool)
    picked: list[int] = []
    for _ in range(min(k, len(positions))):
        redundancy = np.where(np.isfinite(largest_similarity), largest_similarity, 0.0)
        value = np.where(available, lam * relevance - (1 - lam) * redundancy, -np.inf)
        best = int(np.argmax(value))
        picked.append(best)
        available[best] = False
        largest_similarity = np.maximum(largest_similarity, keys @ keys[best])
    return [positions[i] for i in picked]


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
    an item's repeats, positive shares only."""
    if not size or not ranked.history_ids:
        return [[] for _ in positions]
    distinct, which = np.unique(np.array(ranked.history_ids, dtype=object), return_inverse=True)
    shares = ranked.contributions[None, :] * (ranked.keys[positions] @ ranked.history_keys.T)  # [k, H]
    per_item = shares @ np.eye(len(distinct), dtype=np.float32)[which]  # [k, distinct]
    order = np.argsort(-per_item, axis=1, kind="stable")[:, :size]
    return [[str(distinct[j]) for j in row if per_item[i, j] > 0] for i, row in enumerate(order)]
