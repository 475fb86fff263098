"""Rows as a file gave them: a source file parsed into a table of its own columns, each row knowing where it
came from, plus the rows the parser itself refused.

Where a row came from is ``"<file>:<line>"`` (1-based) for text files and ``"<file>:row <n>"`` (0-based, as
``Table.slice`` counts) for Parquet. Delimited text files (MovieLens, generic CSV) are parsed by
``pyarrow.csv`` and checked column-wise, never line by line in Python: ml-25m has 25M ratings. Parsing is
single-threaded so that pyarrow reports the line number of each row with the wrong field count. It first asks
pyarrow for typed columns, which is fastest; only when some value does not convert is the file read again as
text, so that the column checks of ``data.readers.columns`` can name each bad line instead of the whole file
failing.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common.errors import InputError
from data.schema import QUARANTINE

#: How a caller will convert a column; the parser asks pyarrow for that type first.
ColumnKind = Literal["integer", "number", "text"]
_ARROW_TYPES: dict[str, pa.DataType] = {"integer": pa.int64(), "number": pa.float64(), "text": pa.string()}

#: A row refused while reading: (reason, source, the raw line or a JSON rendering of the row).
Refused = tuple[str, str, str]


@dataclass
class FileRows:
    """One file's rows before conversion, with where each came from."""

    path: Path
    table: pa.Table
    positions: np.ndarray  # 1-based line (text files) or 0-based row (Parquet) of each row
    position_prefix: str  # "<file>:" or "<file>:row "; + position = the ``source`` value
    render: Callable[[pa.Table], list[str]]  # rows → their text, for the quarantine
    #: Rows the parser itself refused, as (position, reason, raw text).
    rejected: list[tuple[int, str, str]] = field(default_factory=list)

    @classmethod
    def of_parquet(cls, path: Path, table: pa.Table, name: str) -> FileRows:
        """The rows of a Parquet file already read, numbered from 0 after the file's ``name`` in their sources,
        rendered as JSON for the quarantine."""
        return cls(path, table, np.arange(table.num_rows), f"{name}:row ", json_rows)

    @property
    def name(self) -> str:
        return self.path.name

    def sources(self, positions: np.ndarray) -> pa.Array:
        return pc.utf8_replace_slice(pc.cast(pa.array(positions, pa.int64()), pa.string()), 0, 0, self.position_prefix)

    def filtered(self, keep: np.ndarray) -> FileRows:
        return replace(self, table=self.table.filter(pa.array(keep)), positions=self.positions[keep])

    def require_columns(self, wanted: dict[str, str | None]) -> None:
        """``wanted`` maps each needed column to the setting that named it (None: fixed by the format)."""
        for column, setting in wanted.items():
            if column not in self.table.column_names:
                origin = f" (mapped from {setting})" if setting else ""
                columns = ", ".join(self.table.column_names)
                raise InputError(f"{self.name}: no column {column!r}{origin}; columns are: {columns}")

    def quarantine(self, refused: list[tuple[int, str, str]]) -> pa.Table:
        """QUARANTINE of the rows the parser rejected and the (position, reason, text) rows ``refused``, in file order."""
        rows = sorted(self.rejected + refused, key=lambda row: row[0])
        positions = np.array([position for position, _, _ in rows], dtype=np.int64)
        sources = self.sources(positions).to_pylist()
        return quarantine_table([(reason, source, text) for (_, reason, text), source in zip(rows, sources)])


def quarantine_table(rows: list[Refused]) -> pa.Table:
    """QUARANTINE from (reason, source, record) rows, all refused while reading."""
    reasons, sources, records = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    columns = {"stage": ["read"] * len(rows), "reason": reasons, "source": sources, "record": records}
    return pa.table(columns, schema=QUARANTINE)


