"""The generic ``table`` source: interactions, and optionally items and users, as Parquet, CSV or TSV files
whose columns ``source.columns`` maps to the canonical fields."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from common.errors import InputError
from data.config import SourceConfig
from data.readers.canonical import SourceTables, items_from, read_rows_from, read_rows_of, source_tables, stream_interactions, users_from
from data.readers.columns import CheckedColumn, integers, kept, numbers, text_ids, texts, timestamps
from data.readers.files import FileRows, position_prefix, read_table_file, table_file_batches, table_file_spans
from data.schema import ITEM_TEXT_FIELDS, ITEMS_BASE

#: The list<string> item fields; a text column is split into one by ``columns.list_separator``.
_LIST_FIELDS = tuple(field.name for field in ITEMS_BASE if pa.types.is_list(field.type))


def read_generic_table(config: SourceConfig) -> SourceTables:
    if config.path is None:
        raise InputError("source.path: required for format 'table' (a Parquet or CSV interactions file)")
    mapping = config.columns
    unknown = sorted(set(mapping.item_fields) - set(ITEM_TEXT_FIELDS))
    if unknown:
        raise InputError(f"columns.item_fields: unknown field(s) {unknown}; known: {', '.join(ITEM_TEXT_FIELDS)}")
    path = Path(config.path)
    mapped = {"user_id": mapping.user_id, "item_id": mapping.item_id, "timestamp": mapping.timestamp}
    mapped |= {"event": mapping.event, "value": mapping.value}

    def read_rows(raw: FileRows) -> pa.Table:
        raw.require_columns({column: f"columns.{name}" for name, column in mapped.items() if column})
        return read_rows_from(
            raw,
            text_ids(raw, mapping.user_id),
            text_ids(raw, mapping.item_id),
            timestamps(raw, mapping.timestamp, config.timestamp_unit),
            CheckedColumn(mapping.value, numbers(raw, mapping.value), "not a number", False) if mapping.value else None,
            CheckedColumn(mapping.event, texts(raw, mapping.event), "empty") if mapping.event else config.default_event,
        )

    reads = [functools.partial(read_rows_of, functools.partial(table_file_batches, path, span), read_rows) for span in table_file_spans(path)]
    interactions = stream_interactions(path, position_prefix(path), reads)
    files: list[Path] = [path]
    quarantines: list[pa.Table] = []
    items, users = ITEMS_BASE.empty_table(), None
    if config.items_path is not None:
        items_raw = read_table_file(Path(config.items_path), {})
        fields = mapping.item_fields
        wanted = {mapping.item_id: "columns.item_id"} | {c: f"columns.item_fields.{f}" for f, c in fields.items()}
        items_raw.require_columns(wanted)

        def item_fields(keep: pa.Array | None) -> dict[str, Any]:
            return {f: kept(_item_field(items_raw, f, c, mapping.list_separator), keep) for f, c in fields.items()}

        items, item_quarantine = items_from(items_raw, text_ids(items_raw, mapping.item_id), item_fields)
        files.append(items_raw.path)
        quarantines.append(item_quarantine)
    if config.users_path is not None:
        users_raw = read_table_file(Path(config.users_path), {})
        users_raw.require_columns({mapping.user_id: "columns.user_id"})
        users, user_quarantine = users_from(users_raw, text_ids(users_raw, mapping.user_id))
        files.append(users_raw.path)
        quarantines.append(user_quarantine)
    return source_tables(files, interactions, items, users, quarantines)


def _item_field(raw: FileRows, name: str, column: str, list_separator: str) -> pa.ChunkedArray:
    """An items-file column as the canonical field ``name``; a year that is not an integer is null."""
    values = raw.table[column]
    if name == "year":
        return pc.cast(integers(raw, column), pa.int32())
    if name in _LIST_FIELDS:
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            return pc.cast(values, pa.list_(pa.string()))
        return pc.split_pattern(texts(raw, column), list_separator)
    return texts(raw, column)
