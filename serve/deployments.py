"""The Ray Serve deployments of the recommendation graph; ``serve.app`` binds them into either layout
(``ServeConfig.graph``).

Ingress: the HTTP API (``serve.http``); it has each request recommended (``serve.recommendation.run_stages``),
answers, and hands the impressions to the FeedbackLogger. Given the Retriever, Ranker and ReRanker (the
split graph) it calls them; without them (the colocated graph, where it is deployed as the Recommender)
it runs those stages in its own replica by their code. Either way concurrent requests go through the
stages together. UserStateStore: the one copy of the server-side
state. FeedbackLogger: the durable feedback log, concurrent appends batched into one fsync.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures at run time.
import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Response
from fastapi import Path as PathParam
from pydantic_core import to_json
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter

from serve.api import (
    FeedbackBatch,
    FeedbackBody,
    FeedbackEvent,
    FeedbackResponse,
    ItemInfo,
    ModelInfo,
    NewItem,
    RatingScale,
    RecommendRequest,
    RecommendResponse,
    responses,
)
from serve.batching import batched, set_batching
from serve.config import ServeConfig
from serve.errors import FeedbackLogUnavailable, ServiceUnavailable, cause_of
from serve.feedback_log import FeedbackLog, impression_rows, now_ms
from serve.http import IngressMetrics, app, configure, invalid_field, require_api_key, require_read_key, use_rating_scale
from serve.messages import Query, Ranked
from serve.recommendation import Chosen, ColocatedStages, HandleStages, RankingStage, RetrievalStage
from serve.rerank import final_items_of_batch
from serve.resend import SENT, ResendQueue
from serve.state import ItemExists, RegisteredItem, ServerState, UserContext
from serve.user_cache import ChangeFeed, Changes, Contexts
from train.artifact import artifact_model_config, artifact_rating, read_metadata

logger = logging.getLogger("ray.serve")

#: How often an ingress replica offers the UserStateStore the feedback it could not take (while it restarts).
STATE_RESEND_S = 1.0


# --- the split graph's stages ----------------------------------------------------------------


@serve.deployment
class Retriever(RetrievalStage):
    """Split graph: the retrieval stage (a batch of requests a call), and the item and model lookups."""


@serve.deployment
class Ranker(RankingStage):
    """Split graph: the ranking stage (a batch of requests a call)."""


@serve.deployment
class ReRanker:
    """Split graph: the re-ranking stage (a batch of requests a call)."""

    def __init__(self, config: ServeConfig):
        self.config = config.rerank

    async def rerank_batch(self, batch: list[Ranked], ks: list[int], drops: list[list[str]]) -> Chosen:
        return final_items_of_batch(batch, ks, drops, self.config)


# --- Ingress ---------------------------------------------------------------------------------
# Everything the Ingress names is defined or imported above it: ``serve.ingress`` freezes (pickles) the
# FastAPI app, with the Ingress's methods and the globals they name, when it decorates the class.


@serve.deployment
@serve.ingress(app)
class Ingress:
    """The HTTP API. ``user_config = {"model": path}`` picks the version new requests use.

    ``stage_deployments``: the Retriever, Ranker and ReRanker of the split graph, which this replica calls.
    Without them (the colocated graph, deployed as the Recommender) the stages run in this replica, which
    then holds the model versions, so ``user_config`` also names them (``models``, as for a model deployment)."""

    def __init__(self, config: ServeConfig, store: DeploymentHandle, feedback_logger: DeploymentHandle, *stage_deployments: DeploymentHandle):
        self.config = config
        self.store, self.feedback_logger = store, feedback_logger
        self.model = config.model
        self.model_reads_text = True  # of the version in service (an id-only model reads no item text), set with it
        self.metrics = IngressMetrics(config.admission.call_timeout_s)
        latency = self.metrics.stage_latency
        self.stages = HandleStages(config, latency, store, *stage_deployments) if stage_deployments else ColocatedStages(config, latency, store)
        configure(app, config, self.metrics)
        self.history_events = set(config.state.history_events)
        self.accepted_events = set(config.accepted_events)
        self._impressions = ResendQueue(
            lambda rows: latency.timed("impressions", self.feedback_logger.append.remote(rows)),
            what="impression rows",
            interval_s=config.feedback.impression_batch_s,
            max_pending=config.feedback.max_pending_impressions,
            count=lambda outcome, rows: self.metrics.impressions.inc(rows, tags={"outcome": "logged" if outcome == SENT else outcome}),
        )
        # Feedback is durable in the log before the store hears of it; while the store restarts (and rebuilds from the
        # log) its updates wait here. The store applies an event id once, so one sent twice changes nothing.
        self._state_updates = ResendQueue(
            self._update_state,
            what="feedback events for the user state",
            interval_s=STATE_RESEND_S,
            max_pending=config.state.max_pending_updates,
            count=self._count_state_update,
        )

    async def _update_state(self, interactions: list[tuple[str, str, str, int, float | None]]) -> None:
        await self.metrics.stage_latency.timed("state", self.store.record.remote(interactions))

    def _count_state_update(self, outcome: str, rows: int) -> None:
        if outcome != SENT:
            self.metrics.errors.inc(tags={"route": "state_update"})

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        if isinstance(self.stages, ColocatedStages):
            await self.stages.reconfigure(user_config)  # loads the versions before any request may name them
        model = user_config["model"]
        # From artifact.json, not from a stage: feedback is taken while the split graph's stages start or fail.
        metadata = await asyncio.to_thread(read_metadata, model)
        reads_text = artifact_model_config(metadata).item_encoder.use_text
        if self.config.rating_range is not None:
            scale = RatingScale(low=self.config.rating_range[0], high=self.config.rating_range[1])
        else:
            rating = artifact_rating(metadata)
            scale = RatingScale(low=rating.low, high=rating.high)
        # Together, with no wait between: no request is checked against one version's scale and served by another.
        self.model, self.model_reads_text = model, reads_text
        use_rating_scale(app, scale)

    # --- recommendations ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """The whole request within ``admission.request_timeout_s``, else 503: never a long wait."""
        timeout_s = self.config.admission.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except TimeoutError:
            raise ServiceUnavailable(f"not answered within {timeout_s:g}s; try again later") from None

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=[Depends(require_read_key)], responses=responses(400, 401, 413, 422, 503))
    async def recommend(self, body: RecommendRequest) -> Response:
        if body.interests and not self.model_reads_text:
            raise invalid_field(("body", "interests"), "the model in service reads no item text, so it cannot read interests", body.interests)
        request_id = uuid.uuid4().hex
        query = Query(model=self.model, user_id=body.user_id, k=body.k, history=body.history, interests=body.interests, exclude=body.exclude)
        async with self._deadline():
            recommendation = await self.stages.recommend(query)
        if recommendation.mode != "personal":
            self.metrics.cold_starts.inc(tags={"mode": recommendation.mode})
        if body.context:
            logger.info("request %s context %s", request_id, body.context)
        items = recommendation.items
        # Not awaited: the answer does not wait for its impressions (feedback, by contrast, is acknowledged only once durable).
        self._impressions.add(
            impression_rows(
                request_id=request_id,
                user_id=body.user_id,
                items=[(item["item_id"], item["score"]) for item in items],
                model_version=recommendation.model_version,
                ts=now_ms(),
            )
        )
        answer = {"request_id": request_id, "model_version": recommendation.model_version, "items": items, "ignored_history": recommendation.ignored_history}
        # A RecommendResponse, serialised here, once, by pydantic's encoder: returned as a model, FastAPI would dump it,
        # validate the dump again and encode that.
        return Response(to_json(answer, inf_nan_mode="null"), media_type="application/json")

    async def __del__(self) -> None:
        await self._impressions.close()  # graceful shutdown: one last attempt at what is queued
        await self._state_updates.close()
        await self.stages.close()

    # --- feedback ----------------------------------------------------------------------------

    @app.post("/v1/feedback", response_model=FeedbackResponse, dependencies=[Depends(require_api_key)], responses=responses(400, 401, 413, 422, 503))
    async def feedback(self, body: FeedbackBody) -> FeedbackResponse:
        """One event, or ``{"events": [...]}``; answered once every event is durable in the log. A retry must
        resend the same ``event_id``s: an id applied before changes nothing, here or in retraining."""
        many = isinstance(body, FeedbackBatch)
        events: Sequence[FeedbackEvent] = body.events if many else [body]
        scale: RatingScale = app.state.rating_scale
        for i, event in enumerate(events):
            where = ("body", "events", i) if many else ("body",)
            if event.event not in self.accepted_events:
                raise invalid_field((*where, "event"), f"unknown event type; accepted: {', '.join(sorted(self.accepted_events))}", event.event)
            if event.event == "rate" and (event.value is None or not scale.holds(event.value)):
                raise invalid_field((*where, "value"), f"a rate event's value is a rating in {scale}", event.value)
        received = now_ms()
        rows = [
            {**event.model_dump(), "event_id": event.event_id or str(uuid.uuid4()), "ts": event.ts if event.ts is not None else received} for event in events
        ]
        event_ids = [row["event_id"] for row in rows]
        try:
            async with self._deadline():
                try:
                    await self.metrics.stage_latency.timed("feedback_log", self.feedback_logger.append.remote(rows))
                except RayError as error:
                    if isinstance(cause_of(error), FeedbackLogUnavailable):
                        raise ServiceUnavailable("feedback log unavailable; nothing was recorded, try again later") from None
                    raise
        except ServiceUnavailable as error:
            # A deadline can pass after the log took the events: the client retries with the ids they were given.
            raise ServiceUnavailable(f"{error} (retry with these event_ids: each counts once)", event_ids=event_ids) from None
        for row in rows:
            self.metrics.feedback_events.inc(tags={"event": row["event"]})
        interactions = [
            (row["event_id"], row["user_id"], row["item_id"], row["ts"], row["value"] if row["event"] == "rate" else None)
            for row in rows
            if row["event"] in self.history_events
        ]
        if interactions and len(self._state_updates):  # the store is away: these wait behind the others, in order
            self._state_updates.add(interactions)
        elif interactions:
            try:
                await self._update_state(interactions)
            except Exception as error:
                logger.warning("feedback logged, the user state not updated yet (%s): sent to the store again", cause_of(error))
                self.metrics.errors.inc(tags={"route": "state_update"})
                self._state_updates.add(interactions)
        return FeedbackResponse(accepted=len(rows), event_ids=event_ids)

    # --- items and model ---------------------------------------------------------------------

    @app.post("/v1/items", status_code=201, response_model=ItemInfo, dependencies=[Depends(require_api_key)], responses=responses(400, 401, 409, 413, 422, 503))
    async def register_item(self, body: NewItem) -> ItemInfo:
        """A new item, recommendable at once: its vector comes from the item encoder reading ``text``."""
        if not self.model_reads_text:
            raise invalid_field(("body", "text"), "the model in service reads no item text, so it could not recommend an item known by its text", body.text)
        timed = self.metrics.stage_latency.timed
        async with self._deadline():
            taken = await timed("retrieve", self.stages.check_new_item(self.model, body.item_id, body.text))
            item: RegisteredItem | ItemExists = taken or await timed("state", self.store.register.remote(body.item_id, body.title or "", body.text))
        if isinstance(item, ItemExists):
            raise HTTPException(409, str(item))
        return ItemInfo(item_id=item.item_id, title=item.title, registered=True, attributes=[])

    @app.get("/v1/items/{item_id}", response_model=ItemInfo, dependencies=[Depends(require_read_key)], responses=responses(401, 404, 422, 503))
    async def get_item(self, item_id: Annotated[str, PathParam(min_length=1, max_length=256)]) -> ItemInfo:
        async with self._deadline():
            found = await self.metrics.stage_latency.timed("retrieve", self.stages.describe_item(self.model, item_id))
        if found is None:
            raise HTTPException(404, f"item_id: {item_id!r} is not known")
        return ItemInfo(**found)

    @app.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_read_key)], responses=responses(401, 503))
    async def model_info(self) -> ModelInfo:
        async with self._deadline():
            described = await self.metrics.stage_latency.timed("retrieve", self.stages.describe(self.model))
        return ModelInfo(**{**described, "rating_scale": app.state.rating_scale})  # what this service accepts

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


# --- shared state ----------------------------------------------------------------------------


@serve.deployment
class UserStateStore:
    """The one copy of the server-side state (see ``serve.state``); always a single replica."""

    def __init__(self, config: ServeConfig):
        self.training_data = config.training_data
        self.state = ServerState.rebuild(
            config.state, config.state_dir, training_data=config.training_data, feedback_log=config.feedback.path, wal_dir=config.feedback_wal_dir()
        )
        self.changes = ChangeFeed(config.state.cache)

    async def summary(self) -> dict[str, Any]:
        """What the state holds: users with a history, their interactions, registered items."""
        return {
            "training_data": self.training_data,
            "users": len(self.state.histories),
            "interactions": sum(self.state.popularity.values()),
            "registered_items": len(self.state.registered),
        }

    async def context(self, user_id: str) -> UserContext:
        return self.state.context(user_id)

    async def contexts(self, user_ids: list[str]) -> Contexts:
        return Contexts(self.changes.epoch, self.changes.seq, [self.state.context(user_id) for user_id in user_ids])

    async def watch(self, reader_id: str, epoch: str | None, applied: int) -> Changes:
        """An ingress replica's poll for the users whose contexts changed (``serve.user_cache``)."""
        return await self.changes.watch(reader_id, epoch, applied)

    async def leave(self, reader_id: str) -> None:
        self.changes.leave(reader_id)

    async def popular(self, n: int) -> list[tuple[str, int]]:
        return self.state.popular(n)

    async def record(self, interactions: list[tuple[str, str, str, int, float | None]]) -> None:
        """(event_id, user_id, item_id, ts in ms, raw rating of a ``rate`` event or None); an event id applied
        before (a client's retry) changes nothing."""
        changed = {user_id for event_id, user_id, item_id, ts, rating in interactions if self.state.record(user_id, item_id, ts, rating, event_id)}
        if changed:
            await self.changes.publish(changed)  # before the feedback is acknowledged: no replica answers from the old context

    async def register(self, item_id: str, title: str, text: str) -> RegisteredItem | ItemExists:
        """The registered item, or ItemExists, returned: Ray Serve logs what a replica raises as a failed request, with
        its traceback, and a taken id is an expected answer (409)."""
        try:
            item = self.state.register(item_id, title, text, now_ms())
        except ItemExists as taken:
            return taken
        await self.changes.publish(None)  # every context's registry_version
        return item

    async def registered_since(self, version: int) -> list[RegisteredItem]:
        return self.state.registered_since(version)


