"""The HTTP API's request and response bodies (pydantic), with the limits that are part of the contract.

A body that breaks them is answered 422 by FastAPI, naming the field (``loc``). The limit on a whole
body's size is ``ServeConfig.max_body_bytes`` (413).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, field_validator

from data.features import rating_range_text

MAX_K = 1000
MAX_HISTORY_ITEMS = 500
MAX_EXCLUDE_ITEMS = 1000
MAX_TEXT_CHARS = 4000
MAX_FEEDBACK_EVENTS = 5000
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01


def _not_a_boolean(value: Any) -> Any:
    """JSON Schema's integers and numbers (2807.0 is an integer there) are no booleans, though Python's bool is an int."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
EventId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,31}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
ContextValue = Annotated[str, StringConstraints(max_length=256)] | int | float | bool


class Body(BaseModel):
    """A request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class RecommendRequest(Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "196", "k": 10},
                {"user_id": "new-visitor", "k": 5, "interests": "Space adventures with robots", "history": ["50"], "exclude": ["181"]},
            ]
        },
    )

    user_id: Id
    k: int = Field(10, ge=1, le=MAX_K)
    #: Items the user interacted with recently, oldest first; added after the server-side history.
    history: list[Id] = Field(default_factory=list, max_length=MAX_HISTORY_ITEMS)
    #: Free text describing what the user likes; used for users with little or no history.
    interests: Text | None = None
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE_ITEMS)
    #: Request context (device, page, ...): recorded in the server log with the request id.
    context: dict[Annotated[str, StringConstraints(max_length=64)], ContextValue] = Field(default_factory=dict, max_length=32)

    _k_is_a_number = field_validator("k", mode="before")(_not_a_boolean)


class HistoryItem(BaseModel):
    """An item of the user's history, named as a person reads it."""

    item_id: str
    title: str


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    year: int | None  # None where the catalogue has none (and for items registered at run time)
    genres: list[str]
    score: float
    p_like: float | None
    rating: float | None
    because: list[HistoryItem]  # history items that contributed most to this item's score, largest share first


class RecommendResponse(BaseModel):
    request_id: str
    model_version: str
    items: list[RecommendedItem]
    ignored_history: list[str]  # history items the model does not know


class FeedbackEvent(Body):
    """An interaction. ``value``: a ``rate`` event's rating, on the served model's rating scale (``GET /v1/model``'s
    ``rating_scale``, required there); for other events an optional weight."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"event_id": "3f1c9b7e-rate-1", "user_id": "196", "item_id": "50", "event": "rate", "value": 4.0},
                {"user_id": "196", "item_id": "181", "event": "click"},
            ]
        },
    )

    event_id: EventId | None = None  # a uuid4 is assigned when absent; retries should resend the same id
    user_id: Id
    item_id: Id
    event: EventType
    value: float | None = Field(None, allow_inf_nan=False)
    request_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    ts: int | None = Field(None, ge=0, le=MAX_TS_MS)  # milliseconds since the epoch; None: now

    _numbers_are_numbers = field_validator("value", "ts", mode="before")(_not_a_boolean)


class FeedbackBatch(Body):
    events: list[FeedbackEvent] = Field(min_length=1, max_length=MAX_FEEDBACK_EVENTS)


def _feedback_shape(value: Any) -> str:
    return "batch" if isinstance(value, dict) and "events" in value else "event"


FeedbackBody = Annotated[
    Annotated[FeedbackEvent, Tag("event")] | Annotated[FeedbackBatch, Tag("batch")],
    Discriminator(_feedback_shape),
]


class FeedbackResponse(BaseModel):
    accepted: int
    event_ids: list[str]


class NewItem(Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"item_id": "robot-musical", "title": "Robots Sing", "text": "Robots Sing in Space. Genres: Musical, Sci-Fi."},
            ]
        },
    )

    item_id: Id
    title: Annotated[str, StringConstraints(max_length=500)] | None = None
    text: Text  # what the item encoder reads, e.g. "Title. Genres: ... description"


class ItemInfo(BaseModel):
    item_id: str
    title: str
    registered: bool  # added at run time (cold start) rather than trained on
    attributes: list[int]


class RatingScale(BaseModel):
    """The ratings a ``rate`` event may carry: the served model's rating scale (its training data's ``clean.min_value`` to
    ``clean.max_value``, which its predictions keep to), or the service's ``rating_range`` where set; null: open."""

    low: float | None
    high: float | None

    def holds(self, rating: float) -> bool:
        return (self.low is None or rating >= self.low) and (self.high is None or rating <= self.high)

    def __str__(self) -> str:
        return rating_range_text(self.low, self.high)


class ModelInfo(BaseModel):
    model_version: str
    #: The artifact's figures by split, as training recorded them: ``{"validation": {...}, "test": {...}}``.
    metrics: dict[str, dict[str, float]]
    data_manifest_hash: str | None
    created_at: str | None
    num_items: int
    registered_items: int
    rating_scale: RatingScale


# --- The OpenAPI document: every status a route answers, and the settings that bound the bodies ------------


class Problem(BaseModel):
    """The body of an error answer."""

    detail: str | list[dict[str, Any]]
    #: A 503 to feedback: the ids the events were given. A deadline may pass after the log took them, so a retry
    #: resends these ids, which count once.
    event_ids: list[str] | None = None


STATUSES: dict[int, str] = {
    400: "The body could not be read as JSON of the request's schema.",
    401: "Missing or wrong X-API-Key header.",
    404: "No such item.",
    409: "The item id is already in the catalogue or registered.",
    413: "The body is larger than the service's max_body_bytes.",
    422: "A field breaks the contract; `detail` names it (`loc`).",
    503: "Not served: the service is past capacity, a part of it did not answer within its deadline, or the "
    "feedback log could not make the write durable. Retry after the Retry-After header's seconds. Feedback may have "
    "been logged when a deadline passed: retry it with the `event_ids` of this answer, which count once.",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that can answer ``statuses`` besides its success."""
    described: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        described[status] = {"model": Problem, "description": STATUSES[status]}
        if status == 503:
            described[status]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}
    return described


def contract(app: Any, *, accepted_events: list[str], rating_scale: RatingScale, protect_reads: bool) -> dict[str, Any]:
    """The app's OpenAPI document with what the service's settings and its model decide: the accepted event types (an
    enum), a ``rate`` event's value range, and the key on reads when they are protected. Built once, then cached
    (a swap to a model with another rating scale drops the cached one)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    event = document["components"]["schemas"]["FeedbackEvent"]
    event["properties"]["event"] = {"type": "string", "enum": list(accepted_events), "title": "Event"}
    bounds = {"minimum": rating_scale.low, "maximum": rating_scale.high}
    value = {"type": "number", **{bound: limit for bound, limit in bounds.items() if limit is not None}}
    rate = {"properties": {"event": {"const": "rate"}}, "required": ["event"]}
    event["allOf"] = [{"if": rate, "then": {"properties": {"value": value}, "required": ["value"]}}]
    if protect_reads:
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                if path.startswith("/v1/") and method == "get":
                    operation["security"] = [{"APIKeyHeader": []}]
                    operation["responses"].setdefault("401", {"description": STATUSES[401]})
    app.openapi_schema = document
    return document
