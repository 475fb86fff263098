"""Per-user histories and the train / validation / test splits, built per partition, with the rows they hold
by id for serving (``data.user_histories``).

Each block holds whole users (the dataset is hash-partitioned by ``user_id``). A user's history is
their kept interactions sorted by (timestamp, source position), so ties keep source order. Splits:

* ``leave_one_out``: the last interaction is the test target, the one before it the validation
  target, the rest train; a user with fewer than 3 interactions keeps everything in train.
* ``temporal``: two global time cut points, taken so that about ``validation_fraction`` and
  ``test_fraction`` of all events fall after them (events at a cut point's exact second all go
  to the later window, since a time cut cannot split a second); every event in a window is one
  validation/test row.

Cold items are withheld from training: their interactions leave the train sequences but stay
usable as validation/test targets and inside evaluation histories. Lists are built with numpy
index arithmetic and ``pa.ListArray.from_arrays``, never a Python loop per user.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.clean import POSITION, SECONDS_PER_DAY, kept_interactions, run_ranks, run_starts, time_order
from data.config import FeatureConfig, SplitConfig
from data.features import RatingNormalisation, like_labels, lookup
from data.schema import EVAL_SEQUENCE, PAD_INDEX, TRAIN_SEQUENCE
from data.user_histories import user_histories

TRAIN, VALIDATION, TEST = 0, 1, 2  # indices into data.schema.SPLITS
HISTORY_COLUMNS = ("user_id", "item_id", "timestamp", "event", "value", POSITION)
LEAVE_ONE_OUT_MIN_INTERACTIONS = 3

#: Per-block tables the driver sums.
DAY_COUNTS = pa.schema([("day", pa.int64()), ("count", pa.int64())])
SECOND_COUNTS = pa.schema([("timestamp", pa.int64()), ("count", pa.int64())])
RATING_SUMS = pa.schema([("user_id", pa.string()), ("rating_sum", pa.float64()), ("rating_count", pa.int64())])


@dataclass(frozen=True)
class SplitPlan:
    """What every partition needs to split its users the same way."""

    strategy: str
    cold_items: pa.Array
    cutoffs: tuple[int, int] | None = None  # temporal: first second of validation, of test


# --- Cold items and temporal cut points (computed on the driver from small tables) ---------------


def choose_cold_items(item_ids: pa.Array, fraction: float, seed: int) -> pa.Array:
    """``round(fraction * len(item_ids))`` items drawn with ``seed``, in vocabulary order."""
    count = round(fraction * len(item_ids))
    chosen = np.sort(np.random.default_rng(seed).choice(len(item_ids), size=count, replace=False))
    return item_ids.take(pa.array(chosen, pa.int64()))


def window_ranks(num_events: int, config: SplitConfig) -> tuple[int, int]:
    """0-based ranks, in time order, of the first validation and the first test event."""
    test_rank = num_events - math.ceil(num_events * config.test_fraction)
    return max(0, test_rank - math.ceil(num_events * config.validation_fraction)), test_rank


def day_counts(block: pa.Table) -> pa.Table:
    """Kept events per UTC day."""
    days = np.floor_divide(kept_interactions(block, ("timestamp",))["timestamp"].to_numpy(), SECONDS_PER_DAY)
    counts = pa.table({"day": days}).group_by("day").aggregate([("day", "count")])
    return pa.table({"day": counts["day"], "count": pc.cast(counts["day_count"], pa.int64())}, schema=DAY_COUNTS)


def second_counts(block: pa.Table, days: list[int]) -> pa.Table:
    """Kept events per second, on the given days only."""
    timestamp = kept_interactions(block, ("timestamp",))["timestamp"].to_numpy()
    chosen = pa.table({"timestamp": timestamp[np.isin(np.floor_divide(timestamp, SECONDS_PER_DAY), days)]})
    counts = chosen.group_by("timestamp").aggregate([("timestamp", "count")])
    return pa.table({"timestamp": counts["timestamp"], "count": pc.cast(counts["timestamp_count"], pa.int64())}, schema=SECOND_COUNTS)


def _value_at_rank(counts: pa.Table, key: str, rank: int) -> tuple[int, int]:
    """(value holding the event of this rank, number of events before that value) from value counts."""
    counts = counts.group_by(key).aggregate([("count", "sum")]).sort_by(key)
    cumulative = np.cumsum(counts["count_sum"].to_numpy())
    position = int(np.searchsorted(cumulative, rank, side="right"))
    before = int(cumulative[position - 1]) if position else 0
    return int(counts[key][position].as_py()), before


def timestamps_at_ranks(ranks: tuple[int, ...], days: pa.Table, seconds_on: Callable[[list[int]], pa.Table]) -> tuple[int, ...]:
    """Exact timestamps of events at these time-order ranks, from per-day counts plus per-second
    counts of the few days that hold the ranks (so no pass needs all timestamps at once)."""
    located = [_value_at_rank(days, "day", rank) for rank in ranks]
    seconds = seconds_on(sorted({day for day, _ in located}))
    day_of_second = np.floor_divide(seconds["timestamp"].to_numpy(), SECONDS_PER_DAY)
    return tuple(_value_at_rank(seconds.filter(pa.array(day_of_second == day)), "timestamp", rank - before)[0] for rank, (day, before) in zip(ranks, located))


# --- Per partition ----------------------------------------------------------------------------------


@dataclass
class _Histories:
    """A partition's kept interactions in history order with their split and grouping arrays."""

    rows: pa.Table
    split: np.ndarray
    is_cold: np.ndarray
    user_run: np.ndarray  # run (user) id of each row
    user_first: np.ndarray  # first row of each user


