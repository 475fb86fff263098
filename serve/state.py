"""Server-side state shared by every replica: users' recent histories, item popularity, and the items
registered at run time (cold start).

One ``ServerState`` lives in the single UserStateStore replica. It is rebuilt at start from the users'
histories the training data holds for serving (``data.user_histories``, when given) and from the
feedback log, and kept current by the feedback the service receives; registered items are appended to
a small JSON-lines file and survive restarts.
In production, a shared store such as Redis would hold the same keys (``history:<user>``,
``popularity``, ``items``) so that the store could scale out.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sortedcontainers import SortedList

from common.errors import InputError
from data.feedback_log import REGISTRY_FILE, RegisteredItem, read_feedback_log, read_registered_items
from data.user_histories import read_user_histories
from serve.config import StateConfig


class ItemExists(InputError):
    """An item id that is already in the catalogue or registered."""


@dataclass(frozen=True)
class UserContext:
    user_id: str
    history: list[str]  # most recent last, at most ``history_length`` items
    history_ratings: list[float]  # the rating the user gave each of them (raw scale); NaN: none
    seen: list[str]  # every remembered item of the user (up to ``max_seen_items``)
    registry_version: int  # registered items up to this sequence number exist


@dataclass
class ServerState:
    config: StateConfig
    registry_file: Path
    #: Per user, (ts in ms, item_id, raw rating or NaN) in time order: an event reported late takes its place in
    #: time, as it does when the state is rebuilt from the log.
    histories: dict[str, deque[tuple[int, str, float]]] = field(default_factory=dict)
    popularity: Counter[str] = field(default_factory=Counter)
    #: (-count, item id) of every counted item, in order: the most popular first, ties by id. Built by the first
    #: ``popular`` (after the rebuild's many counts), then kept in order by each count, so that a cold-start answer
    #: reads its first items instead of sorting the catalogue.
    _ranking: SortedList | None = None
    registered: list[RegisteredItem] = field(default_factory=list)
    #: The last ``config.remembered_event_ids`` feedback event ids applied, oldest first, so that a client's retry
    #: (same id) does not count twice, as retraining's reader drops it too. In this process's memory, as the
    #: histories are; bounded, as the log they are rebuilt from is not.
    applied_events: OrderedDict[str, None] = field(default_factory=OrderedDict)
    registered_ids: set[str] = field(default_factory=set)

    # --- start ---------------------------------------------------------------------------------

    @classmethod
    def rebuild(cls, config: StateConfig, state_dir: str | Path, *, training_data: str | None, feedback_log: str, wal_dir: str | Path) -> ServerState:
        state = cls(config, Path(state_dir) / REGISTRY_FILE)
        events = [read_user_histories(training_data)] if training_data else []
        logged = read_feedback_log(feedback_log, wal_dir)
        logged = logged.filter(pc.is_in(logged["event"], pa.array(config.history_events)))
        rated = pc.equal(logged["event"], "rate")
        events.append(
            pa.table(
                {
                    "event_id": logged["event_id"],
                    "user_id": logged["user_id"],
                    "item_id": logged["item_id"],
                    "ts": logged["ts"],
                    "rating": pc.if_else(rated, logged["value"], pa.scalar(None, pa.float64())),
                }
            )
        )
        state.record_many(pa.concat_tables(events, promote_options="permissive").sort_by("ts"))
        state.load_registry()
        return state

    def load_registry(self) -> None:
        # Replicas take registered items by consecutive seq: a line the reader skipped must leave no gap.
        for seq, item in enumerate(read_registered_items(str(self.registry_file)), start=1):
            self._add_registered(replace(item, seq=seq))

    # --- users ---------------------------------------------------------------------------------

    def record_many(self, events: pa.Table) -> None:
        """(event_id or null, user_id, item_id, ts, rating) rows extend the histories and the popularity counts."""
        ratings = pc.fill_null(events["rating"], np.nan).to_pylist()
        event_ids = events["event_id"].to_pylist() if "event_id" in events.column_names else [None] * events.num_rows
        columns = zip(event_ids, events["user_id"].to_pylist(), events["item_id"].to_pylist(), events["ts"].to_pylist(), ratings)
        for event_id, user_id, item_id, ts, rating in columns:
            self.record(user_id, item_id, ts, rating, event_id)

    def record(self, user_id: str, item_id: str, ts: int, rating: float | None = None, event_id: str | None = None) -> bool:
        """An interaction at ``ts`` (ms); ``rating``: the raw rating of a ``rate`` event, None for other events.
        An event whose id was applied before changes nothing; returns whether this one did."""
        if event_id is not None:
            if event_id in self.applied_events:
                return False
            self.applied_events[event_id] = None
            if len(self.applied_events) > self.config.remembered_event_ids:
                self.applied_events.popitem(last=False)
        history = self.histories.get(user_id)
        if history is None:
            history = self.histories[user_id] = deque(maxlen=self.config.max_seen_items)
        entry = (ts, item_id, math.nan if rating is None else float(rating))
        if not history or history[-1][0] <= ts:
            history.append(entry)
        else:  # late: after every entry at or before its time, as a stable sort by time would put it
            position = bisect.bisect_right([when for when, _, _ in history], ts)
            if len(history) == history.maxlen:
                if position == 0:  # older than everything remembered: a rebuild would have forgotten it too
                    self._count(item_id)
                    return True
                history.popleft()
                position -= 1
            history.insert(position, entry)
        self._count(item_id)
        return True

    def _count(self, item_id: str) -> None:
        count = self.popularity[item_id]
        self.popularity[item_id] = count + 1
        if self._ranking is not None:
            if count:
                self._ranking.remove((-count, item_id))
            self._ranking.add((-count - 1, item_id))

    def context(self, user_id: str) -> UserContext:
        remembered = self.histories.get(user_id, ())
        recent = list(remembered)[-self.config.history_length :]
        return UserContext(
            user_id,
            [item for _, item, _ in recent],
            [rating for _, _, rating in recent],
            list(dict.fromkeys(item for _, item, _ in remembered)),
            len(self.registered),
        )

    def popular(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` most interacted-with items and their counts, most popular first (ties by id)."""
        if self._ranking is None:
            self._ranking = SortedList((-count, item_id) for item_id, count in self.popularity.items())
        return [(item_id, -negative_count) for negative_count, item_id in self._ranking.islice(0, n)]

    # --- registered items ----------------------------------------------------------------------

    def register(self, item_id: str, title: str, text: str, ts: int) -> RegisteredItem:
        """Add an item (durably: appended and fsynced before it counts); ItemExists if the id is taken."""
        if item_id in self.registered_ids:
            raise ItemExists(f"item_id: {item_id!r} is already registered")
        item = RegisteredItem(len(self.registered) + 1, item_id, title, text, ts)
        self.registry_file.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(item.__dict__) + "\n"
        with open(self.registry_file, "a+b") as file:
            # After a write torn by a crash, the new line must not continue the torn one.
            file.write((b"\n" if _ends_mid_line(file) else b"") + line.encode())
            file.flush()
            os.fsync(file.fileno())
        self._add_registered(item)
        return item

    def _add_registered(self, item: RegisteredItem) -> None:
        self.registered.append(item)
        self.registered_ids.add(item.item_id)

    def registered_since(self, version: int) -> list[RegisteredItem]:
        return self.registered[version:]


def _ends_mid_line(file: BinaryIO) -> bool:
    size = file.seek(0, os.SEEK_END)
    if size == 0:
        return False
    file.seek(size - 1)
    return file.read(1) != b"\n"
