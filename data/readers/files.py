"""Rows as a file gave them: a source file parsed into a table of its own columns, each row knowing where it
came from, plus the rows the parser itself refused.

Where a row came from is ``"<file>:<line>"`` (1-based) for text files and ``"<file>:row <n>"`` (0-based, as
``Table.slice`` counts) for Parquet. Delimited text files (MovieLens, generic CSV) are parsed by
``pyarrow.csv`` and checked column-wise, never line by line in Python: ml-25m has 25M ratings. Parsing is
single-threaded so that pyarrow reports the line number of each row with the wrong field count.

Interaction files are parsed batch by batch (``delimited_batches``, ``parquet_batches``, in Ray read tasks), all
columns as text, so that the column checks of ``data.readers.columns`` name each bad line. A large uncompressed text
file is cut into ``line_spans``, runs of whole lines parsed by tasks of their own, each knowing how many lines come
before it; a row is one line (as pyarrow assumes without ``newlines_in_values``), so a quoted value may not hold a
line break. The small files read whole (``read_delimited``) first ask pyarrow for typed columns, which is fastest;
only when some value does not convert is the file read again as text.

Text columns are parsed as bytes and then cast to text, which costs one UTF-8 check of each column, as a ``string``
column would; a row holding bytes that are not UTF-8 then goes to the quarantine rather than failing the whole file.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import math
from collections.abc import Callable, Iterator
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

#: How a caller will convert a column; the parser asks pyarrow for that type first (text as bytes: ``_as_text``).
ColumnKind = Literal["integer", "number", "text"]
_ARROW_TYPES: dict[str, pa.DataType] = {"integer": pa.int64(), "number": pa.float64(), "text": pa.binary()}

#: A row refused while reading: (reason, source, the raw line or a JSON rendering of the row).
Refused = tuple[str, str, str]

#: A text file larger than this is parsed by several Ray read tasks, each a span of whole lines about this long:
#: seconds of parsing, so a task's fixed cost is small, and a 1-GB file still gives every core of a node work.
READ_TASK_BYTES = 64 << 20
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


@dataclass(frozen=True)
class LineSpan:
    """Bytes ``[start, end)`` of a text file, from a line's start to just past a line break (``end`` None: to the
    end of the file); ``lines_before`` lines of the file precede it."""

    start: int = 0
    end: int | None = None
    lines_before: int = 0

    @property
    def whole_file(self) -> bool:
        return self.start == 0 and self.end is None

    def open(self, path: Path) -> Any:
        """The span's bytes as a binary stream, mapped from the file rather than copied."""
        mapped = pa.memory_map(str(path))
        mapped.seek(self.start)
        return pa.BufferReader(mapped.read_buffer(None if self.end is None else self.end - self.start))

    def lines(self, path: Path) -> Iterator[bytes]:
        """The span's lines, each with its line break; the whole file decompressed by its extension (gzip)."""
        if self.whole_file:
            with (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb") as file:
                yield from file
            return
        left = math.inf if self.end is None else self.end - self.start
        with path.open("rb") as file:
            file.seek(self.start)
            for line in file:
                yield line
                left -= len(line)
                if left <= 0:
                    break


WHOLE_FILE = LineSpan()


def line_spans(path: Path, task_bytes: int | None = None) -> list[LineSpan]:
    """``path`` cut into spans of whole lines of about ``task_bytes`` (default ``READ_TASK_BYTES``) each; a
    compressed file, which cannot be entered in the middle, is one span. The driver reads the file once to count
    the lines before each cut, at memory speed: parsing is what the tasks share."""
    require_file(path)
    task_bytes = task_bytes or READ_TASK_BYTES
    size = path.stat().st_size
    if size <= task_bytes or path.suffix.lower() in _COMPRESSED:
        return [WHOLE_FILE]
    spans = [WHOLE_FILE]
    with path.open("rb") as file:
        lines = 0
        while (cut := spans[-1].start + task_bytes) < size:
            file.seek(spans[-1].start)
            lines += _count_newlines(file, task_bytes)
            rest_of_line = file.readline()
            lines += rest_of_line.endswith(b"\n")
            cut += len(rest_of_line)
            if cut >= size:
                break
            spans[-1] = replace(spans[-1], end=cut)
            spans.append(LineSpan(cut, None, lines))
    return spans


def _count_newlines(file: io.BufferedReader, size: int, chunk: int = 16 << 20) -> int:
    count = 0
    while size > 0:
        data = file.read(min(chunk, size))
        if not data:
            break
        count += data.count(b"\n")
        size -= len(data)
    return count


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


@dataclass(frozen=True)
class Delimited:
    """How a delimited text file is written. ``column_names`` is for files without a header line; a
    separator of several characters (the ``::`` of MovieLens-1M) is read as a tab."""

    separator: str = ","
    column_names: list[str] | None = None
    encoding: str = "utf8"
    quoted: bool = True

    @property
    def multi_char(self) -> bool:
        return len(self.separator) > 1

    def open(self, path: Path, span: LineSpan = WHOLE_FILE) -> Any:
        """What pyarrow's CSV readers take for ``span`` of the file: the path (the whole file, decompressed by its
        extension) or a stream, which reads the multi-character separator as a tab."""
        if span.whole_file and not self.multi_char:
            return str(path)
        raw = path.open("rb") if span.whole_file else span.open(path)
        return pa.PythonFile(_SeparatorAsTab(raw, self.separator.encode()), mode="r") if self.multi_char else raw

    def options(self, reject: Callable[[pacsv.InvalidRow], str], column_names: list[str] | None = None) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions]:
        """``column_names``: for a file without a header line, or a span after the header; default ``self.column_names``."""
        read = pacsv.ReadOptions(use_threads=False, encoding=self.encoding, column_names=column_names or self.column_names)
        parse = pacsv.ParseOptions(
            delimiter="\t" if self.multi_char else self.separator,
            quote_char='"' if self.quoted else False,
            invalid_row_handler=reject,
            # Blank lines become all-null rows (dropped later; so are lines of bare separators) rather than
            # vanishing, which keeps the line numbers exact.
            ignore_empty_lines=False,
        )
        return read, parse

    def rejected_row(self, row: pacsv.InvalidRow) -> tuple[int, str, str]:
        text = row.text.replace("\t", self.separator) if self.multi_char else row.text
        return row.number, f"expected {row.expected_columns} fields, got {row.actual_columns}", text

    def render(self, rows: pa.Table) -> list[str]:
        texts = [pc.fill_null(pc.cast(column, pa.string()), "") for column in rows.columns]
        return pc.binary_join_element_wise(*texts, self.separator).to_pylist()

    @property
    def first_line(self) -> int:
        return 1 if self.column_names else 2


