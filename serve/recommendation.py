"""One recommendation, stage by stage: user state → retrieval (→ popular items, retrieval again for a
user the model knows nothing about) → ranking → re-ranking.

The same function runs in both graphs (``ServeConfig.graph``), in the replica that serves the HTTP
API. In the split graph its stages are calls to the Retriever, Ranker and ReRanker deployments
(``HandleStages``); in the colocated graph they run in that replica (``serve.deployments.
ColocatedStages``), by the same code, batched across concurrent requests. Every stage is timed in
``polyrec_stage_latency_ms`` where it is awaited.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Histogram

from serve.api import RecommendedItem
from serve.config import ServeConfig
from serve.errors import ServiceUnavailable
from serve.messages import Candidates, Query, Ranked, Recommendation, RetrievalRequest
from serve.state import UserContext

T = TypeVar("T")

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class Stages(Protocol):
    """The stages of a recommendation, for one request each, and the catalogue lookups of the
    model version at ``path``."""

    def context(self, user_id: str) -> Awaitable[UserContext]: ...

    def popular(self, n: int) -> Awaitable[list[tuple[str, int]]]: ...

    def retrieve(self, request: RetrievalRequest) -> Awaitable[Candidates]: ...

    def rank(self, candidates: Candidates) -> Awaitable[Ranked]: ...

    def rerank(self, ranked: Ranked, k: int, drop: list[str]) -> Awaitable[list[tuple[int, list[str]]]]: ...

    def check_new_item(self, path: str, item_id: str, text: str) -> Awaitable[None]: ...

    def describe_item(self, path: str, item_id: str) -> Awaitable[dict | None]: ...

    def describe(self, path: str) -> Awaitable[dict]: ...


@dataclass
class HandleStages:
    """The split graph's stages: a call to the deployment of each (the Retriever's for lookups)."""

    store: DeploymentHandle
    retriever: DeploymentHandle
    ranker: DeploymentHandle
    reranker: DeploymentHandle

    def context(self, user_id: str) -> Awaitable[UserContext]:
        return self.store.context.remote(user_id)

    def popular(self, n: int) -> Awaitable[list[tuple[str, int]]]:
        return self.store.popular.remote(n)

    def retrieve(self, request: RetrievalRequest) -> Awaitable[Candidates]:
        return self.retriever.retrieve.remote(request)

    def rank(self, candidates: Candidates) -> Awaitable[Ranked]:
        return self.ranker.rank.remote(candidates)

    def rerank(self, ranked: Ranked, k: int, drop: list[str]) -> Awaitable[list[tuple[int, list[str]]]]:
        return self.reranker.rerank.remote(ranked, k, drop)

    def check_new_item(self, path: str, item_id: str, text: str) -> Awaitable[None]:
        return self.retriever.check_new_item.remote(path, item_id, text)

    def describe_item(self, path: str, item_id: str) -> Awaitable[dict | None]:
        return self.retriever.describe_item.remote(path, item_id)

    def describe(self, path: str) -> Awaitable[dict]:
        return self.retriever.describe.remote(path)


class StageLatency:
    """Each stage's wait, bounded by ``timeout_s`` (beyond it the request is answered 503 rather than left
    to hang on a busy or dead replica) and recorded in ``polyrec_stage_latency_ms{stage}``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.histogram = Histogram("polyrec_stage_latency_ms", "Latency of each stage of a request", LATENCY_BOUNDARIES_MS, tag_keys=("stage",))

    async def timed(self, stage: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except TimeoutError:
            if hasattr(call, "cancel"):  # a DeploymentResponse: the other replica may stop working on it
                call.cancel()
            raise ServiceUnavailable(f"{stage} did not answer within {self.timeout_s:g}s; try again later") from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
            # The replica died with the call (Serve is starting another): nothing was done, a retry will be.
            raise ServiceUnavailable(f"{stage} is restarting; try again later") from None
        finally:
            self.histogram.observe((time.perf_counter() - started) * 1000, tags={"stage": stage})


async def run_stages(query: Query, stages: Stages, config: ServeConfig, latency: StageLatency) -> Recommendation:
    """The recommendation for ``query``, each stage timed as ``latency``'s stage of its name."""
    timed = latency.timed
    context = await timed("state", stages.context(query.user_id))
    drop = sorted(set(context.seen) | set(query.history) | set(query.exclude))
    request = RetrievalRequest(
        model=query.model,
        user_id=query.user_id,
        history=context.history + query.history,
        history_ratings=context.history_ratings + [math.nan] * len(query.history),  # a request's own history has no ratings
        interests=query.interests,
        num_candidates=config.retrieval.num_candidates + query.k,
        registry_version=context.registry_version,
        exclude=drop,
    )
    candidates = await timed("retrieve", stages.retrieve(request))
    if candidates.mode is None:
        request.popular = await timed("popular", stages.popular(config.state.popular_items))
        candidates = await timed("retrieve", stages.retrieve(request))
    ranked = await timed("rank", stages.rank(candidates))
    chosen = await timed("rerank", stages.rerank(ranked, query.k, drop))
    items = [
        RecommendedItem(
            item_id=ranked.item_ids[i],
            title=ranked.titles[i],
            score=float(ranked.score[i]),
            p_like=float(ranked.p_like[i]) if ranked.p_like is not None else None,
            rating=float(ranked.rating[i]) if ranked.rating is not None else None,
            because=because,
        )
        for i, because in chosen
    ]
    return Recommendation(model_version=ranked.model_version, mode=ranked.mode, items=items, ignored_history=candidates.ignored_history)
