"""What every reader returns: ``SourceTables``, the canonical tables of ``data.schema`` built from checked columns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data.readers.columns import CheckedColumn, keep_valid, kept, texts
from data.readers.files import FileRows
from data.schema import INTERACTIONS, ITEMS_BASE, QUARANTINE, USER_ID_FIELD


@dataclass
class SourceTables:
    """Everything one source (or a concatenation of sources) provides, in canonical form."""

    interactions: pa.Table  # exactly data.schema.INTERACTIONS, rows in source order
    items: pa.Table  # data.schema.ITEMS_BASE; null where the source lacks a field
    users: pa.Table | None  # user_id + string attribute columns, or None
    quarantine: pa.Table  # data.schema.QUARANTINE, one row per line that could not be read
    files: list[str]  # every file read (absolute paths, or URIs of remote files), for the manifest's content hash


def source_tables(files: Sequence[Path | str], interactions: pa.Table, items: pa.Table, users: pa.Table | None, quarantines: list[pa.Table]) -> SourceTables:
    """``files``: local paths, made absolute, or names from ``common.storage.file_uri``, kept as they are."""
    return SourceTables(
        interactions=interactions,
        items=items,
        users=users,
        quarantine=pa.concat_tables([QUARANTINE.empty_table(), *quarantines]),
        files=[str(path.resolve()) if isinstance(path, Path) else path for path in files],
    )


def interactions_from(
    raw: FileRows,
    user: CheckedColumn,
    item: CheckedColumn,
    timestamp: CheckedColumn,
    value: CheckedColumn | None,
    event: CheckedColumn | str,
    also: tuple[CheckedColumn, ...] = (),
) -> tuple[pa.Table, pa.Table, pa.Array | None]:
    """INTERACTIONS of the rows every check accepts, the file's quarantine, and which rows those are.

    ``event`` is a column or the one event of every row; ``also`` are further checks a row must pass.
    """
    event_check = [event] if isinstance(event, CheckedColumn) else []
    checks = [*also, user, item, *([value] if value else []), timestamp, *event_check]
    keep, quarantine = keep_valid(raw, checks)
    positions = raw.positions if keep is None else raw.positions[keep.to_numpy(zero_copy_only=False)]
    table = pa.table(
        {
            "user_id": kept(user.values, keep),
            "item_id": kept(item.values, keep),
            "timestamp": kept(timestamp.values, keep),
            "event": kept(event.values, keep) if isinstance(event, CheckedColumn) else pa.repeat(event, len(positions)),
            "value": kept(value.values, keep) if value else pa.nulls(len(positions), pa.float64()),
            "source": raw.sources(positions),
        },
        schema=INTERACTIONS,
    )
    return table, quarantine, keep


def items_from(raw: FileRows, item: CheckedColumn, fields: Callable[[pa.Array | None], dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    """ITEMS_BASE of the rows with a valid id; ``fields(keep)`` gives their canonical fields, the rest are null."""
    keep, quarantine = keep_valid(raw, [item])
    columns = {"item_id": kept(item.values, keep), **fields(keep)}
    count = len(columns["item_id"])
    typed = {f.name: pc.cast(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type) for f in ITEMS_BASE}
    return pa.table(typed, schema=ITEMS_BASE), quarantine


def users_from(raw: FileRows, user: CheckedColumn) -> tuple[pa.Table, pa.Table]:
    """``user_id`` plus every other column of the file, as text."""
    keep, quarantine = keep_valid(raw, [user])
    attributes = {name: kept(texts(raw, name), keep) for name in raw.table.column_names if name != user.column}
    schema = pa.schema([USER_ID_FIELD, *[pa.field(name, pa.string()) for name in attributes]])
    return pa.table({USER_ID_FIELD.name: kept(user.values, keep), **attributes}, schema=schema), quarantine
