"""The messages of a recommendation (plain data, no torch: the Ingress, store and re-ranker replicas
never import the model). The ingress hands the stages a ``Query`` and gets a ``Recommendation``
back (``serve.recommendation``); the others pass between the stages: between deployments in the
split graph, within the Recommender's replica in the colocated one.

Item indices: 0 is padding, 1..N the catalogue, N + 1 + j the j-th row of a request's
``extra_vectors`` (items registered at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Mode = Literal["personal", "interests", "popular"]


@dataclass
class Query:
    """A recommendation request as the stages see it: the API body and the model version to use."""

    model: str  # artifact path: the version every stage of this request uses
    user_id: str
    k: int
    history: list[str]  # item ids the client adds to the server-side history
    interests: str | None
    exclude: list[str]


@dataclass
class Recommendation:
    model_version: str
    mode: Mode  # how the candidates were found (anything but "personal" is a cold start)
    items: list[dict[str, Any]]  # each a serve.api.RecommendedItem as JSON
    ignored_history: list[str]  # history item ids the model does not know


@dataclass
class RetrievalRequest:
    model: str  # artifact path: the version every stage of this request uses
    user_id: str
    history: list[str]  # item ids, oldest first
    history_ratings: list[float]  # the user's raw rating of each, NaN where none
    interests: str | None
    num_candidates: int
    registry_version: int  # registered items up to here must be searchable
    exclude: list[str] = field(default_factory=list)  # seen or excluded: never among the candidates
    popular: list[tuple[str, int]] | None = None  # cold-start candidates (item id, count)


@dataclass
class Candidates:
    """The Retriever's answer for one request."""

    model: str
    model_version: str
    mode: Mode | None  # None: nothing known about the user; ask again with ``popular``
    user_idx: int
    history: list[int]  # catalogue indices of the usable history, oldest first
    ignored_history: list[str]  # history item ids this model does not know
    item_idx: np.ndarray  # [C] catalogue index, or N + 1 + j for row j of extra_vectors
    item_ids: list[str]
    titles: list[str]
    years: list[int | None]
    genres: list[list[str]]
    retrieval: np.ndarray  # [C] retrieval logit (popularity share in popular mode)
    extra_vectors: np.ndarray  # [E, d] item vectors of the registered items among the candidates
    #: The user model's pass, made once in retrieval and reused by ranking: per task its query [d],
    #: and each ``history`` position's attention share in the user state [len(history)].
    queries: dict[str, np.ndarray]
    contributions: np.ndarray


@dataclass
class Ranked:
    """The Ranker's answer: candidates with their scores, ready for re-ranking, and what the
    explanations of the items finally chosen need."""

    model_version: str
    mode: Mode
    item_ids: list[str]
    titles: list[str]
    years: list[int | None]
    genres: list[list[str]]
    score: np.ndarray  # [C] final ranking score
    p_like: np.ndarray | None  # [C]
    rating: np.ndarray | None  # [C] on the raw rating scale
    keys: np.ndarray  # [C, d] unit item vectors (for diversity and explanations)
    groups: list[list[int]]  # per candidate, its attribute (genre) indices
    history_ids: list[str]  # the history the user model read, oldest first
    history_titles: list[str]  # theirs
    history_keys: np.ndarray  # [H, d] their unit item vectors
    contributions: np.ndarray  # [H] each position's attention share in the user state