def _histories(block: pa.Table, plan: SplitPlan) -> _Histories:
    rows = time_order(kept_interactions(block, HISTORY_COLUMNS))
    user_run, rank, user_first = run_ranks(run_starts(rows["user_id"]))
    sizes = np.diff(np.append(user_first, rows.num_rows))[user_run]
    if plan.strategy == "leave_one_out":
        from_end = sizes - 1 - rank
        eligible = sizes >= LEAVE_ONE_OUT_MIN_INTERACTIONS
        split = np.select([eligible & (from_end == 0), eligible & (from_end == 1)], [TEST, VALIDATION], TRAIN)
    else:
        assert plan.cutoffs is not None
        timestamp = rows["timestamp"].to_numpy()
        split = np.select([timestamp >= plan.cutoffs[1], timestamp >= plan.cutoffs[0]], [TEST, VALIDATION], TRAIN)
    is_cold = pc.is_in(rows["item_id"], value_set=plan.cold_items).to_numpy(zero_copy_only=False)
    return _Histories(rows, split.astype(np.int8), is_cold, user_run, user_first)


def training_rating_sums(block: pa.Table, *, plan: SplitPlan) -> pa.Table:
    """Per user: sum and count of the values of their training interactions (for user_center)."""
    histories = _histories(block, plan)
    training = (histories.split == TRAIN) & ~histories.is_cold
    rows = histories.rows.filter(pa.array(training))
    rows = rows.filter(pc.is_valid(rows["value"]))
    sums = rows.group_by("user_id").aggregate([("value", "sum"), ("value", "count")])
    return pa.table(
        {
            "user_id": sums["user_id"],
            "rating_sum": sums["value_sum"],
            "rating_count": pc.cast(sums["value_count"], pa.int64()),
        },
        schema=RATING_SUMS,
    )


def gather_ranges(values: np.ndarray, begins: np.ndarray, ends: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """List i holds ``values[begins[i]:ends[i]]``; the ranges may overlap."""
    lengths = (ends - begins).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("a partition's lists exceed 2**31 values; use more partitions (ray.num_partitions)")
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - begins, lengths)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[index], value_type))


