"""What every reader returns: ``SourceTables``, the canonical tables of ``data.schema`` built from checked columns.

The interactions of a file that may be large are not read by the driver: ``stream_interactions`` gives a Ray
dataset whose read tasks parse the file batch by batch, each task a span of it (``READ_ROWS``: each
interaction, or each refused line with its reason, by its line or row number), and only the first batch is
parsed here, so that a file a reader cannot use at all is refused at once, naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from common.errors import InputError
from data.readers.columns import CheckedColumn, keep_valid, kept, texts
from data.readers.files import FileRows
from data.schema import INTERACTIONS, ITEMS_BASE, QUARANTINE, USER_ID_FIELD

#: Rows as a streamed reader passes them on: an interaction (``reason`` null), or a line it refused (the
#: interaction fields null, ``record`` the raw line); ``part`` picks the prefix of the row's source
#: (``StreamedInteractions.prefixes``), ``number`` is its line or row number.
READ_ROWS = pa.schema(
    [
        *(pa.field(f.name, f.type) for f in INTERACTIONS if f.name != "source"),
        pa.field("part", pa.int32()),
        pa.field("number", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("record", pa.string()),
    ]
)
_INTERACTION_FIELDS = [f.name for f in INTERACTIONS if f.name != "source"]


@dataclass
class StreamedInteractions:
    """Interactions as a Ray dataset of ``READ_ROWS``; a row's source is ``prefixes[part]`` + its number."""

    rows: ray.data.Dataset
    prefixes: list[str]  # "<file>:" (text lines) or "<file>:row " (Parquet rows)

    @classmethod
    def of_table(cls, interactions: pa.Table) -> StreamedInteractions:
        """Interactions already in the driver (INTERACTIONS), each source a prefix then a line or row number."""
        parts = pc.extract_regex(interactions["source"], r"^(?P<prefix>.*?)(?P<number>\d+)$")
        if parts.null_count:
            raise ValueError("every interaction's source must end in its line or row number")
        prefixes = pc.struct_field(parts, "prefix").combine_chunks().dictionary_encode()
        rows = interactions.drop_columns(["source"]).append_column("part", pc.cast(prefixes.indices, pa.int32()))
        rows = rows.append_column("number", pc.cast(pc.struct_field(parts, "number"), pa.int64()))
        rows = rows.append_column("reason", pa.nulls(len(rows), pa.string())).append_column("record", pa.nulls(len(rows), pa.string()))
        return cls(ray.data.from_arrow(rows.cast(READ_ROWS)), prefixes.dictionary.to_pylist())

    def collected(self) -> tuple[pa.Table, pa.Table]:
        """INTERACTIONS and the QUARANTINE of the refused lines, each in source order, in the driver."""
        rows = pa.concat_tables([READ_ROWS.empty_table(), *ray.get(self.rows.to_arrow_refs())]).sort_by([("part", "ascending"), ("number", "ascending")])
        sources = pc.binary_join_element_wise(pa.array(self.prefixes, pa.string()).take(rows["part"]), pc.cast(rows["number"], pa.string()), "")
        rows = rows.append_column("source", sources)
        refused = pc.is_valid(rows["reason"])
        interactions = rows.filter(pc.invert(refused)).select(INTERACTIONS.names).cast(INTERACTIONS)
        refusals = rows.filter(refused)
        stage = pa.repeat(pa.scalar("read"), refusals.num_rows)
        quarantine = pa.table([stage, refusals["reason"], refusals["source"], refusals["record"]], schema=QUARANTINE)
        return interactions, quarantine


@dataclass
class SourceTables:
    """Everything one source (or a concatenation of sources) provides, in canonical form."""

    #: data.schema.INTERACTIONS that the driver read (the feedback log, tables handed over), rows in source
    #: order; readers of large files leave it empty and put their interactions in ``streamed``.
    interactions: pa.Table
    items: pa.Table  # data.schema.ITEMS_BASE; null where the source lacks a field
    users: pa.Table | None  # user_id + string attribute columns, or None
    quarantine: pa.Table  # data.schema.QUARANTINE, one row per line that could not be read (streamed files: their own)
    files: list[str]  # every file read (absolute paths, or URIs of remote files), for the manifest's content hash
    streamed: list[StreamedInteractions] = field(default_factory=list)  # in source order, ahead of ``interactions``

    def interaction_inputs(self) -> list[StreamedInteractions]:
        """Every interaction as streamed rows, in source order."""
        return [*self.streamed, *([StreamedInteractions.of_table(self.interactions)] if self.interactions.num_rows else [])]

    def collected(self) -> SourceTables:
        """The same with the streamed interactions in ``interactions``, and their refused lines ahead of the
        rest of ``quarantine``: everything in the driver, for small sources and for looking at them."""
        parts = [inputs.collected() for inputs in self.streamed]
        return SourceTables(
            interactions=pa.concat_tables([INTERACTIONS.empty_table(), *(rows for rows, _ in parts), self.interactions]),
            items=self.items,
            users=self.users,
            quarantine=pa.concat_tables([*(refused for _, refused in parts), self.quarantine]),
            files=self.files,
        )


