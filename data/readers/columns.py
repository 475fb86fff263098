"""Column conversion with a reason for every refused value: a file's columns → the canonical types.

Each converter returns the column converted, null where the file's value was missing or did not convert;
``keep_valid`` then keeps the rows every check accepts and sends the others to the quarantine, each with
the first reason that applies (``"<column> not an integer"``, ``"<column> missing"``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import InputError
from data.readers.files import FileRows


@dataclass
class CheckedColumn:
    """A converted column: null where the file's value was missing or could not be converted."""

    column: str  # the file's column, named in the reason
    values: pa.ChunkedArray
    problem: str  # why a present value did not convert: "not an integer", ...
    required: bool = True  # a missing value refuses the row


def _is_text(values: pa.ChunkedArray) -> bool:
    return pa.types.is_string(values.type) or pa.types.is_large_string(values.type)


def integers(raw: FileRows, column: str) -> pa.ChunkedArray:
    values = raw.table[column]
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64())
    if pa.types.is_floating(values.type):
        whole = pc.and_(pc.is_finite(values), pc.equal(pc.floor(values), values))
        return pc.cast(pc.if_else(whole, values, None), pa.int64())
    if _is_text(values):
        text = pc.utf8_trim_whitespace(values)
        return pc.cast(pc.if_else(pc.match_substring_regex(text, r"^[+-]?\d{1,18}$"), text, None), pa.int64())
    raise InputError(f"{raw.name}: column {column!r} holds {values.type}, not integers")


def numbers(raw: FileRows, column: str) -> pa.ChunkedArray:
    values = raw.table[column]
    if _is_text(values):
        text = pc.utf8_trim_whitespace(values)
        number = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
        values = pc.cast(pc.if_else(pc.match_substring_regex(text, number), text, None), pa.float64())
    elif pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        values = pc.cast(values, pa.float64())
    else:
        raise InputError(f"{raw.name}: column {column!r} holds {values.type}, not numbers")
    return pc.if_else(pc.is_finite(values), values, None)


def texts(raw: FileRows, column: str) -> pa.ChunkedArray:
    values = raw.table[column]
    try:
        text = pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"{raw.name}: column {column!r} holds {values.type}, not text") from None
    return pc.if_else(pc.equal(text, ""), None, text)


def integer_ids(raw: FileRows, column: str) -> CheckedColumn:
    """MovieLens ids: integers, kept as their decimal text."""
    return CheckedColumn(column, pc.cast(integers(raw, column), pa.string()), "not an integer")


def text_ids(raw: FileRows, column: str) -> CheckedColumn:
    return CheckedColumn(column, texts(raw, column), "empty")


_SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000}


def timestamps(raw: FileRows, column: str, unit: Literal["s", "ms", "us", "iso"]) -> CheckedColumn:
    """Seconds since the epoch from integers in ``unit``, ISO-8601 text, or a Parquet time column."""
    values = raw.table[column]
    if pa.types.is_temporal(values.type):
        return CheckedColumn(column, _temporal_seconds(values), "not a time")
    if unit == "iso":
        if not _is_text(values):
            raise InputError(f"{raw.name}: column {column!r} holds {values.type}, not ISO-8601 text (timestamp_unit)")
        return CheckedColumn(column, _iso_seconds(values), "not an ISO-8601 time")
    seconds = integers(raw, column)
    if unit != "s":
        seconds = pc.divide(seconds, _SECONDS_PER_UNIT[unit])
    return CheckedColumn(column, seconds, "not an integer")


def _temporal_seconds(values: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_timestamp(values.type) and values.type.tz is not None:
        values = pc.cast(values, pa.timestamp(values.type.unit))  # the stored instants are UTC
    return pc.cast(pc.cast(values, pa.timestamp("s"), safe=False), pa.int64())


def _iso_seconds(text: pa.ChunkedArray) -> pa.ChunkedArray:
    # pyarrow's cast is fast but all-or-nothing, and wants either every value with a zone offset
    # or none; pandas handles the mixed case and gives NaT (→ null) for what it cannot parse.
    for target in (pa.timestamp("us", "UTC"), pa.timestamp("us")):
        try:
            return _temporal_seconds(pc.cast(text, target))
        except pa.ArrowInvalid:
            pass
    parsed = pd.to_datetime(text.to_pandas(), utc=True, errors="coerce", format="ISO8601")
    return _temporal_seconds(pa.chunked_array([pa.array(parsed)]))


def keep_valid(raw: FileRows, checks: list[CheckedColumn]) -> tuple[pa.Array | None, pa.Table]:
    """Rows every check accepts (None: all of them) and the file's quarantine, in file order."""
    if all(check.values.null_count == 0 for check in checks):  # the usual case, known without a pass
        return None, raw.quarantine([])
    problems: list[tuple[pa.ChunkedArray, str]] = []
    for check in checks:
        present = pc.is_valid(raw.table[check.column])
        problems.append((pc.and_(present, pc.is_null(check.values)), f"{check.column} {check.problem}"))
        if check.required:
            problems.append((pc.invert(present), f"{check.column} missing"))
    no_reason = pa.scalar(None, pa.string())
    reason = pc.coalesce(*[pc.if_else(mask, text, no_reason) for mask, text in problems]).combine_chunks()
    refused = pc.is_valid(reason)
    refused_rows = zip(
        raw.positions[refused.to_numpy(zero_copy_only=False)].tolist(),
        reason.filter(refused).to_pylist(),
        raw.render(raw.table.filter(refused)),
    )
    return pc.invert(refused), raw.quarantine(list(refused_rows))


def kept(values: Any, keep: pa.Array | None) -> Any:
    """``values`` (an array or table) at the rows ``keep`` marks; None keeps all."""
    return values if keep is None else values.filter(keep)