def _chunks(run_starts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(begins, ends, run firsts) of consecutive chunks within each run, cut back from the run's end, in row
    order: each holds ``size`` rows that have an earlier row in the run (the oldest chunk the rest), and the
    oldest also the run's first row, so a run of 7 with size 3 gives [0, 4), [4, 7), each with first 0."""
    _, _, firsts = run_ranks(run_starts)
    run_ends = np.append(firsts[1:], len(run_starts)).astype(np.int64)
    per_run = np.maximum(1, -(-(run_ends - firsts - 1) // size))
    run_of_chunk = np.repeat(np.arange(len(firsts)), per_run)
    rank_in_run = np.arange(len(run_of_chunk)) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    ends = run_ends[run_of_chunk] - (per_run[run_of_chunk] - 1 - rank_in_run) * size
    begins = np.where(rank_in_run == 0, firsts[run_of_chunk], ends - size)
    return begins, ends, firsts[run_of_chunk]


@dataclass
class Sequences:
    tables: dict[str, pa.Table]  # "train" in TRAIN_SEQUENCE, "validation" / "test" in EVAL_SEQUENCE
    user_histories: pa.Table  # USER_HISTORIES: the interactions the tables hold, by id, raw
    train_interactions: int  # interactions in the train split's rows
    cold_withheld: int  # train-split interactions left out because their item is cold


def build_sequences(
    block: pa.Table,
    *,
    plan: SplitPlan,
    users: pa.Table,
    items: pa.Table,
    features: FeatureConfig,
    rating: RatingNormalisation,
) -> Sequences:
    """The partition's train rows (TRAIN_SEQUENCE), validation / test rows (EVAL_SEQUENCE) and the users'
    histories for serving (USER_HISTORIES).

    ``users`` is the user vocabulary with ``rating_offset``, ``items`` the item vocabulary.
    Rows come out in user-index order (the vocabularies are sorted like the partition's rows),
    evaluation rows of a user in time order.
    """
    histories = _histories(block, plan)
    rows = histories.rows
    user_idx = lookup(rows["user_id"], users["user_id"])
    item_idx = lookup(rows["item_id"], items["item_id"])
    raw = pc.fill_null(rows["value"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    offsets = users["rating_offset"].to_numpy()[user_idx - (PAD_INDEX + 1)].astype(np.float64)
    ratings = rating.apply(raw, offsets)
    likes = like_labels(rows["event"], rows["value"], features)
    timestamps = rows["timestamp"].to_numpy()

    # Train: each user's non-cold training interactions cut into consecutive chunks of max_history
    # next-item targets (the oldest chunk also holds the user's first item, which is nobody's target),
    # counted back from the most recent, so every interaction is in exactly one row. The history
    # before each chunk comes along as context.
    train = np.flatnonzero((histories.split == TRAIN) & ~histories.is_cold)
    begins, ends, run_firsts = _chunks(run_starts(user_idx[train]), features.max_history)
    context_begins = np.maximum(run_firsts, begins - features.max_history)
    train_table = pa.table(
        {
            "user_idx": pa.array(user_idx[train][begins], pa.int32()),
            "items": gather_ranges(item_idx[train], begins, ends, pa.int32()),
            "ratings": gather_ranges(ratings[train], begins, ends, pa.float32()),
            "likes": gather_ranges(likes[train], begins, ends, pa.int8()),
            "timestamps": gather_ranges(timestamps[train], begins, ends, pa.int64()),
            "history": gather_ranges(item_idx[train], context_begins, begins, pa.int32()),
            "history_ratings": gather_ranges(ratings[train], context_begins, begins, pa.float32()),
        },
        schema=TRAIN_SEQUENCE,
    )

    # Evaluation: one row per target; history and seen items come from the full history.
    tables = {"train": train_table}
    for name, code in (("validation", VALIDATION), ("test", TEST)):
        targets = np.flatnonzero(histories.split == code)
        first = histories.user_first[histories.user_run[targets]]
        tables[name] = pa.table(
            {
                "user_idx": pa.array(user_idx[targets], pa.int32()),
                "history": gather_ranges(item_idx, np.maximum(first, targets - features.max_history), targets, pa.int32()),
                "history_ratings": gather_ranges(ratings, np.maximum(first, targets - features.max_history), targets, pa.float32()),
                "seen_items": gather_ranges(item_idx, first, targets, pa.int32()),
                "target_item": pa.array(item_idx[targets], pa.int32()),
                "target_rating": pa.array(ratings[targets], pa.float32()),
                "target_rating_raw": pa.array(raw[targets].astype(np.float32), pa.float32()),
                "target_like": pa.array(likes[targets], pa.int8()),
                "target_timestamp": pa.array(timestamps[targets], pa.int64()),
                "is_cold_target": pa.array(histories.is_cold[targets], pa.bool_()),
            },
            schema=EVAL_SEQUENCE,
        )
    in_train = histories.split == TRAIN
    withheld = in_train & histories.is_cold
    return Sequences(tables, user_histories(rows, withheld), len(train), int(withheld.sum()))
