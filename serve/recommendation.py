"""One recommendation, stage by stage: user state → retrieval (→ popular items, retrieval again for a
user the model knows nothing about) → ranking → re-ranking; and the two ways its stages run.

``run_stages`` is the sequence, the same in both graphs (``ServeConfig.graph``, built by ``serve.app``),
in the replica that serves the HTTP API, over a batch of concurrent requests (``RequestBatching``): one user
lookup and one pass of each stage for the batch, which is what makes a busy replica cheaper per request.
Every stage is timed in ``polyrec_stage_latency_ms`` where it is awaited (``StageLatency``). Its stages
(``Stages``) are calls to the split graph's deployments (``HandleStages``: UserStateStore, Retriever, Ranker,
ReRanker, one call per batch) or, in the colocated graph, run in that replica (``ColocatedStages``) by the
code of those deployments: ``RetrievalStage``, ``RankingStage`` and ``serve.rerank.final_items_of_batch``. Every stage of one request uses
the model version the ingress chose when the request arrived, so a version swap never mixes two versions
in one answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from serve.batching import batched, set_batching
from serve.config import ServeConfig
from serve.errors import ServiceUnavailable
from serve.messages import Candidates, Query, Ranked, Recommendation, RetrievalRequest
from serve.rerank import final_items_of_batch
from serve.state import ItemExists, UserContext
from serve.user_cache import ContextCache

if TYPE_CHECKING:
    from serve.model_runtime import ServingModel

T = TypeVar("T")

logger = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]

#: A batch's final items: per request, (position in its ``Ranked``, its ``because``), best first.
Chosen = list[list[tuple[int, list[str]]]]


class Stages(Protocol):
    """The stages of a recommendation, each over a batch of requests, and the catalogue lookups of the
    model version at ``path``."""

    def contexts(self, user_ids: list[str]) -> Awaitable[list[UserContext]]: ...

    def popular(self, n: int) -> Awaitable[list[tuple[str, int]]]: ...

    def retrieve_batch(self, requests: list[RetrievalRequest]) -> Awaitable[list[Candidates]]: ...

    def rank_batch(self, batch: list[Candidates]) -> Awaitable[list[Ranked]]: ...

    def rerank_batch(self, batch: list[Ranked], ks: list[int], drops: list[list[str]]) -> Awaitable[Chosen]: ...

    def check_new_item(self, path: str, item_id: str, text: str) -> Awaitable[ItemExists | None]: ...

    def describe_item(self, path: str, item_id: str) -> Awaitable[dict | None]: ...

    def describe(self, path: str) -> Awaitable[dict]: ...


class RequestBatching:
    """An ingress replica's concurrent requests taken as one batch (``ServeConfig.request_batching``) through
    ``run_stages``: one user lookup, one retrieval, one ranking and one re-ranking for the batch. The user lookups
    go to the UserStateStore, through the replica's cache of the contexts it read (``serve.user_cache``)."""

    def __init__(self, config: ServeConfig, latency: StageLatency, store: DeploymentHandle):
        self.config = config
        self.latency = latency
        self.store = store
        cache = config.state.cache
        self.user_contexts = ContextCache(cache, store.watch.remote, store.contexts.remote, store.leave.remote) if cache.enabled else None
        self.context_lookups = Counter(
            "polyrec_user_contexts", "User contexts of recommendations, by where they came from (cache, store)", tag_keys=("source",)
        )
        set_batching(self.recommend, config.request_batching)

    @batched
    async def recommend(self, queries: list[Query]) -> list[Recommendation]:
        return await run_stages(queries, self, self.config, self.latency)  # a subclass gives the stages

    async def contexts(self, user_ids: list[str]) -> list[UserContext]:
        if self.user_contexts is None:
            found = (await self.store.contexts.remote(user_ids)).contexts
            cached = 0
        else:
            hits = self.user_contexts.hits
            found = await self.user_contexts.contexts(user_ids)
            cached = self.user_contexts.hits - hits
        if cached:
            self.context_lookups.inc(cached, tags={"source": "cache"})
        if len(user_ids) > cached:
            self.context_lookups.inc(len(user_ids) - cached, tags={"source": "store"})
        return found

    async def popular(self, n: int) -> list[tuple[str, int]]:
        return await self.store.popular.remote(n)

    async def close(self) -> None:
        """Shutting down: the store no longer waits for this replica to drop changed contexts."""
        if self.user_contexts is not None:
            await self.user_contexts.close()


