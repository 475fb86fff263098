"""The ``feedback`` source: polyrec's own feedback log (its Parquet parts, found by ``data.feedback_log``, on
local disk or an object store), and optionally the service's registry of items registered at run time.

Only the configured interaction events are read (impressions are not interactions); an event id seen
before is a client's retry and goes to the quarantine as a duplicate.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from common import storage
from common.errors import InputError
from data.config import SourceConfig
from data.feedback_log import PART_PREFIX, PART_SUFFIX, first_occurrences, log_parts, read_registered_items
from data.readers.canonical import SourceTables, interactions_from, source_tables
from data.readers.columns import CheckedColumn, kept, numbers, text_ids, texts, timestamps
from data.readers.files import FileRows, Refused, json_rows, quarantine_table
from data.schema import ITEMS_BASE


def read_feedback(config: SourceConfig) -> SourceTables:
    if config.path is None:
        raise InputError("source.path: required for format 'feedback' (a feedback-log folder or Parquet file, path or URI)")
    log = storage.resolve(config.path, "source.path")
    parts = log_parts(log)
    if not parts:
        missing = f"no {PART_PREFIX}*{PART_SUFFIX} files in the feedback-log folder" if storage.exists(log) else "not found (the feedback log)"
        raise InputError(f"{config.path}: {missing}")
    wanted_events = pa.array(config.feedback_events, pa.string())
    logs, row_counts, quarantines = [], [], []
    for part in parts:
        # A part may lie on an object store (so not read_parquet) and in a subfolder, which its sources name.
        raw = FileRows.of_parquet(Path(part.name), part.read(), part.name)
        raw.require_columns(dict.fromkeys(["event_id", "ts", "user_id", "item_id", "event", "value"]))
        row_counts.append(raw.table.num_rows)
        # Impressions and the like are not interactions; a row without an event is kept, to be refused.
        wanted = pc.or_kleene(pc.is_in(raw.table["event"], wanted_events), pc.is_null(raw.table["event"]))
        raw = raw.filtered(wanted.to_numpy(zero_copy_only=False))
        event_id = CheckedColumn("event_id", texts(raw, "event_id"), "empty")
        interactions, quarantine, keep = interactions_from(
            raw,
            text_ids(raw, "user_id"),
            text_ids(raw, "item_id"),
            timestamps(raw, "ts", "ms"),
            CheckedColumn("value", numbers(raw, "value"), "not a number", required=False),
            CheckedColumn("event", texts(raw, "event"), "empty"),
            also=(event_id,),
        )
        logs.append((interactions, kept(event_id.values, keep), kept(raw.table, keep)))
        quarantines.append(quarantine)
    if sum(row_counts) == 0:
        raise InputError(f"{config.path}: no events in the feedback log")
    interactions = pa.concat_tables([table for table, _, _ in logs])
    event_ids = pa.chunked_array([ids for _, ids, _ in logs], pa.string())
    first = first_occurrences(event_ids)
    if not first.all():
        duplicate = pa.array(~first)
        originals = pa.concat_tables([table for _, _, table in logs], promote_options="permissive").filter(duplicate)
        sources = interactions["source"].filter(duplicate).to_pylist()
        duplicates = [("duplicate event_id", source, text) for source, text in zip(sources, json_rows(originals))]
        quarantines.append(quarantine_table(duplicates))
        interactions = interactions.filter(pa.array(first))
    files = [part.uri for part in parts]
    items = ITEMS_BASE.empty_table()
    if config.items_path is not None:
        items, registry_quarantine, registry_files = _registered_items(config.items_path)
        files += registry_files
        quarantines.append(registry_quarantine)
    return source_tables(files, interactions, items, None, quarantines)


def _registered_items(uri: str) -> tuple[pa.Table, pa.Table, list[str]]:
    """The service's item registry as ITEMS_BASE rows (title, and the registered text as ``full_text``: the
    service encoded it as is), the quarantine of its unreadable lines, and the file when there is one."""
    registry = storage.resolve(uri, "source.items_path")
    files = [storage.file_uri(registry, registry.path)] if storage.exists(registry) else []
    refused: list[Refused] = []
    registered = read_registered_items(uri, refused)
    rows = [{"item_id": item.item_id, "title": item.title or None, "full_text": item.text} for item in registered]
    return pa.Table.from_pylist(rows, schema=ITEMS_BASE), quarantine_table(refused), files