def source_tables(
    files: Sequence[Path | str],
    interactions: pa.Table | StreamedInteractions,
    items: pa.Table,
    users: pa.Table | None,
    quarantines: list[pa.Table],
) -> SourceTables:
    """``files``: local paths, made absolute, or names from ``common.storage.file_uri``, kept as they are."""
    streamed = isinstance(interactions, StreamedInteractions)
    return SourceTables(
        interactions=INTERACTIONS.empty_table() if streamed else interactions,
        items=items,
        users=users,
        quarantine=pa.concat_tables([QUARANTINE.empty_table(), *quarantines]),
        files=[str(path.resolve()) if isinstance(path, Path) else path for path in files],
        streamed=[interactions] if streamed else [],
    )


class _FileStream(Datasource):
    """A read task per span of ``path``, which passes on the READ_ROWS tables that its ``read()`` gives."""

    def __init__(self, path: Path, reads: Sequence[Callable[[], Iterator[pa.Table]]]):
        super().__init__()
        self._path, self._reads = path, list(reads)

    def estimate_inmemory_data_size(self) -> int:
        return self._path.stat().st_size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[ReadTask]:
        span_bytes = self.estimate_inmemory_data_size() // len(self._reads)
        metadata = BlockMetadata(num_rows=None, size_bytes=span_bytes, input_files=[str(self._path)], exec_stats=None)
        return [ReadTask(read, metadata, schema=READ_ROWS) for read in self._reads]


def stream_interactions(path: Path, prefix: str, reads: Sequence[Callable[[], Iterator[pa.Table]]]) -> StreamedInteractions:
    """The interactions of ``path``, read by one Ray task per span of the file: each of ``reads`` gives a span's
    READ_ROWS batch by batch, in file order; the sources of the rows are ``prefix`` + number. The first span is
    read here up to its first line, so that a file that cannot be used at all (empty, or its first batch
    refused as a whole) fails now."""
    if next((rows for read in reads for rows in read() if rows.num_rows), None) is None:
        raise InputError(f"{path}: no interactions in the file")
    return StreamedInteractions(ray.data.read_datasource(_FileStream(path, reads)), [prefix])


def read_rows_of(batches: Callable[[], Iterator[FileRows]], read_rows: Callable[[FileRows], pa.Table]) -> Iterator[pa.Table]:
    """``read_rows`` of each batch ``batches()`` parses: one of ``stream_interactions``' ``reads`` for a parsed file."""
    for raw in batches():
        yield read_rows(raw)


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
    columns, positions, quarantine, keep = _checked(raw, user, item, timestamp, value, event, also)
    return pa.table({**columns, "source": raw.sources(positions)}, schema=INTERACTIONS), quarantine, keep


def read_rows_from(
    raw: FileRows,
    user: CheckedColumn,
    item: CheckedColumn,
    timestamp: CheckedColumn,
    value: CheckedColumn | None,
    event: CheckedColumn | str,
) -> pa.Table:
    """READ_ROWS of a batch of a streamed file: its interactions as ``interactions_from`` checks them, then the lines refused."""
    columns, positions, quarantine, _ = _checked(raw, user, item, timestamp, value, event, ())
    accepted = pa.table({**columns, "number": pa.array(positions, pa.int64())})
    numbers = pc.cast(pc.utf8_slice_codeunits(quarantine["source"], len(raw.position_prefix)), pa.int64())
    refused = pa.table({"number": numbers, "reason": quarantine["reason"], "record": quarantine["record"]})
    rows = pa.concat_tables([accepted, refused], promote_options="default")
    return rows.append_column("part", pa.repeat(pa.scalar(0, pa.int32()), rows.num_rows)).select(READ_ROWS.names).cast(READ_ROWS)


def _checked(
    raw: FileRows,
    user: CheckedColumn,
    item: CheckedColumn,
    timestamp: CheckedColumn,
    value: CheckedColumn | None,
    event: CheckedColumn | str,
    also: tuple[CheckedColumn, ...],
) -> tuple[dict[str, Any], Any, pa.Table, pa.Array | None]:
    """The INTERACTIONS columns but ``source`` of the rows every check accepts, their positions, the quarantine, which rows."""
    event_check = [event] if isinstance(event, CheckedColumn) else []
    checks = [*also, user, item, *([value] if value else []), timestamp, *event_check]
    keep, quarantine = keep_valid(raw, checks)
    positions = raw.positions if keep is None else raw.positions[keep.to_numpy(zero_copy_only=False)]
    columns = {
        "user_id": kept(user.values, keep),
        "item_id": kept(item.values, keep),
        "timestamp": kept(timestamp.values, keep),
        "event": kept(event.values, keep) if isinstance(event, CheckedColumn) else pa.repeat(event, len(positions)),
        "value": kept(value.values, keep) if value else pa.nulls(len(positions), pa.float64()),
    }
    return columns, positions, quarantine, keep


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