class HandleStages(RequestBatching):
    """The split graph's stages: for a batch of requests, a call to the deployment of each; and the Retriever's lookups."""

    def __init__(
        self,
        config: ServeConfig,
        latency: StageLatency,
        store: DeploymentHandle,
        retriever: DeploymentHandle,
        ranker: DeploymentHandle,
        reranker: DeploymentHandle,
    ):
        super().__init__(config, latency, store)
        self.retriever, self.ranker, self.reranker = retriever, ranker, reranker

    def retrieve_batch(self, requests: list[RetrievalRequest]) -> Awaitable[list[Candidates]]:
        return self.retriever.retrieve_batch.remote(requests)

    def rank_batch(self, batch: list[Candidates]) -> Awaitable[list[Ranked]]:
        return self.ranker.rank_batch.remote(batch)

    def rerank_batch(self, batch: list[Ranked], ks: list[int], drops: list[list[str]]) -> Awaitable[Chosen]:
        return self.reranker.rerank_batch.remote(batch, ks, drops)

    def check_new_item(self, path: str, item_id: str, text: str) -> Awaitable[ItemExists | None]:
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
            async with asyncio.timeout(self.timeout_s):  # in the caller's task: wait_for would start a task per stage
                return await call
        except TimeoutError:
            if hasattr(call, "cancel"):  # a DeploymentResponse: the other replica may stop working on it
                call.cancel()
            raise ServiceUnavailable(f"{stage} did not answer within {self.timeout_s:g}s; try again later") from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
            # The replica died with the call (Serve is starting another): nothing was done, a retry will be.
            raise ServiceUnavailable(f"{stage} is restarting; try again later") from None
        finally:
            self.histogram.observe((time.perf_counter() - started) * 1000, tags={"stage": stage})


async def run_stages(queries: list[Query], stages: Stages, config: ServeConfig, latency: StageLatency) -> list[Recommendation]:
    """The recommendation for each of ``queries``, each stage timed (once for the batch) as ``latency``'s stage of its name."""
    timed = latency.timed
    contexts = await timed("state", stages.contexts([query.user_id for query in queries]))
    drops = [list(dict.fromkeys([*context.seen, *query.history, *query.exclude])) for query, context in zip(queries, contexts)]
    requests = [
        RetrievalRequest(
            model=query.model,
            user_id=query.user_id,
            history=context.history + query.history,
            history_ratings=context.history_ratings + [math.nan] * len(query.history),  # a request's own history has no ratings
            interests=query.interests,
            num_candidates=config.retrieval.num_candidates + query.k,
            registry_version=context.registry_version,
            exclude=drop,
        )
        for query, context, drop in zip(queries, contexts, drops)
    ]
    candidates = await timed("retrieve", stages.retrieve_batch(requests))
    unknown = [i for i, found in enumerate(candidates) if found.mode is None]
    if unknown:  # users the model knows nothing about: popular items instead
        popular = await timed("popular", stages.popular(config.state.popular_items))
        for i in unknown:
            requests[i].popular = popular
        for i, found in zip(unknown, await timed("retrieve", stages.retrieve_batch([requests[i] for i in unknown]))):
            candidates[i] = found
    ranked = await timed("rank", stages.rank_batch(candidates))
    chosen = await timed("rerank", stages.rerank_batch(ranked, [query.k for query in queries], drops))
    return [_recommendation(one_ranked, one_chosen, found.ignored_history) for one_ranked, one_chosen, found in zip(ranked, chosen, candidates)]


def _recommendation(ranked: Ranked, chosen: list[tuple[int, list[str]]], ignored_history: list[str]) -> Recommendation:
    history_titles = dict(zip(ranked.history_ids, ranked.history_titles))
    # Plain dicts of the response's shape (``serve.api.RecommendedItem``) from the model's own fields, which need no
    # validation: a pydantic object per item and per explanation cost more than the rest of the answer.
    items = [
        {
            "item_id": ranked.item_ids[i],
            "title": ranked.titles[i],
            "year": ranked.years[i],
            "genres": ranked.genres[i],
            "score": float(ranked.score[i]),
            "p_like": float(ranked.p_like[i]) if ranked.p_like is not None else None,
            "rating": float(ranked.rating[i]) if ranked.rating is not None else None,
            "because": [{"item_id": item_id, "title": history_titles[item_id]} for item_id in because],
        }
        for i, because in chosen
    ]
    return Recommendation(model_version=ranked.model_version, mode=ranked.mode, items=items, ignored_history=ignored_history)


# --- the stages in the replica: the Retriever's and Ranker's code, and the colocated graph's ---------


