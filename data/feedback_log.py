"""What the serving stage leaves on disk for retraining, and how it is read back: the feedback log and
the registry of items registered at run time.

The writers live in ``serve/`` (``serve.feedback_log.FeedbackLog``, ``serve.state.ServerState.register``);
this module owns the layout they write and every reader of it, so that retraining (the ``feedback``
source, ``data.readers.feedback``) and the service rebuilding its state at start read the same rows.

Layout::

    <wal_dir>/<owner>.lock                held by the live writer
    <wal_dir>/<owner>.<seq>.wal           JSON lines, one ``data.schema.FEEDBACK_LOG`` row each
    <log>/part-<owner>-<seq>.parquet      the Parquet part of that segment
    <state_dir>/items.jsonl               one ``RegisteredItem`` as JSON per line, in registration order

The Parquet parts are every ``part-*.parquet`` file under the log folder at any depth (a log copied
into dated folders reads the same), or the log itself when it is one Parquet file; the folder may be a
pyarrow URI (``file://``, ``s3://``, ``gs://``). The WAL is local disk: its segments are read only
when the caller names the WAL folder (the service does; retraining reads what was flushed).
"""

from __future__ import annotations

import json
import logging
import posixpath
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common import storage
from common.errors import InputError
from data.schema import FEEDBACK_LOG

logger = logging.getLogger(__name__)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
WAL_SUFFIX = ".wal"
LOCK_SUFFIX = ".lock"
REGISTRY_FILE = "items.jsonl"  # inside the service's state_dir


# --- The feedback log ------------------------------------------------------------------------------


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the schema's fields) → a ``FEEDBACK_LOG`` table."""
    return pa.Table.from_pylist([{name: row.get(name) for name in FEEDBACK_LOG.names} for row in rows], schema=FEEDBACK_LOG)


def read_wal_segment(segment: Path) -> list[dict[str, Any]]:
    """The rows of one WAL segment. A line that does not parse (a write torn by a crash, never
    acknowledged) is skipped with a warning."""
    rows, torn = [], 0
    with open(segment, "rb") as file:
        for line in file:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                torn += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn += 1
    if torn:
        logger.warning("%s: skipped %d unreadable line(s), writes a crash cut short", segment, torn)
    return rows


@dataclass(frozen=True)
class LogPart:
    """One Parquet part of a feedback log."""

    name: str  # relative to the log folder (the file's own name when the log is one file): what row sources cite
    uri: str  # the file as a path or URI that ``data.storage.resolve`` opens again, e.g. to hash it
    path: str  # on ``filesystem``
    filesystem: pafs.FileSystem

    def read(self, schema: pa.Schema | None = None) -> pa.Table:
        """The part as stored, or conformed to ``schema`` (missing columns null); InputError when unreadable."""
        try:
            return pq.read_table(self.path, filesystem=self.filesystem, schema=schema)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"{self.uri}: not a readable Parquet file: {err}") from None


def log_parts(log: storage.Location) -> list[LogPart]:
    """The log's Parquet parts in name order (see the module docstring); none when nothing is there yet."""
    filesystem = log.filesystem
    found = filesystem.get_file_info(log.path)
    if found.type == pafs.FileType.NotFound:
        return []
    if found.type == pafs.FileType.File:
        return [LogPart(posixpath.basename(log.path), storage.file_uri(log, log.path), log.path, filesystem)]
    parts = [
        LogPart(posixpath.relpath(info.path, log.path), storage.file_uri(log, info.path), info.path, filesystem)
        for info in filesystem.get_file_info(pafs.FileSelector(log.path, recursive=True))
        if info.type == pafs.FileType.File and info.base_name.startswith(PART_PREFIX) and info.base_name.endswith(PART_SUFFIX)
    ]
    return sorted(parts, key=lambda part: part.name)


def first_occurrences(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True at the first row of each distinct value: a client that retries logs the same ``event_id``
    again, and the first row is the one acknowledged."""
    order = pa.table({"value": values, "order": np.arange(len(values))})
    first = order.group_by("value", use_threads=False).aggregate([("order", "min")])["order_min"]
    is_first = np.zeros(len(values), dtype=bool)
    is_first[first.to_numpy()] = True
    return is_first


def read_feedback_log(log_uri: str, wal_dir: str | Path | None = None) -> pa.Table:
    """Every row logged so far as a ``FEEDBACK_LOG`` table: the Parquet parts, plus the WAL segments not
    yet flushed when ``wal_dir`` is given; the first row of each ``event_id`` is kept.

    A live writer may flush meanwhile: it publishes a segment's part, then deletes the segment. So the segments
    are read first, and the parts listed after: a row is in a segment read here, or in a part published before
    the listing (a segment gone before it could be read was flushed, its part published before it went)."""
    logged_in_wal = []
    if wal_dir is not None and Path(wal_dir).is_dir():
        for segment in sorted(Path(wal_dir).glob(f"*{WAL_SUFFIX}")):
            try:
                logged_in_wal.append(rows_to_table(read_wal_segment(segment)))
            except FileNotFoundError:
                continue
    parts = [part.read(FEEDBACK_LOG) for part in log_parts(storage.resolve(log_uri, "feedback log"))]
    table = pa.concat_tables([rows_to_table([]), *parts, *logged_in_wal])  # parts first: the first row of an event_id is kept
    return table.filter(pa.array(first_occurrences(table["event_id"])))


# --- Items registered at run time -------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredItem:
    """One line of the registry."""

    seq: int  # 1, 2, ...: registration order, the same on every replica
    item_id: str
    title: str  # "" when none was given
    text: str  # what the item encoder reads, as the client sent it
    ts: int  # registration time, milliseconds since the epoch


def read_registered_items(uri: str, refused: list[tuple[str, str, str]] | None = None) -> list[RegisteredItem]:
    """The registered items in file order (a path or URI; no file: nothing registered yet).

    A line that is not a whole record (a write torn by a crash, not JSON, a field missing or of another
    type) was never acknowledged or was edited by hand: it is skipped with a warning naming file and line,
    and added to ``refused`` as (reason, "<file name>:<line>", line) when that is given.
    """
    location = storage.resolve(uri, "item registry")
    if not storage.exists(location):
        return []
    with location.filesystem.open_input_stream(location.path, compression=None) as stream:
        lines = stream.read().split(b"\n")
    fields = typing.get_type_hints(RegisteredItem)
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="replace")
        try:
            record = json.loads(line)
        except ValueError as err:  # UnicodeDecodeError included
            problem = f"not valid JSON: {err}"
        else:
            problem = _registry_record_problem(record, fields)
        if problem is None:
            items.append(RegisteredItem(**{name: record[name] for name in fields}))
            continue
        logger.warning("%s:%d: skipped, %s", uri, number, problem)
        if refused is not None:
            refused.append((problem, f"{posixpath.basename(location.path)}:{number}", text))
    return items


def _registry_record_problem(record: Any, fields: dict[str, type]) -> str | None:
    """Why ``record`` is not a ``RegisteredItem``; None when it is (fields it does not know are ignored)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kind in fields.items():
        if name not in record:
            return f"missing field {name!r}"
        if type(record[name]) is not kind:  # exactly: isinstance(True, int) holds, and JSON true is no seq
            return f"field {name!r} is {type(record[name]).__name__}, not {kind.__name__}"
    return None
