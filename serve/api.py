"""The HTTP API's request and response bodies (pydantic), with the limits that are part of the contract.

A body that breaks them is answered 422 by FastAPI, naming the field (``loc``). The limit on a whole
body's size is ``ServeConfig.max_body_bytes`` (413).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag

MAX_K = 1000
MAX_HISTORY_ITEMS = 500
MAX_EXCLUDE_ITEMS = 1000
MAX_TEXT_CHARS = 4000
MAX_FEEDBACK_EVENTS = 5000
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
EventId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,31}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
ContextValue = Annotated[str, StringConstraints(max_length=256)] | int | float | bool


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(Body):
    user_id: Id
    k: int = Field(10, ge=1, le=MAX_K)
    #: Items the user interacted with recently, oldest first; added after the server-side history.
    history: list[Id] = Field(default_factory=list, max_length=MAX_HISTORY_ITEMS)
    #: Free text describing what the user likes; used for users with little or no history.
    interests: Text | None = None
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE_ITEMS)
    #: Request context (device, page, ...): recorded in the server log with the request id.
    context: dict[Annotated[str, StringConstraints(max_length=64)], ContextValue] = Field(default_factory=dict, max_length=32)


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float
    p_like: float | None
    rating: float | None
    because: list[str]  # history items that contributed most to this item's score


class RecommendResponse(BaseModel):
    request_id: str
    model_version: str
    items: list[RecommendedItem]
    ignored_history: list[str]  # history items the model does not know


class FeedbackEvent(Body):
    event_id: EventId | None = None  # a uuid4 is assigned when absent; retries should resend the same id
    user_id: Id
    item_id: Id
    event: EventType
    value: float | None = Field(None, allow_inf_nan=False)
    request_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    ts: int | None = Field(None, ge=0, le=MAX_TS_MS)  # milliseconds since the epoch; None: now


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
    item_id: Id
    title: Annotated[str, StringConstraints(max_length=500)] | None = None
    text: Text  # what the item encoder reads, e.g. "Title. Genres: ... description"


class ItemInfo(BaseModel):
    item_id: str
    title: str
    registered: bool  # added at run time (cold start) rather than trained on
    attributes: list[int]


class ModelInfo(BaseModel):
    model_version: str
    #: The artifact's figures by split, as training recorded them: ``{"validation": {...}, "test": {...}}``.
    metrics: dict[str, dict[str, float]]
    data_manifest_hash: str | None
    created_at: str | None
    num_items: int
    registered_items: int
