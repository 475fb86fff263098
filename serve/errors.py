"""Errors the service answers with a status of their own (the HTTP mapping is in ``serve.http``), and what
another deployment raised."""

from __future__ import annotations


class ServiceUnavailable(Exception):
    """The request was not served, and a retry later may be: answered 503 with Retry-After (and, for feedback, the
    ``event_ids`` the events were given, which a retry resends)."""

    def __init__(self, message: str, *, event_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.event_ids = event_ids


class FeedbackLogUnavailable(ServiceUnavailable):
    """The feedback log could not make a write durable; nothing of it was acknowledged."""


def cause_of(error: BaseException) -> BaseException:
    """The exception raised inside another deployment, without Ray's wrapping."""
    return getattr(error, "cause", None) or error
