"""The ingress replicas' cache of user contexts (``serve.user_cache``), its protocol driven directly: a store's
change feed and two readers in one event loop, the store's calls made in line. Over HTTP, with two Recommender
replicas, in tests/test_serve.py."""

from __future__ import annotations

import asyncio
import time

from serve.config import ContextCacheConfig
from serve.state import UserContext
from serve.user_cache import ChangeFeed, ContextCache, Contexts

SETTINGS = ContextCacheConfig(lease_s=0.6, poll_s=0.2)


def context(user_id: str, *history: str) -> UserContext:
    return UserContext(user_id, list(history), [float("nan")] * len(history), list(history), 0)


class Store:
    """The UserStateStore's side: the contexts and the change feed; ``record`` returns once the change is acknowledged."""

    def __init__(self) -> None:
        self.contexts = {"u": context("u", "1"), "v": context("v", "2")}
        self.feed = ChangeFeed(SETTINGS)
        self.reads = 0
        self.read_gate: asyncio.Event | None = None  # when set, a read answers only once it opens

    async def read(self, user_ids: list[str]) -> Contexts:
        self.reads += 1
        answer = Contexts(self.feed.epoch, self.feed.seq, [self.contexts[user_id] for user_id in user_ids])
        if self.read_gate is not None:
            await self.read_gate.wait()
        return answer

    async def watch(self, reader_id: str, epoch: str | None, applied: int):
        return await self.feed.watch(reader_id, epoch, applied)

    async def leave(self, reader_id: str) -> None:
        self.feed.leave(reader_id)

    async def record(self, user_id: str, item_id: str) -> None:
        old = self.contexts[user_id]
        self.contexts[user_id] = context(user_id, *old.history, item_id)
        await self.feed.publish({user_id})

    def reader(self) -> ContextCache:
        return ContextCache(SETTINGS, self.watch, self.read, self.leave)


async def following(cache: ContextCache) -> None:
    """Until the cache holds a lease from the store."""
    await cache.contexts([])
    while time.monotonic() >= cache.valid_until:
        await asyncio.sleep(0.01)


def test_a_change_acknowledged_by_the_store_is_never_answered_from_a_replicas_old_context():
    async def scenario() -> None:
        store = Store()
        readers = [store.reader(), store.reader()]
        for reader in readers:
            await following(reader)
            assert await reader.contexts(["u", "v"]) == [store.contexts["u"], store.contexts["v"]]
        reads = store.reads
        for reader in readers:  # now from the cache
            assert (await reader.contexts(["u"]))[0].history == ["1"]
        assert store.reads == reads and all(reader.hits == 1 for reader in readers)

        await store.record("u", "7")  # returns once both readers dropped u
        for reader in readers:
            assert "u" not in reader.entries and "v" in reader.entries
            assert (await reader.contexts(["u"]))[0].history == ["1", "7"]
            assert (await reader.contexts(["v"]))[0].history == ["2"]
        assert store.reads == reads + 2  # u read again by each, v still cached
        for reader in readers:
            await reader.close()
        assert not store.feed._readers

    asyncio.run(scenario())


def test_a_silent_replica_holds_a_change_up_for_its_lease_at_most_and_stops_answering_from_its_cache():
    async def scenario() -> None:
        store = Store()
        live, silent = store.reader(), store.reader()
        for reader in (live, silent):
            await following(reader)
            await reader.contexts(["u"])
        silent._watcher.cancel()  # hung or dead: it polls no more
        started = time.monotonic()
        await asyncio.wait_for(store.record("u", "7"), timeout=10 * SETTINGS.lease_s)
        waited = time.monotonic() - started
        assert waited <= SETTINGS.lease_s + 1.0
        assert list(store.feed._readers) == [live.reader_id]
        # The silent reader's lease ran out before the store gave up on it: it reads the store, and caches nothing.
        assert time.monotonic() >= silent.valid_until
        assert (await silent.contexts(["u"]))[0].history == ["1", "7"]
        assert (await live.contexts(["u"]))[0].history == ["1", "7"]
        # Back, it is told to drop everything it held.
        silent._watcher = None
        silent.entries["u"] = context("u", "stale")
        await following(silent)
        assert "u" not in silent.entries and silent.epoch == store.feed.epoch
        for reader in (live, silent):
            await reader.close()

    asyncio.run(scenario())


def test_a_context_read_before_a_change_the_replica_already_applied_is_used_once_and_not_kept():
    async def scenario() -> None:
        store = Store()
        reader = store.reader()
        await following(reader)
        store.read_gate = asyncio.Event()
        lookup = asyncio.ensure_future(reader.contexts(["u"]))  # read at the store's present sequence, answer held back
        await asyncio.sleep(0.05)
        await store.record("u", "7")  # the reader applies the change before the read's answer arrives
        assert reader.applied == store.feed.seq
        store.read_gate.set()
        assert (await lookup)[0].history == ["1"]  # the request raced the feedback: either answer is right
        assert "u" not in reader.entries
        assert (await reader.contexts(["u"]))[0].history == ["1", "7"]
        await reader.close()

    asyncio.run(scenario())


def test_a_restarted_store_makes_every_replica_drop_its_cache():
    async def scenario() -> None:
        store = Store()
        reader = store.reader()
        await following(reader)
        await reader.contexts(["u", "v"])
        old_epoch = reader.epoch
        store.feed = ChangeFeed(SETTINGS)  # the restarted store: a new epoch, no readers, sequence 0
        store.contexts["u"] = context("u", "1", "8")
        while reader.epoch == old_epoch:
            await asyncio.sleep(0.01)
        assert not reader.entries
        assert (await reader.contexts(["u"]))[0].history == ["1", "8"]
        await reader.close()

    asyncio.run(scenario())