class _ModelHolder:
    """The model versions of a replica. ``user_config = {"models": [paths]}`` loads those versions
    (before the Ingress switches to one of them) and drops the others; a version a request names
    but the replica lacks is loaded on demand."""

    def __init__(self, config: ServeConfig):
        # Imported here: only the model stages need torch, so the other replicas start faster.
        from serve.model_runtime import ModelCache, limit_threads

        limit_threads(config.torch_threads)
        self.config = config
        self.models = ModelCache(config.max_loaded_models, config.model_root, config.retrieval.index)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await asyncio.to_thread(self.models.keep_only, list(user_config["models"]))

    async def _loaded(self, path: str) -> ServingModel:
        return self.models.loaded(path) or await asyncio.to_thread(self.models.get, path)


def _grouped(requests: Sequence[Any], run: Callable[[str, list[Any]], list[T]]) -> list[T]:
    """``run(model path, requests of that path)`` per version in the batch, answers in request order."""
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        by_model[request.model].append(i)
    answers: list[Any] = [None] * len(requests)
    for path, rows in by_model.items():
        for i, answer in zip(rows, run(path, [requests[i] for i in rows])):
            answers[i] = answer
    return answers


class RetrievalStage(_ModelHolder):
    """Retrieval, and the item and model lookups, over the replica's model versions with the items
    registered in the UserStateStore (the Retriever's code; the first of the ColocatedStages)."""

    def __init__(self, config: ServeConfig, store: DeploymentHandle):
        super().__init__(config)
        self.store = store

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await super().reconfigure(user_config)
        # Before the Ingress switches to a version: its first requests would otherwise wait for every item registered
        # so far to be encoded, which with thousands of them takes longer than a request's deadline.
        for path in user_config["models"]:
            try:
                await self._synced(path, store_timeout_s=self.config.admission.call_timeout_s)
            except (TimeoutError, RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
                # A swap does not wait for a restarting store: the version's first requests add them, as before.
                logger.warning("the UserStateStore did not answer: %s takes the registered items on its first requests", path)

    async def _synced(self, path: str, registry_version: int | None = None, *, store_timeout_s: float | None = None) -> ServingModel:
        """The model with every registered item up to ``registry_version`` (None: the latest). Encoding takes seconds
        for many items: in a thread, while the replica serves; the index changes on the event loop, where it is read."""
        model = await self._loaded(path)
        if registry_version is None or model.registry_version < registry_version:
            async with asyncio.timeout(store_timeout_s):
                items = await self.store.registered_since.remote(model.registry_version)
            model.add_registered(items, await asyncio.to_thread(model.encode_registered, items))
        return model

    async def retrieve_batch(self, requests: list[RetrievalRequest]) -> list[Candidates]:
        for path in {request.model for request in requests}:
            await self._synced(path, max(r.registry_version for r in requests if r.model == path))
        retrieval = self.config.retrieval
        return _grouped(requests, lambda path, group: self.models.get(path).retrieve(group, self.config.state.history_length, retrieval.interests_weight))

    async def check_new_item(self, path: str, item_id: str, text: str) -> ItemExists | None:
        """ItemExists, returned, if the catalogue has ``item_id`` (a replica logs what it raises as a failed request, and
        a taken id is an answer: 409); the text must encode."""
        model = await self._synced(path)
        if item_id in model.item_index:
            return ItemExists(f"item_id: {item_id!r} is already in the catalogue")
        model.encode_texts([text])
        return None

    async def describe_item(self, path: str, item_id: str) -> dict | None:
        return (await self._synced(path)).describe_item(item_id)

    async def describe(self, path: str) -> dict:
        return (await self._synced(path)).describe()


class RankingStage(_ModelHolder):
    """Multi-task scores and the final score of each candidate (the Ranker's code; the second of the ColocatedStages)."""

    async def rank_batch(self, batch: list[Candidates]) -> list[Ranked]:
        for path in {candidates.model for candidates in batch}:
            await self._loaded(path)
        weights = self.config.ranking.weights
        return _grouped(batch, lambda path, group: self.models.get(path).rank(group, weights))


class ColocatedStages(RequestBatching, RetrievalStage, RankingStage):
    """The colocated graph's stages, in the ingress replica, by the code of the split graph's Retriever, Ranker
    and ReRanker: a batch's user contexts from the replica's cache or in one call to the UserStateStore, which stays
    the one copy of the user state, one pass of the model for its retrieval and one for its ranking, then re-ranking
    in line."""

    def __init__(self, config: ServeConfig, latency: StageLatency, store: DeploymentHandle):
        RetrievalStage.__init__(self, config, store)
        RequestBatching.__init__(self, config, latency, store)

    async def rerank_batch(self, batch: list[Ranked], ks: list[int], drops: list[list[str]]) -> Chosen:
        return final_items_of_batch(batch, ks, drops, self.config.rerank)
