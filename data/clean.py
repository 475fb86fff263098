"""Cleaning with full accounting: every step marks the rows it drops instead of deleting them.

Rows carry their source ``position`` and two marker columns, ``drop_stage`` and
``drop_reason`` (null while a row is kept). The ``source`` ("<file>:<line>") is the widest column
and only needed for dropped rows, so it stays out of the shuffled data: a position encodes the input
part (one file, or one file's rows handed over as a table) and the line or row number there, and
``quarantine_records`` rebuilds the dropped rows' sources from it. A step only looks at rows still kept and marks the ones
it drops with ``clean:<step>`` and a reason; the marked rows become the quarantine at the end, so
nothing disappears silently and each step's before/after counts follow from the markers.

The functions work on one block of a Ray dataset that is hash-partitioned by ``user_id``: all rows
of a user are in the same block, so the per-user steps (duplicates, bot filter, the user side of
the k-core) are exact within a block. Everything is vectorised with pyarrow/numpy/pandas.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.config import CleanConfig
from data.schema import INTERACTIONS, QUARANTINE

POSITION = "position"  # (input part << PART_SHIFT) + line or row number in that part: unique, in source order
PART_SHIFT = 40  # line and row numbers stay below 2**40
DROP_STAGE = "drop_stage"
DROP_REASON = "drop_reason"

#: The cleaning steps in the order they run (quarantine stage "clean:<step>").
STEPS = ("range", "item_metadata", "duplicates", "bot_filter", "kcore")
SECONDS_PER_DAY = 86_400

KEY_FIELDS = ("user_id", "item_id", "timestamp", "event", "value")  # what makes two rows duplicates

#: Per-block count tables, small enough to sum on the driver.
KEPT_COUNTS = pa.schema([("kind", pa.string()), ("key", pa.string()), ("count", pa.int64())])  # kind: user/item
DROPPED_COUNTS = pa.schema([("stage", pa.string()), ("reason", pa.string()), ("count", pa.int64())])


def stage(step: str) -> str:
    return f"clean:{step}"


def positions(parts: pa.Array | pa.ChunkedArray, numbers: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """The positions of rows from their input ``parts`` and their line or row ``numbers`` there."""
    return pc.add(pc.shift_left(pc.cast(parts, pa.int64()), PART_SHIFT), pc.cast(numbers, pa.int64()))


def sources_at(positions: pa.Array | pa.ChunkedArray, prefixes: pa.Array) -> pa.Array:
    """The "<file>:<line>" sources of ``positions``; ``prefixes[part]`` is what precedes the number in each part."""
    parts = pc.shift_right(positions, PART_SHIFT)
    numbers = pc.bit_wise_and(positions, (1 << PART_SHIFT) - 1)
    return pc.binary_join_element_wise(prefixes.take(parts), pc.cast(numbers, pa.string()), "")


# --- Grouping helpers on sorted columns ---------------------------------------------------------


def time_order(table: pa.Table) -> pa.Table:
    """Rows by user, then time; ties keep source order."""
    return table.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), (POSITION, "ascending")])


def run_starts(*columns: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """For columns sorted together: True where the tuple of values differs from the row before."""
    n = len(columns[0])
    starts = np.zeros(n, dtype=bool)
    if n == 0:
        return starts
    starts[0] = True
    for column in columns:
        if isinstance(column, np.ndarray):
            starts[1:] |= column[1:] != column[:-1]
        else:
            starts[1:] |= pc.not_equal(column.slice(1), column.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return starts


def run_ranks(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run id of each row, rank of each row within its run, first row of each run)."""
    run_ids = np.cumsum(starts) - 1
    firsts = np.flatnonzero(starts)
    return run_ids, np.arange(len(starts)) - firsts[run_ids], firsts


# --- Marking --------------------------------------------------------------------------------------


def kept_mask(block: pa.Table) -> np.ndarray:
    return pc.is_null(block[DROP_STAGE]).to_numpy(zero_copy_only=False)