class _SeparatorAsTab(io.RawIOBase):
    """A binary file whose ``separator`` reads as a tab."""

    def __init__(self, raw: io.BufferedIOBase, separator: bytes):
        self._raw, self._separator = raw, separator

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        # Never end a read inside a separator, so that it is replaced exactly as in the whole file.
        while chunk and any(chunk.endswith(self._separator[:cut]) for cut in range(1, len(self._separator))):
            more = self._raw.read(1)
            if not more:
                break
            chunk += more
        return chunk.replace(self._separator, b"\t")

    def close(self) -> None:
        self._raw.close()
        super().close()


def _parsed(raw: FileRows) -> FileRows:
    """The rows pyarrow parsed, their text columns as text, without the blank lines."""
    return _without_blank_rows(_as_text(raw))


def _as_text(raw: FileRows) -> FileRows:
    """``raw`` with its columns of bytes cast to text. A row holding bytes that are not UTF-8 is rejected, named by
    the first such column, its text in the quarantine with those bytes replaced."""
    text_schema = pa.schema([column.with_type(pa.string()) if pa.types.is_binary(column.type) else column for column in raw.table.schema])
    try:
        return replace(raw, table=raw.table.cast(text_schema))
    except pa.ArrowInvalid:
        pass
    refused = np.zeros(raw.table.num_rows, dtype=bool)
    reasons = np.empty(raw.table.num_rows, dtype=object)
    for name, values in zip(raw.table.column_names, raw.table.columns):
        if pa.types.is_binary(values.type):
            invalid = _not_utf8(values) & ~refused
            reasons[invalid] = f"{name} not valid UTF-8"
            refused |= invalid
    refused_rows = raw.table.filter(pa.array(refused))
    replaced = [_replacing_bad_bytes(column) if pa.types.is_binary(column.type) else column for column in refused_rows.columns]
    records = raw.render(pa.table(replaced, names=refused_rows.column_names))
    rejected = list(zip(raw.positions[refused].tolist(), reasons[refused].tolist(), records))
    accepted = raw.filtered(~refused)
    return replace(accepted, table=accepted.table.cast(text_schema), rejected=raw.rejected + rejected)


