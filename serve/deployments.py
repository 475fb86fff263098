"""The Ray Serve deployments of the recommendation graph, in either layout (``ServeConfig.graph``).

Split graph: a recommendation flows Ingress → UserStateStore (the user's server-side history) →
Retriever (user state, exact inner-product top-N) → Ranker (multi-task scores, final score) →
ReRanker (rules, diversity, ``because``) → Ingress, which answers and hands the impression to the
FeedbackLogger. Colocated graph: the same Ingress code, deployed as the Recommender, runs those
stages in its own replica by the same code (``ColocatedStages``) and calls only the UserStateStore
and the FeedbackLogger. ``serve.recommendation`` is the stage sequence both run. Every stage of one
request uses the model version the ingress chose when the request arrived, so a version swap
(``reconfigure`` with a new ``user_config``) never mixes two versions in one answer.

Retrieval and ranking batch concurrent requests into one forward pass (``@serve.batch``), the
colocated graph its user lookups into one store call, and the FeedbackLogger concurrent appends into
one fsync.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures at run time.
import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter

from serve.api import (
    FeedbackBatch,
    FeedbackBody,
    FeedbackEvent,
    FeedbackResponse,
    ItemInfo,
    ModelInfo,
    NewItem,
    RecommendRequest,
    RecommendResponse,
    contract,
    responses,
)
from serve.config import BatchingConfig, ServeConfig, api_key
from serve.errors import FeedbackLogUnavailable, ServiceUnavailable
from serve.feedback_log import FeedbackLog, impression_rows, now_ms
from serve.messages import Candidates, Query, Ranked, RetrievalRequest
from serve.recommendation import HandleStages, StageLatency, run_stages
from serve.rerank import final_items
from serve.state import ItemExists, RegisteredItem, ServerState, UserContext

if TYPE_CHECKING:
    from serve.model_runtime import ServingModel

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


def wal_dir(config: ServeConfig) -> Path:
    return Path(config.feedback.wal_dir or Path(config.state_dir) / "wal")


def _cause(error: BaseException) -> BaseException:
    """The exception raised inside another deployment, without Ray's wrapping."""
    return getattr(error, "cause", None) or error


# --- HTTP plumbing ---------------------------------------------------------------------------


app = FastAPI(
    title="polyrec",
    version="1",
    description="Recommendations from polyrec's multi-task model, feedback ingestion and cold-start items.",
)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (``loc``); the offending input is echoed only when a JSON response
    can carry it (``1e999`` parses to infinity, ``"\\ud800"`` is no UTF-8)."""
    details = [{key: value for key, value in problem.items() if key != "input" or _json_safe(value)} for problem in error.errors()]
    return JSONResponse({"detail": jsonable_encoder(details)}, 422)


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(jsonable_encoder(value), allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return False
    return True


def _unavailable(request: Request, message: str) -> JSONResponse:
    retry_after = max(1, math.ceil(request.app.state.retry_after_s))
    return JSONResponse({"detail": message}, 503, headers={"Retry-After": str(retry_after)})


class AdmissionControl:
    """Past ``admission.max_in_progress`` API requests in this replica, a request is answered 503 with Retry-After
    before anything else is done with it (its body is not even read): refusing must cost far less than serving,
    or a crowd of refused clients would starve the admitted ones. A pure ASGI middleware, so it runs first."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_progress = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        if self.in_progress >= state.max_in_progress:
            retry_after = str(max(1, math.ceil(state.retry_after_s)))
            return await JSONResponse({"detail": "over capacity; try again later"}, 503, headers={"Retry-After": retry_after})(scope, receive, send)
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


app.add_middleware(AdmissionControl)


@app.exception_handler(ServiceUnavailable)
async def _service_unavailable(request: Request, error: ServiceUnavailable) -> JSONResponse:
    """Work the service could not do now (a deadline passed, the feedback log failed): try again later."""
    return _unavailable(request, str(error))


@app.exception_handler(BackPressureError)
async def _back_pressure(request: Request, error: BackPressureError) -> JSONResponse:
    """Another deployment's queue is full: refused before any work, as the HTTP proxy refuses past the ingress's."""
    return _unavailable(request, "over capacity; try again later")