def kept_interactions(block: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """The given columns of the rows still kept."""
    return block.select(list(columns)).filter(pa.array(kept_mask(block)))


def _drop(block: pa.Table, mask: np.ndarray, step: str, reason: str) -> pa.Table:
    """Mark the rows of ``mask`` that are still kept as dropped by ``step``."""
    newly = mask & kept_mask(block)
    if not newly.any():
        return block
    condition = pa.array(newly)
    for name, value in ((DROP_STAGE, stage(step)), (DROP_REASON, reason)):
        column = pc.if_else(condition, pa.scalar(value, pa.string()), block[name])
        block = block.set_column(block.schema.get_field_index(name), name, column)
    return block


def _mask_at(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


# --- Steps 1-4: per partition -------------------------------------------------------------------


def clean_partition(block: pa.Table, *, config: CleanConfig, known_items: pa.Array | None) -> pa.Table:
    """Adds the drop markers, then: range check, item metadata, exact duplicates and the bot filter."""
    markers = pa.nulls(block.num_rows, pa.string())
    block = block.append_column(DROP_STAGE, markers).append_column(DROP_REASON, markers)
    block = drop_out_of_range(block, config)
    if config.require_item_metadata:
        assert known_items is not None
        unknown = ~pc.is_in(block["item_id"], value_set=known_items).to_numpy(zero_copy_only=False)
        block = _drop(block, unknown, "item_metadata", "item has no metadata")
    if config.drop_exact_duplicates:
        block = drop_duplicates(block)
    if config.max_events_per_user_per_day is not None:
        block = drop_bot_days(block, config.max_events_per_user_per_day)
    return block


def drop_out_of_range(block: pa.Table, config: CleanConfig) -> pa.Table:
    """Values outside [min_value, max_value] (a null value passes), then timestamps outside their range."""
    value = block["value"]
    outside = np.zeros(block.num_rows, dtype=bool)
    if config.min_value is not None:
        outside |= pc.fill_null(pc.less(value, config.min_value), False).to_numpy(zero_copy_only=False)
    if config.max_value is not None:
        outside |= pc.fill_null(pc.greater(value, config.max_value), False).to_numpy(zero_copy_only=False)
    block = _drop(block, outside, "range", f"value outside [{config.min_value}, {config.max_value}]")
    block = _drop(block, pc.fill_null(pc.is_nan(value), False).to_numpy(zero_copy_only=False), "range", "value is NaN")
    timestamp = block["timestamp"].to_numpy()
    outside = np.zeros(block.num_rows, dtype=bool)
    if config.min_timestamp is not None:
        outside |= timestamp < config.min_timestamp
    if config.max_timestamp is not None:
        outside |= timestamp > config.max_timestamp
    return _drop(block, outside, "range", f"timestamp outside [{config.min_timestamp}, {config.max_timestamp}]")


def drop_duplicates(block: pa.Table) -> pa.Table:
    """Rows equal in user, item, timestamp, event and value to an earlier kept row (source order)."""
    rows = np.flatnonzero(kept_mask(block))
    kept = block.select([*KEY_FIELDS, POSITION]).take(rows).to_pandas()
    kept["row"] = rows
    kept = kept.sort_values(POSITION, kind="stable")
    # pandas treats two missing values as equal here, as a duplicate check should.
    duplicates = kept["row"].to_numpy()[kept.duplicated(subset=list(KEY_FIELDS), keep="first").to_numpy()]
    return _drop(block, _mask_at(block.num_rows, duplicates), "duplicates", "exact duplicate of an earlier row")


def drop_bot_days(block: pa.Table, max_events: int) -> pa.Table:
    """Beyond ``max_events`` kept events of one user on one UTC day, drop the later ones.

    Policy: keep the first ``max_events`` of the day in time order and drop only the excess. A burst
    of automated events usually follows genuine activity; dropping the whole day (or the user)
    would lose that activity, while capping the day removes exactly what exceeds a plausible rate.
    """
    rows = np.flatnonzero(kept_mask(block))
    kept = time_order(block.select(["user_id", "timestamp", POSITION]).take(rows).append_column("row", pa.array(rows)))
    day = np.floor_divide(kept["timestamp"].to_numpy(), SECONDS_PER_DAY)
    _, rank, _ = run_ranks(run_starts(kept["user_id"], day))
    excess = kept["row"].to_numpy()[rank >= max_events]
    return _drop(
        block,
        _mask_at(block.num_rows, excess),
        "bot_filter",
        f"more than {max_events} events of the user on one UTC day",
    )


# --- Step 5: the iterative k-core ---------------------------------------------------------------


def drop_sparse(block: pa.Table, *, sparse_items: pa.Array, config: CleanConfig) -> pa.Table:
    """One k-core pass: drop rows of globally sparse items, then of users left below the bound.

    Users are whole inside a block, so the user side needs no global counts; the caller recounts
    items afterwards and repeats while some item falls below ``min_item_interactions``.
    """
    if len(sparse_items):
        of_sparse_item = pc.is_in(block["item_id"], value_set=sparse_items).to_numpy(zero_copy_only=False)
        block = _drop(block, of_sparse_item, "kcore", f"item has fewer than {config.min_item_interactions} interactions (k-core)")
    counts = kept_interactions(block, ("user_id",)).group_by("user_id").aggregate([("user_id", "count")])
    sparse_users = counts.filter(pc.less(counts["user_id_count"], config.min_user_interactions))["user_id"]
    if len(sparse_users):
        of_sparse_user = pc.is_in(block["user_id"], value_set=sparse_users).to_numpy(zero_copy_only=False)
        block = _drop(block, of_sparse_user, "kcore", f"user has fewer than {config.min_user_interactions} interactions (k-core)")
    return block


def count_kept(block: pa.Table) -> pa.Table:
    """Kept interactions per user and per item: (kind, key, count), small enough for the driver."""
    kept = kept_interactions(block, ("user_id", "item_id"))
    parts = []
    for kind in ("user", "item"):
        counts = kept.group_by(f"{kind}_id").aggregate([(f"{kind}_id", "count")])
        parts.append(
            pa.table(
                {
                    "kind": pa.array([kind] * counts.num_rows, pa.string()),
                    "key": counts[f"{kind}_id"],
                    "count": pc.cast(counts[f"{kind}_id_count"], pa.int64()),
                },
                schema=KEPT_COUNTS,
            )
        )
    return pa.concat_tables(parts)


def count_dropped(block: pa.Table) -> pa.Table:
    """Dropped rows per (stage, reason)."""
    dropped = block.select([DROP_STAGE, DROP_REASON, POSITION]).filter(pc.is_valid(block[DROP_STAGE]))
    counts = dropped.group_by([DROP_STAGE, DROP_REASON]).aggregate([(POSITION, "count")])
    return pa.table(
        {
            "stage": counts[DROP_STAGE],
            "reason": counts[DROP_REASON],
            "count": pc.cast(counts[f"{POSITION}_count"], pa.int64()),
        },
        schema=DROPPED_COUNTS,
    )


# --- Results --------------------------------------------------------------------------------------


def quarantine_records(block: pa.Table, prefixes: pa.Array) -> pa.Table:
    """The dropped rows in QUARANTINE layout, in source order, each rendered as JSON; ``prefixes`` as for ``sources_at``."""
    dropped = block.filter(pc.is_valid(block[DROP_STAGE])).sort_by(POSITION)
    dropped = dropped.append_column("source", sources_at(dropped[POSITION], prefixes))
    rows = dropped.select(INTERACTIONS.names)
    # NaN is not JSON; a NaN value shows as null (the reason already says it was NaN).
    value = pc.if_else(pc.fill_null(pc.is_nan(rows["value"]), False), pa.scalar(None, pa.float64()), rows["value"])
    rows = rows.set_column(rows.schema.get_field_index("value"), "value", value)
    records = [json.dumps(row, ensure_ascii=False) for row in rows.to_pylist()]
    return pa.table(
        {
            "stage": dropped[DROP_STAGE],
            "reason": dropped[DROP_REASON],
            "source": dropped["source"],
            "record": pa.array(records, pa.string()),
        },
        schema=QUARANTINE,
    )