def read_delimited(
    path: Path,
    kinds: dict[str, ColumnKind],
    *,
    separator: str = ",",
    column_names: list[str] | None = None,
    encoding: str = "utf8",
    quoted: bool = True,
) -> FileRows:
    """Parse a delimited text file; ``kinds`` types the columns the caller converts, the rest stay text.

    ``column_names`` is for files without a header line. A separator of several characters (the
    ``::`` of MovieLens-1M) is replaced by a tab before parsing.
    """
    require_file(path)
    multi_char = len(separator) > 1
    data = pa.py_buffer(path.read_bytes().replace(separator.encode(), b"\t")) if multi_char else None

    def source() -> Any:
        # pyarrow decompresses by file extension when given a path; a stream can be read only once.
        return pa.BufferReader(data) if multi_char else str(path)

    rejected: list[tuple[int, str, str]] = []

    def reject(row: pacsv.InvalidRow) -> str:
        text = row.text.replace("\t", separator) if multi_char else row.text
        rejected.append((row.number, f"expected {row.expected_columns} fields, got {row.actual_columns}", text))
        return "skip"

    read_options = pacsv.ReadOptions(use_threads=False, encoding=encoding, column_names=column_names)
    parse_options = pacsv.ParseOptions(
        delimiter="\t" if multi_char else separator,
        quote_char='"' if quoted else False,
        invalid_row_handler=reject,
        # Blank lines become all-null rows (dropped below; so are lines of bare separators) rather than
        # vanishing, which keeps the line numbers exact.
        ignore_empty_lines=False,
    )

    def read(types: dict[str, pa.DataType]) -> pa.Table:
        rejected.clear()
        convert = pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True)
        return pacsv.read_csv(source(), read_options=read_options, parse_options=parse_options, convert_options=convert)

    try:
        names = column_names or _csv_header(source(), read_options, parse_options)
        try:
            table = read({name: _ARROW_TYPES[kinds.get(name, "text")] for name in names})
        except pa.ArrowInvalid:
            table = read({name: pa.string() for name in names})
    except pa.ArrowInvalid as err:
        raise InputError(f"{path}: cannot be read: {err}") from None

    first_line = 1 if column_names else 2
    skipped = [number for number, _, _ in rejected]
    lines = np.arange(first_line, first_line + table.num_rows + len(skipped))
    if skipped:
        lines = lines[~np.isin(lines, skipped)]

    def render(rows: pa.Table) -> list[str]:
        texts = [pc.fill_null(pc.cast(column, pa.string()), "") for column in rows.columns]
        return pc.binary_join_element_wise(*texts, separator).to_pylist()

    raw = FileRows(path, table, lines, f"{path.name}:", render, list(rejected))
    if min(column.null_count for column in table.columns) > 0:
        blank = functools.reduce(pc.and_, [pc.is_null(column) for column in table.columns])
        raw = raw.filtered(~blank.to_numpy(zero_copy_only=False))
    return raw


def _csv_header(source: Any, read_options: pacsv.ReadOptions, parse_options: pacsv.ParseOptions) -> list[str]:
    with pacsv.open_csv(source, read_options=read_options, parse_options=parse_options) as reader:
        return reader.schema.names


def read_parquet(path: Path) -> FileRows:
    require_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file: {err}") from None
    return FileRows.of_parquet(path, table, path.name)


def json_rows(rows: pa.Table) -> list[str]:
    return [json.dumps(row, default=str, ensure_ascii=False) for row in rows.to_pylist()]


def read_table_file(path: Path, kinds: dict[str, ColumnKind]) -> FileRows:
    """A generic table by its extension: Parquet, CSV or tab-separated (optionally compressed)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".lz4"):
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else "(no extension)"
    if kind in (".parquet", ".pq"):
        return read_parquet(path)
    if kind in (".csv", ".tsv"):
        return read_delimited(path, kinds, separator="\t" if kind == ".tsv" else ",")
    raise InputError(f"{path}: unknown table file type {kind!r}; expected .parquet, .csv or .tsv")


def require_file(path: Path, holds: str = "") -> None:
    if not path.is_file():
        raise InputError(f"{path}: file not found{holds}")


def require_rows(raw: FileRows) -> None:
    if raw.table.num_rows == 0 and not raw.rejected:
        raise InputError(f"{raw.path}: no interactions in the file")