@app.exception_handler(Exception)
async def _server_fault(request: Request, error: Exception) -> JSONResponse:
    """Only genuine server faults get here: every bad input is answered 4xx before."""
    logger.exception("internal error on %s %s", request.method, request.url.path)
    request.app.state.metrics.errors.inc(tags={"route": getattr(request.scope.get("route"), "path", "unmatched")})
    return JSONResponse({"detail": "internal server error"}, 500)


API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key (ServeConfig.api_key_env)")


def _check_key(request: Request, given: str | None) -> None:
    expected = request.app.state.api_key
    if expected is not None and not hmac.compare_digest((given or "").strip().encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header")


def require_api_key(request: Request, given: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
    """Write endpoints need ``X-API-Key`` when the service has a key (``ServeConfig.api_key_env`` / ``api_key_file``)."""
    _check_key(request, given)


def require_read_key(request: Request) -> None:
    """Reads need the key too with ``ServeConfig.protect_reads``."""
    if request.app.state.protect_reads:
        _check_key(request, request.headers.get("x-api-key"))


def _invalid(location: tuple[Any, ...], message: str, value: Any) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": location, "msg": message, "input": value}])


class IngressMetrics:
    """polyrec's own metrics. Requests, their latency and their errors by route and status are Ray
    Serve's (``ray_serve_num_http_requests``, ``ray_serve_http_request_latency_ms``,
    ``ray_serve_num_http_error_requests``, recorded by the HTTP proxy), so they are not counted twice."""

    def __init__(self, call_timeout_s: float) -> None:
        self.errors = Counter("polyrec_errors", "5xx answers and failed background work by route", tag_keys=("route",))
        self.stage_latency = StageLatency(call_timeout_s)
        self.impressions = Counter("polyrec_impressions", "Impression rows logged, sent again after a failure, or dropped",
                                   tag_keys=("outcome",))
        self.feedback_events = Counter("polyrec_feedback_events", "Feedback events acknowledged, by event type", tag_keys=("event",))
        self.cold_starts = Counter("polyrec_cold_starts", "Recommendations without a usable history, by mode", tag_keys=("mode",))


# --- model stages ----------------------------------------------------------------------------


class _ModelHolder:
    """The model versions of a replica. ``user_config = {"models": [paths]}`` loads those versions
    (before the Ingress switches to one of them) and drops the others; a version a request names
    but the replica lacks is loaded on demand."""

    def __init__(self, config: ServeConfig):
        # Imported here: only the model stages need torch, so the other replicas start faster.
        from serve.model_runtime import ModelCache, limit_threads

        limit_threads(config.torch_threads)
        self.config = config
        self.models = ModelCache(config.max_loaded_models, config.model_root)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await asyncio.to_thread(self.models.keep_only, list(user_config["models"]))

    async def _loaded(self, path: str) -> "ServingModel":
        return self.models.loaded(path) or await asyncio.to_thread(self.models.get, path)


def _set_batching(method: Any, settings: BatchingConfig) -> None:
    """Apply the configured batching to a ``@serve.batch`` method."""
    method.set_max_batch_size(settings.max_batch_size)
    method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)


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
    registered in the UserStateStore (the Retriever; the first of the ColocatedStages)."""

    def __init__(self, config: ServeConfig, store: DeploymentHandle):
        super().__init__(config)
        self.store = store
        _set_batching(self.retrieve, config.retrieval.batching)

    async def _synced(self, path: str, registry_version: int | None = None) -> "ServingModel":
        """The model with every registered item up to ``registry_version`` (None: the latest)."""
        model = await self._loaded(path)
        if registry_version is None or model.registry_version < registry_version:
            model.sync_registry(await self.store.registered_since.remote(model.registry_version))
        return model

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def retrieve(self, requests: list[RetrievalRequest]) -> list[Candidates]:
        for path in {request.model for request in requests}:
            await self._synced(path, max(r.registry_version for r in requests if r.model == path))
        retrieval = self.config.retrieval
        return _grouped(requests, lambda path, group: self.models.get(path).retrieve(
            group, self.config.state.history_length, retrieval.interests_weight))

    async def check_new_item(self, path: str, item_id: str, text: str) -> None:
        """ItemExists if the catalogue has ``item_id``; the text must encode."""
        model = await self._synced(path)
        if item_id in model.item_index:
            raise ItemExists(f"item_id: {item_id!r} is already in the catalogue")
        model.encode_texts([text])

    async def describe_item(self, path: str, item_id: str) -> dict | None:
        return (await self._synced(path)).describe_item(item_id)

    async def describe(self, path: str) -> dict:
        return (await self._synced(path)).describe()


class RankingStage(_ModelHolder):
    """Multi-task scores and the final score of each candidate (the Ranker; the second of the ColocatedStages)."""

    def __init__(self, config: ServeConfig):
        super().__init__(config)
        _set_batching(self.rank, config.ranking.batching)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rank(self, batch: list[Candidates]) -> list[Ranked]:
        for path in {candidates.model for candidates in batch}:
            await self._loaded(path)
        weights = self.config.ranking.weights
        return _grouped(batch, lambda path, group: self.models.get(path).rank(group, weights))


@serve.deployment
class Retriever(RetrievalStage):
    """Split graph: the retrieval stage, and the item and model lookups."""


@serve.deployment
class Ranker(RankingStage):
    """Split graph: the ranking stage."""


@serve.deployment
class ReRanker:
    """Split graph: the re-ranking stage."""

    def __init__(self, config: ServeConfig):
        self.config = config.rerank

    async def rerank(self, ranked: Ranked, k: int, drop: list[str]) -> list[tuple[int, list[str]]]:
        return final_items(ranked, k, drop, self.config)


class ColocatedStages(RetrievalStage, RankingStage):
    """The colocated graph's stages, in the ingress replica, by the code of the split graph's
    Retriever, Ranker and ReRanker: retrieval and ranking batched across concurrent requests as
    those deployments batch them, re-ranking in line, and the requests' user lookups gathered into
    one call to the UserStateStore, which stays the one copy of the user state."""

    def __init__(self, config: ServeConfig, store: DeploymentHandle):
        super().__init__(config, store)
        _set_batching(self.context, config.state.lookup_batching)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def context(self, user_ids: list[str]) -> list[UserContext]:
        return await self.store.contexts.remote(user_ids)

    async def popular(self, n: int) -> list[tuple[str, int]]:
        return await self.store.popular.remote(n)

    async def rerank(self, ranked: Ranked, k: int, drop: list[str]) -> list[tuple[int, list[str]]]:
        return final_items(ranked, k, drop, self.config.rerank)


# Everything the Ingress names is defined above it: ``serve.ingress`` freezes (pickles) the FastAPI app,
# with the Ingress's methods and the globals they name, when it decorates the class.


# --- Ingress ---------------------------------------------------------------------------------


@serve.deployment
@serve.ingress(app)
class Ingress:
    """The HTTP API. ``user_config = {"model": path}`` picks the version new requests use.

    Split graph: the stages are the ``retriever``, ``ranker`` and ``reranker`` deployments. Colocated
    graph (deployed as the Recommender): they run in this replica, which holds the model versions,
    so ``user_config`` also names them (``models``, as for a model deployment)."""

    def __init__(
        self,
        config: ServeConfig,
        store: DeploymentHandle,
        feedback_logger: DeploymentHandle,
        retriever: DeploymentHandle | None = None,
        ranker: DeploymentHandle | None = None,
        reranker: DeploymentHandle | None = None,
    ):
        self.config = config
        self.store, self.feedback_logger = store, feedback_logger
        self.stages: HandleStages | ColocatedStages = (
            HandleStages(store, retriever, ranker, reranker) if config.graph == "split" else ColocatedStages(config, store)
        )
        self.model = config.model
        self.metrics = IngressMetrics(config.admission.call_timeout_s)
        app.state.metrics = self.metrics
        # FastAPI's own body limit (413, from Content-Length or the streamed size); the middleware
        # stack is built at the first request, after this.
        app.max_body_size = config.max_body_bytes
        app.state.api_key = api_key(config)
        if app.state.api_key is None and config.api_key_required and not config.insecure:
            raise RuntimeError(f"the service listens beyond loopback and has no API key: set ${config.api_key_env} or api_key_file "
                               "in the replicas' environment, or insecure: true to run with open write endpoints")
        app.state.protect_reads = config.protect_reads
        app.state.retry_after_s = config.admission.retry_after_s
        app.state.max_in_progress = config.admission.max_in_progress
        app.openapi = lambda: contract(app, accepted_events=config.accepted_events, rating_range=config.rating_range,
                                       protect_reads=config.protect_reads)
        self.history_events = set(config.state.history_events)
        self.accepted_events = set(config.accepted_events)
        self._impressions: list[dict[str, Any]] = []
        self._impression_sender: asyncio.Future | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        if isinstance(self.stages, ColocatedStages):
            await self.stages.reconfigure(user_config)  # loads the versions before any request may name them
        self.model = user_config["model"]

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

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=[Depends(require_read_key)],
              responses=responses(400, 401, 413, 422, 503))
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        request_id = uuid.uuid4().hex
        query = Query(model=self.model, user_id=body.user_id, k=body.k, history=body.history, interests=body.interests, exclude=body.exclude)
        async with self._deadline():
            recommendation = await run_stages(query, self.stages, self.config, self.metrics.stage_latency)
        if recommendation.mode != "personal":
            self.metrics.cold_starts.inc(tags={"mode": recommendation.mode})
        if body.context:
            logger.info("request %s context %s", request_id, body.context)
        items = recommendation.items
        self._log_impressions(impression_rows(request_id=request_id, user_id=body.user_id, items=[(item.item_id, item.score) for item in items],
                                              model_version=recommendation.model_version, ts=now_ms()))
        return RecommendResponse(request_id=request_id, model_version=recommendation.model_version, items=items,
                                 ignored_history=recommendation.ignored_history)

    def _log_impressions(self, rows: list[dict[str, Any]]) -> None:
        """Queue impression rows; they reach the log in one call per ``impression_batch_s``.

        The answer does not wait for them (feedback, by contrast, is acknowledged only once durable). Rows
        the log could not take are sent again with the next ones; past ``max_pending_impressions`` the oldest
        are dropped. Both are counted in ``polyrec_impressions{outcome}``."""
        self._impressions.extend(rows)
        if self._impression_sender is None or self._impression_sender.done():
            self._impression_sender = asyncio.ensure_future(self._send_impressions(self.config.feedback.impression_batch_s))

    async def _send_impressions(self, gather_s: float) -> None:
        while True:
            await asyncio.sleep(gather_s)
            rows, self._impressions = self._impressions, []
            if not rows:
                return
            try:
                await self.metrics.stage_latency.timed("impressions", self.feedback_logger.append.remote(rows))
                self.metrics.impressions.inc(len(rows), tags={"outcome": "logged"})
            except Exception as error:
                logger.warning("could not log %d impression rows (%s); they are sent again", len(rows), _cause(error))
                self.metrics.impressions.inc(len(rows), tags={"outcome": "retried"})
                self._impressions = rows + self._impressions
                excess = len(self._impressions) - self.config.feedback.max_pending_impressions
                if excess > 0:
                    del self._impressions[:excess]
                    self.metrics.impressions.inc(excess, tags={"outcome": "dropped"})

    async def __del__(self) -> None:
        await self._send_impressions(0)  # graceful shutdown: the queued impressions

    # --- feedback ----------------------------------------------------------------------------

    @app.post("/v1/feedback", response_model=FeedbackResponse, dependencies=[Depends(require_api_key)],
              responses=responses(400, 401, 413, 422, 503))
    async def feedback(self, body: FeedbackBody) -> FeedbackResponse:
        """One event, or ``{"events": [...]}``; answered once every event is durable in the log. A retry must
        resend the same ``event_id``s: an id applied before changes nothing, here or in retraining."""
        batched = isinstance(body, FeedbackBatch)
        events: Sequence[FeedbackEvent] = body.events if batched else [body]
        low, high = self.config.rating_range
        for i, event in enumerate(events):
            where = ("body", "events", i) if batched else ("body",)
            if event.event not in self.accepted_events:
                raise _invalid((*where, "event"), f"unknown event type; accepted: {', '.join(sorted(self.accepted_events))}", event.event)
            if event.event == "rate" and (event.value is None or not low <= event.value <= high):
                raise _invalid((*where, "value"), f"a rate event's value is a rating in [{low:g}, {high:g}]", event.value)
        received = now_ms()
        rows = [
            {**event.model_dump(), "event_id": event.event_id or str(uuid.uuid4()), "ts": event.ts if event.ts is not None else received}
            for event in events
        ]
        async with self._deadline():
            try:
                await self.metrics.stage_latency.timed("feedback_log", self.feedback_logger.append.remote(rows))
            except RayError as error:
                if isinstance(_cause(error), FeedbackLogUnavailable):
                    raise ServiceUnavailable("feedback log unavailable; nothing was recorded, try again later") from None
                raise
        for row in rows:
            self.metrics.feedback_events.inc(tags={"event": row["event"]})
        interactions = [(row["event_id"], row["user_id"], row["item_id"], row["ts"], row["value"] if row["event"] == "rate" else None)
                        for row in rows if row["event"] in self.history_events]
        if interactions:
            try:
                await self.metrics.stage_latency.timed("state", self.store.record.remote(interactions))
            except Exception:
                # The events are durable; the store re-reads the log when it restarts.
                logger.exception("feedback logged but the user state was not updated")
                self.metrics.errors.inc(tags={"route": "state_update"})
        return FeedbackResponse(accepted=len(rows), event_ids=[row["event_id"] for row in rows])

    # --- items and model ---------------------------------------------------------------------

    @app.post("/v1/items", status_code=201, response_model=ItemInfo, dependencies=[Depends(require_api_key)],
              responses=responses(400, 401, 409, 413, 422, 503))
    async def register_item(self, body: NewItem) -> ItemInfo:
        """A new item, recommendable at once: its vector comes from the item encoder reading ``text``."""
        timed = self.metrics.stage_latency.timed
        try:
            async with self._deadline():
                await timed("retrieve", self.stages.check_new_item(self.model, body.item_id, body.text))
                item: RegisteredItem = await timed("state", self.store.register.remote(body.item_id, body.title or "", body.text))
        except ItemExists as error:
            raise HTTPException(409, str(_cause(error))) from None
        return ItemInfo(item_id=item.item_id, title=item.title, registered=True, attributes=[])

    @app.get("/v1/items/{item_id}", response_model=ItemInfo, dependencies=[Depends(require_read_key)],
             responses=responses(401, 404, 422, 503))
    async def get_item(self, item_id: Annotated[str, PathParam(min_length=1, max_length=256)]) -> ItemInfo:
        async with self._deadline():
            found = await self.metrics.stage_latency.timed("retrieve", self.stages.describe_item(self.model, item_id))
        if found is None:
            raise HTTPException(404, f"item_id: {item_id!r} is not known")
        return ItemInfo(**found)

    @app.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_read_key)], responses=responses(401, 503))
    async def model_info(self) -> ModelInfo:
        async with self._deadline():
            return ModelInfo(**await self.metrics.stage_latency.timed("retrieve", self.stages.describe(self.model)))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


# --- shared state ----------------------------------------------------------------------------


@serve.deployment
class UserStateStore:
    """The one copy of the server-side state (see ``serve.state``); always a single replica."""

    def __init__(self, config: ServeConfig):
        self.training_data = config.training_data
        self.state = ServerState.rebuild(config.state, config.state_dir, training_data=config.training_data,
                                         feedback_log=config.feedback.path, wal_dir=wal_dir(config))

    async def summary(self) -> dict[str, Any]:
        """What the state holds: users with a history, their interactions, registered items."""
        return {"training_data": self.training_data, "users": len(self.state.histories),
                "interactions": sum(self.state.popularity.values()), "registered_items": len(self.state.registered)}

    async def context(self, user_id: str) -> UserContext:
        return self.state.context(user_id)

    async def contexts(self, user_ids: list[str]) -> list[UserContext]:
        return [self.state.context(user_id) for user_id in user_ids]

    async def popular(self, n: int) -> list[tuple[str, int]]:
        return self.state.popular(n)

    async def record(self, interactions: list[tuple[str, str, str, int, float | None]]) -> None:
        """(event_id, user_id, item_id, ts in ms, raw rating of a ``rate`` event or None); an event id applied
        before (a client's retry) changes nothing."""
        for event_id, user_id, item_id, ts, rating in interactions:
            self.state.record(user_id, item_id, ts, rating, event_id)

    async def register(self, item_id: str, title: str, text: str) -> RegisteredItem:
        return self.state.register(item_id, title, text, now_ms())

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
        self.log = FeedbackLog(settings.path, wal_dir(config), writer=serve.get_replica_context().replica_tag,
                               flush_max_events=settings.flush_max_events)
        self.log.flush()
        self.flush_interval_s = settings.flush_interval_s
        self.rows_written = Counter("polyrec_feedback_rows", "Feedback-log rows made durable, by where", tag_keys=("where",))
        self._stopping = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="feedback-flush", daemon=True)
        self._flusher.start()
        self.append.set_max_batch_size(settings.batching.max_batch_size)
        self.append.set_batch_wait_timeout_s(settings.batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
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