def _not_utf8(values: pa.ChunkedArray) -> np.ndarray:
    """Which of ``values`` (bytes) are not UTF-8; only a chunk that does not cast is checked value by value, in Python."""
    return np.concatenate([np.zeros(0, dtype=bool), *map(_chunk_not_utf8, values.chunks)])


def _chunk_not_utf8(chunk: pa.Array) -> np.ndarray:
    try:
        chunk.cast(pa.string())
    except pa.ArrowInvalid:
        return np.array([value is not None and not _is_utf8(value) for value in chunk.to_pylist()], dtype=bool)
    return np.zeros(len(chunk), dtype=bool)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _replacing_bad_bytes(values: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if value is None else value.decode(errors="replace") for value in values.to_pylist()], pa.string())


def _without_blank_rows(raw: FileRows) -> FileRows:
    if raw.table.num_rows == 0 or min(column.null_count for column in raw.table.columns) == 0:
        return raw
    blank = functools.reduce(pc.and_, [pc.is_null(column) for column in raw.table.columns])
    return raw.filtered(~blank.to_numpy(zero_copy_only=False))


def read_delimited(path: Path, kinds: dict[str, ColumnKind], layout: Delimited = Delimited()) -> FileRows:
    """Parse a delimited text file whole; ``kinds`` types the columns the caller converts, the rest stay text."""
    require_file(path)
    rejected: list[tuple[int, str, str]] = []

    def reject(row: pacsv.InvalidRow) -> str:
        rejected.append(layout.rejected_row(row))
        return "skip"

    read_options, parse_options = layout.options(reject)

    def read(types: dict[str, pa.DataType]) -> pa.Table:
        rejected.clear()
        convert = pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True)
        return pacsv.read_csv(layout.open(path), read_options=read_options, parse_options=parse_options, convert_options=convert)

    try:
        names = layout.column_names or _csv_header(layout.open(path), read_options, parse_options)
        try:
            table = read({name: _ARROW_TYPES[kinds.get(name, "text")] for name in names})
        except pa.ArrowInvalid:
            table = read(dict.fromkeys(names, pa.binary()))
    except (pa.ArrowInvalid, OSError) as err:  # OSError: a compressed file cut short or corrupt
        raise InputError(f"{path}: cannot be read: {err}") from None

    skipped = [number for number, _, _ in rejected]
    lines = np.arange(layout.first_line, layout.first_line + table.num_rows + len(skipped))
    if skipped:
        lines = lines[~np.isin(lines, skipped)]
    return _parsed(FileRows(path, table, lines, f"{path.name}:", layout.render, list(rejected)))


