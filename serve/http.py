"""The service's HTTP surface: the FastAPI ``app`` whose routes are the Ingress's methods
(``serve.deployments``) and the web page (``/``, its files under ``/web/`` from ``serve/web``), admission
control in front of every ``/v1`` route, the answers to errors (422 naming the field, 503 with Retry-After,
500 counted), the API-key checks and polyrec's own metrics.

``configure`` gives the app a service's settings when an ingress replica starts. The app, its handlers
and its checks read them from ``request.app.state``: the app that serves is the copy ``serve.ingress``
froze with the Ingress, so module globals of this one would not reach it.
"""

# No `from __future__ import annotations`: FastAPI evaluates the dependencies' signatures at run time.
import hmac
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter

from serve.api import RatingScale, contract
from serve.config import ServeConfig, api_key
from serve.errors import ServiceUnavailable
from serve.recommendation import StageLatency

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="polyrec",
    version="1",
    description="Recommendations from polyrec's multi-task model, feedback ingestion and cold-start items.",
)

# --- the web page: static files calling the API from the browser, outside the API's contract -----

WEB_DIR = Path(__file__).parent / "web"
app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


#: The page runs only its own files: text from the API (titles of items anyone with the key registered) can never
#: become script, and the key the page keeps stays with it.
WEB_PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"


@app.get("/", include_in_schema=False)
async def web_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": WEB_PAGE_POLICY})


class IngressMetrics:
    """polyrec's own metrics. Requests, their latency and their errors by route and status are Ray
    Serve's (``ray_serve_num_http_requests``, ``ray_serve_http_request_latency_ms``,
    ``ray_serve_num_http_error_requests``, recorded by the HTTP proxy), so they are not counted twice."""

    def __init__(self, call_timeout_s: float) -> None:
        self.errors = Counter("polyrec_errors", "5xx answers and failed background work by route", tag_keys=("route",))
        self.stage_latency = StageLatency(call_timeout_s)
        self.impressions = Counter("polyrec_impressions", "Impression rows logged, sent again after a failure, or dropped", tag_keys=("outcome",))
        self.feedback_events = Counter("polyrec_feedback_events", "Feedback events acknowledged, by event type", tag_keys=("event",))
        self.cold_starts = Counter("polyrec_cold_starts", "Recommendations without a usable history, by mode", tag_keys=("mode",))


def configure(served: FastAPI, config: ServeConfig, metrics: IngressMetrics) -> None:
    """Give ``served`` (the app of an ingress replica) ``config``'s body limit, key, admission bounds and
    OpenAPI contract. Refuses a service that listens beyond loopback without a key, unless ``insecure``."""
    served.state.metrics = metrics
    # FastAPI's own body limit (413, from Content-Length or the streamed size); the middleware stack is
    # built at the first request, after this.
    served.max_body_size = config.max_body_bytes
    served.state.api_key = api_key(config)
    if served.state.api_key is None and config.api_key_required and not config.insecure:
        raise RuntimeError(
            f"the service listens beyond loopback and has no API key: set ${config.api_key_env} or api_key_file "
            "in the replicas' environment, or insecure: true to run with open write endpoints"
        )
    served.state.protect_reads = config.protect_reads
    served.state.retry_after_s = config.admission.retry_after_s
    served.state.max_in_progress = config.admission.max_in_progress
    served.openapi = lambda: contract(
        served, accepted_events=config.accepted_events, rating_scale=served.state.rating_scale, protect_reads=config.protect_reads
    )


def use_rating_scale(served: FastAPI, scale: RatingScale) -> None:
    """A ``rate`` event's value must lie on ``scale`` from now on (``served.state.rating_scale``, set by the ingress's
    ``reconfigure`` before the replica takes a request); the OpenAPI document says so."""
    if getattr(served.state, "rating_scale", None) != scale:
        served.state.rating_scale = scale
        served.openapi_schema = None


# --- admission and error answers -------------------------------------------------------------


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


def invalid_field(location: tuple[Any, ...], message: str, value: Any) -> RequestValidationError:
    """A bad field found by the route rather than by the schema, answered 422 like the schema's."""
    return RequestValidationError([{"type": "value_error", "loc": location, "msg": message, "input": value}])


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


def _unavailable(request: Request, message: str, event_ids: list[str] | None = None) -> JSONResponse:
    retry_after = max(1, math.ceil(request.app.state.retry_after_s))
    body: dict[str, Any] = {"detail": message} if event_ids is None else {"detail": message, "event_ids": event_ids}
    return JSONResponse(body, 503, headers={"Retry-After": str(retry_after)})


@app.exception_handler(ServiceUnavailable)
async def _service_unavailable(request: Request, error: ServiceUnavailable) -> JSONResponse:
    """Work the service could not do now (a deadline passed, the feedback log failed): try again later."""
    return _unavailable(request, str(error), error.event_ids)


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


# --- API keys --------------------------------------------------------------------------------


API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key (ServeConfig.api_key_env)")


def _check_key(request: Request, given: str | None) -> None:
    expected = request.app.state.api_key
    if expected is not None and not hmac.compare_digest((given or "").strip().encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header")


# The checks are coroutines so that FastAPI runs them in the event loop: a plain function's dependency is run in a
# worker thread, a thread hop on every request.
async def require_api_key(request: Request, given: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
    """Write endpoints need ``X-API-Key`` when the service has a key (``ServeConfig.api_key_env`` / ``api_key_file``)."""
    _check_key(request, given)


async def require_read_key(request: Request) -> None:
    """Reads need the key too with ``ServeConfig.protect_reads``."""
    if request.app.state.protect_reads:
        _check_key(request, request.headers.get("x-api-key"))