# --- feedback log ----------------------------------------------------------------------------


@serve.deployment
class FeedbackLogger:
    """Appends to this replica's WAL (one fsync per batch of requests) and flushes it into Parquet in
    a background thread. At start it replays the WAL of replicas that died; on graceful shutdown it
    flushes everything."""

    def __init__(self, config: ServeConfig):
        settings = config.feedback
        self.log = FeedbackLog(
            settings.path, config.feedback_wal_dir(), writer=serve.get_replica_context().replica_tag, flush_max_events=settings.flush_max_events
        )
        self.log.flush()
        self.flush_interval_s = settings.flush_interval_s
        self.rows_written = Counter("polyrec_feedback_rows", "Feedback-log rows made durable, by where", tag_keys=("where",))
        self._stopping = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="feedback-flush", daemon=True)
        self._flusher.start()
        set_batching(self.append, settings.batching)

    @batched
    async def append(self, requests: list[list[dict[str, Any]]]) -> list[int]:
        """Each request's rows; returns once all of them are fsynced (one fsync for the batch)."""
        rows = [row for request in requests for row in request]
        await asyncio.to_thread(self.log.append, rows)
        self.rows_written.inc(len(rows), tags={"where": "wal"})
        return [len(request) for request in requests]

    async def flush(self) -> int:
        """Flush the WAL into Parquet now (operations, tests); rows written."""
        return await asyncio.to_thread(self._flush)

    def _flush(self) -> int:
        written = self.log.flush()
        if written:
            self.rows_written.inc(written, tags={"where": "parquet"})
        return written

    def _flush_loop(self) -> None:
        while not self._stopping.is_set():
            self.log.flush_wanted.wait(self.flush_interval_s)
            if self._stopping.is_set():
                break
            try:
                self._flush()
            except Exception:
                logger.exception("feedback log flush failed; the WAL is kept and retried")

    def __del__(self) -> None:
        if not hasattr(self, "_flusher") or self._stopping.is_set():
            return
        self._stopping.set()
        self.log.flush_wanted.set()
        self._flusher.join(timeout=30)
        self.log.close()
