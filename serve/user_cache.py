"""User contexts cached in the ingress replicas, kept correct by the UserStateStore's invalidations.

Every recommendation starts with the user's context (history, seen items), and the UserStateStore holds the one
copy of it; asking it costs a call between replicas per batch of requests (2 ms of a lone request's 6 here). An
ingress replica keeps the contexts it read (``ContextCache``), and the store tells every such replica which users
changed (``ChangeFeed``) **before** it acknowledges the change: once ``POST /v1/feedback`` or ``POST /v1/items`` has
answered, no replica answers from a context older than it.

The protocol, a lease per reader:

- A reader (an ingress replica) long-polls ``watch(reader, epoch, applied)``: the call acknowledges every change up to
  ``applied`` and comes back with the changes after it (user ids, or "everything"), at once or after ``poll_s``.
- A change gets the next sequence number; the store answers the call that made it once every reader has acknowledged
  it, or has not been heard from for ``lease_s`` (it is then forgotten).
- A reader answers from its cache only within ``lease_s`` of *sending* its last answered watch; the store heard that
  call later than it was sent, so when the store gives up on a reader, the reader has stopped using its cache. A reader
  that comes back is told to drop everything; so is one that the store's restart (a new ``epoch``) or a gap in the
  retained changes left behind.
- A context read from the store at sequence ``s`` is kept only if the reader has applied no change after ``s``: a
  change it applied before the read answered would otherwise never remove it. One it has yet to apply removes it
  later, at worst for nothing.

A reader whose polls fail (a store restarting, a network fault) reads every context from the store until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from serve.config import ContextCacheConfig
from serve.state import UserContext


@dataclass(frozen=True)
class Changes:
    """A watch's answer: the users whose context changed after the reader's ``applied`` up to ``seq``; None: drop everything."""

    epoch: str
    seq: int
    users: frozenset[str] | None


@dataclass(frozen=True)
class Contexts:
    """Contexts read from the store, at its ``epoch`` and change ``seq``."""

    epoch: str
    seq: int
    contexts: list[UserContext]


@dataclass
class _Reader:
    last_seen: float  # time.monotonic() when its latest watch call arrived
    acked: int


@dataclass
class ChangeFeed:
    """The store's side: numbered changes, the readers that must acknowledge them, and their leases."""

    settings: ContextCacheConfig
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0
    clock: Callable[[], float] = time.monotonic
    _changes: deque[tuple[int, frozenset[str] | None]] = field(default_factory=deque)
    _readers: dict[str, _Reader] = field(default_factory=dict)
    _news: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on a change or an acknowledgement

    async def publish(self, users: Iterable[str] | None) -> None:
        """Number a change of ``users``' contexts (None: of every context) and return once every reader has
        applied it, or lost its lease."""
        self.seq += 1
        seq = self.seq
        self._changes.append((seq, None if users is None else frozenset(users)))
        while len(self._changes) > self.settings.retained_changes:
            self._changes.popleft()
        self._announce()
        while True:
            now = self.clock()
            waiting = {name: reader for name, reader in self._readers.items() if reader.acked < seq}
            for name, reader in list(waiting.items()):
                if now >= reader.last_seen + self.settings.lease_s:
                    del self._readers[name]
                    del waiting[name]
            if not waiting:
                return
            expires = min(reader.last_seen for reader in waiting.values()) + self.settings.lease_s
            await self._news_within(expires - now)

    async def watch(self, reader_id: str, epoch: str | None, applied: int) -> Changes:
        """``reader_id`` has applied every change up to ``applied`` of ``epoch``; the changes after it, once there
        are some or after ``poll_s``."""
        reader = self._readers.get(reader_id)
        if reader is None or epoch != self.epoch or applied < self._oldest_kept() - 1:
            # Told to drop everything, it holds nothing read before now.
            self._readers[reader_id] = _Reader(self.clock(), self.seq)
            return Changes(self.epoch, self.seq, None)
        reader.last_seen = self.clock()
        reader.acked = max(reader.acked, applied)
        self._announce()
        deadline = self.clock() + self.settings.poll_s
        while self.seq <= applied and self.clock() < deadline:
            await self._news_within(deadline - self.clock())
        changed: set[str] = set()
        for seq, users in self._changes:
            if seq > applied:
                if users is None:
                    return Changes(self.epoch, self.seq, None)
                changed |= users
        return Changes(self.epoch, self.seq, frozenset(changed))

    def _announce(self) -> None:
        """Wake every waiter: a change was numbered or acknowledged."""
        self._news.set()
        self._news = asyncio.Event()

    async def _news_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._news.wait(), max(0.0, seconds))

    def leave(self, reader_id: str) -> None:
        """A reader that shuts down: no change waits for it."""
        self._readers.pop(reader_id, None)

    def _oldest_kept(self) -> int:
        return self._changes[0][0] if self._changes else self.seq + 1


class ContextCache:
    """An ingress replica's side: the contexts it read, served while its lease holds, dropped as the store's
    changes arrive. ``watch``, ``read`` and ``leave`` are the store's calls (``UserStateStore.watch``,
    ``.contexts_at``, ``.leave``)."""

    def __init__(
        self,
        settings: ContextCacheConfig,
        watch: Callable[[str, str | None, int], Awaitable[Changes]],
        read: Callable[[list[str]], Awaitable[Contexts]],
        leave: Callable[[str], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self._watch, self._read, self._leave, self.clock = watch, read, leave, clock
        self.reader_id = uuid.uuid4().hex
        self.entries: OrderedDict[str, UserContext] = OrderedDict()  # least recently used first
        self.epoch: str | None = None
        self.applied = -1
        self.valid_until = 0.0
        self.hits = self.misses = 0
        self._watcher: asyncio.Task | None = None

    async def contexts(self, user_ids: list[str]) -> list[UserContext]:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._follow())
        found: dict[str, UserContext] = {}
        if self.clock() < self.valid_until:
            for user_id in user_ids:
                if user_id in self.entries:
                    self.entries.move_to_end(user_id)
                    found[user_id] = self.entries[user_id]
        missing = list(dict.fromkeys(user_id for user_id in user_ids if user_id not in found))
        self.hits += len(user_ids) - len(missing)
        self.misses += len(missing)
        if missing:
            read = await self._read(missing)
            fresh = dict(zip(missing, read.contexts))
            found.update(fresh)
            if read.epoch == self.epoch and self.applied <= read.seq and self.clock() < self.valid_until:
                self.entries.update(fresh)
                while len(self.entries) > self.settings.max_users:
                    self.entries.popitem(last=False)
        return [found[user_id] for user_id in user_ids]

    async def _follow(self) -> None:
        while True:
            sent = self.clock()
            try:
                changes = await self._watch(self.reader_id, self.epoch, self.applied)
            except Exception:
                # The store is away: every context is read from it (and fails there) until it answers again.
                self.valid_until = 0.0
                await asyncio.sleep(self.settings.poll_s)
                continue
            if changes.users is None or changes.epoch != self.epoch:
                self.entries.clear()
            else:
                for user_id in changes.users:
                    self.entries.pop(user_id, None)
            self.epoch, self.applied = changes.epoch, changes.seq
            self.valid_until = sent + self.settings.lease_s

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.valid_until = 0.0
        with contextlib.suppress(Exception):  # a store already gone: the lease lets it go on without this reader
            await self._leave(self.reader_id)
