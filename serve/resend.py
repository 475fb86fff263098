"""Rows an ingress replica must get to another deployment that may be restarting: queued, sent from a background
task, sent again after a failure (the impressions for the FeedbackLogger; the feedback events for the
UserStateStore, which applies an event id once, so sending one twice is harmless)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from serve.errors import cause_of

logger = logging.getLogger(__name__)

#: The outcomes ``count`` is told of, with the number of rows: sent, failed and queued again, dropped.
SENT, RETRIED, DROPPED = "sent", "retried", "dropped"


class ResendQueue:
    """``add`` queues rows; a background task sends everything queued in one ``send`` call every ``interval_s``
    until nothing is left. Rows a call failed on go back to the front of the queue, and then, past ``max_pending``
    rows, the oldest are dropped. ``close`` makes one last attempt."""

    def __init__(
        self, send: Callable[[list[Any]], Awaitable[Any]], *, what: str, interval_s: float, max_pending: int, count: Callable[[str, int], None]
    ) -> None:
        self.send, self.what, self.interval_s, self.max_pending, self.count = send, what, interval_s, max_pending, count
        self._rows: list[Any] = []
        self._sender: asyncio.Future | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: list[Any]) -> None:
        self._rows.extend(rows)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_until_empty())

    async def close(self) -> None:
        """A replica's graceful shutdown: what is queued is sent once more, and dropped if that fails."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if not await self._send_once():
            self.count(DROPPED, len(self._rows))
            self._rows = []

    async def _send_until_empty(self) -> None:
        while self._rows:
            await asyncio.sleep(self.interval_s)
            await self._send_once()

    async def _send_once(self) -> bool:
        rows, self._rows = self._rows, []
        if not rows:
            return True
        try:
            await self.send(rows)
        except asyncio.CancelledError:  # close() during a send: the rows are its to send
            self._rows = rows + self._rows
            raise
        except Exception as error:
            logger.warning("could not send %d %s (%s); they are sent again", len(rows), self.what, cause_of(error))
            self.count(RETRIED, len(rows))
            self._rows = rows + self._rows
            self._drop_excess()
            return False
        self.count(SENT, len(rows))
        return True

    def _drop_excess(self) -> None:
        excess = len(self._rows) - self.max_pending
        if excess > 0:
            del self._rows[:excess]
            self.count(DROPPED, excess)