def delimited_batches(path: Path, layout: Delimited, span: LineSpan = WHOLE_FILE) -> Iterator[FileRows]:
    """Parse ``span`` of a delimited text file batch by batch, every column as text (a value that does not
    convert must not fail the whole file once part of it is passed on); the last batch holds the rejected
    lines after the last row. Bad input raises ``InputError`` naming the file."""
    require_file(path)
    rejected: list[tuple[int, str, str]] = []  # in line order; pyarrow parses ahead of the batch it returns

    def reject(row: pacsv.InvalidRow) -> str:
        number, reason, text = layout.rejected_row(row)
        rejected.append((span.lines_before + number, reason, text))
        return "skip"

    read_options, parse_options = layout.options(reject)
    next_line = layout.first_line if span.start == 0 else span.lines_before + 1

    def batch_rows(table: pa.Table) -> FileRows:
        """The batch's rows with their lines: the next ``num_rows`` lines that pyarrow did not reject."""
        nonlocal next_line, rejected
        end, skipped = next_line + table.num_rows, 0
        while (now := sum(1 for number, _, _ in rejected if number < end)) != skipped:
            end, skipped = end + now - skipped, now
        mine = [row for row in rejected if row[0] < end]
        rejected = [row for row in rejected if row[0] >= end]
        lines = np.arange(next_line, end)
        if mine:
            lines = lines[~np.isin(lines, [number for number, _, _ in mine])]
        next_line = end
        return _parsed(FileRows(path, table, lines, f"{path.name}:", layout.render, mine))

    try:
        names = layout.column_names or _csv_header(layout.open(path), read_options, parse_options)
        rejected.clear()  # reading the header parsed the first block
        if span.start:  # the header line is in the first span only
            read_options, _ = layout.options(reject, names)
        convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary()), null_values=[""], strings_can_be_null=True)
        with pacsv.open_csv(layout.open(path, span), read_options=read_options, parse_options=parse_options, convert_options=convert) as reader:
            for batch in reader:
                yield batch_rows(pa.Table.from_batches([batch]))
    except (pa.ArrowInvalid, OSError) as err:  # OSError: a compressed file cut short or corrupt
        raise InputError(f"{path}: cannot be read: {err}") from None
    yield batch_rows(pa.table({name: pa.array([], pa.string()) for name in names}))


def _csv_header(source: Any, read_options: pacsv.ReadOptions, parse_options: pacsv.ParseOptions) -> list[str]:
    with pacsv.open_csv(source, read_options=read_options, parse_options=parse_options) as reader:
        return reader.schema.names


def parquet_batches(path: Path) -> Iterator[FileRows]:
    """A Parquet file batch by batch, numbered from row 0."""
    require_file(path)
    try:
        with pq.ParquetFile(path) as parquet:
            first = 0
            for batch in parquet.iter_batches():
                yield replace(FileRows.of_parquet(path, pa.Table.from_batches([batch]), path.name), positions=np.arange(first, first + batch.num_rows))
                first += batch.num_rows
            if not first:
                yield FileRows.of_parquet(path, parquet.schema_arrow.empty_table(), path.name)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file: {err}") from None


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
    layout = _table_layout(path)
    return read_parquet(path) if layout is None else read_delimited(path, kinds, layout)


def table_file_batches(path: Path, span: LineSpan = WHOLE_FILE) -> Iterator[FileRows]:
    """``read_table_file`` batch by batch, as ``parquet_batches`` and ``delimited_batches`` parse them; ``span``
    of a text file (``table_file_spans``)."""
    layout = _table_layout(path)
    return parquet_batches(path) if layout is None else delimited_batches(path, layout, span)


def table_file_spans(path: Path) -> list[LineSpan]:
    """The spans a generic table file is read in: ``line_spans`` of a text file, a Parquet file whole."""
    return [WHOLE_FILE] if _table_layout(path) is None else line_spans(path)


def position_prefix(path: Path) -> str:
    """What precedes the line (text) or row (Parquet) number in the sources of a generic table's rows."""
    return f"{path.name}:row " if _table_layout(path) is None else f"{path.name}:"


def _table_layout(path: Path) -> Delimited | None:
    """How a generic table file is written, by its extension; None for Parquet."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else "(no extension)"
    if kind in (".parquet", ".pq"):
        return None
    if kind in (".csv", ".tsv"):
        return Delimited(separator="\t" if kind == ".tsv" else ",")
    raise InputError(f"{path}: unknown table file type {kind!r}; expected .parquet, .csv or .tsv")


def require_file(path: Path, holds: str = "") -> None:
    if not path.is_file():
        raise InputError(f"{path}: file not found{holds}")
