"""Source readers: every supported dataset layout → the canonical tables of ``data.schema``.

``read_source`` turns one ``SourceConfig`` into ``SourceTables``: interactions in source order, the
item text fields, the user attributes when the source has them, and one quarantine row for every
line that could not be read (why, where, and the raw line); every other line is kept. Where a row
came from is ``"<file>:<line>"`` (1-based) for text files and ``"<file>:row <n>"`` (0-based, as
``Table.slice`` counts) for Parquet.

Delimited text files (MovieLens, generic CSV) are parsed by ``pyarrow.csv`` and checked column-wise,
never line by line in Python: ml-25m has 25M ratings. Parsing is single-threaded so that pyarrow
reports the line number of each row with the wrong field count. It first asks pyarrow for typed
columns, which is fastest; only when some value does not convert is the file read again as text, so
that the column checks can name each bad line instead of the whole file failing. Amazon JSON lines
are small and read in a Python loop.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common import storage
from data.config import DEFAULT_DATASET_DIR, SourceConfig
from common.errors import InputError
from data.feedback_log import PART_PREFIX, PART_SUFFIX, first_occurrences, log_parts, read_registered_items
from data.schema import INTERACTIONS, ITEM_TEXT_FIELDS, ITEMS_BASE, QUARANTINE, USER_ID_FIELD


@dataclass
class SourceTables:
    """Everything one source (or a concatenation of sources) provides, in canonical form."""

    interactions: pa.Table  # exactly data.schema.INTERACTIONS, rows in source order
    items: pa.Table  # data.schema.ITEMS_BASE; null where the source lacks a field
    users: pa.Table | None  # user_id + string attribute columns, or None
    quarantine: pa.Table  # data.schema.QUARANTINE, one row per line that could not be read
    files: list[str]  # every file read (absolute paths, or URIs of remote files), for the manifest's content hash


def read_source(config: SourceConfig) -> SourceTables:
    """One source in canonical form; bad input raises ``InputError`` naming the file, column or setting."""
    reader = _READERS.get(config.format)
    if reader is None:
        raise InputError(f"source.format: unknown format {config.format!r}; known formats are: {', '.join(_READERS)}")
    return reader(config)


def read_sources(configs: list[SourceConfig]) -> SourceTables:
    """The sources one after the other, e.g. the base dataset followed by the feedback log."""
    if not configs:
        raise InputError("no sources configured")
    parts = [read_source(config) for config in configs]
    users = [part.users for part in parts if part.users is not None]
    return SourceTables(
        interactions=pa.concat_tables([part.interactions for part in parts]),
        items=pa.concat_tables([part.items for part in parts]),
        # Sources may know different user attributes; a user lacking one gets null there.
        users=pa.concat_tables(users, promote_options="permissive") if users else None,
        quarantine=pa.concat_tables([part.quarantine for part in parts]),
        files=[name for part in parts for name in part.files],
    )


# --- Rows as a file gave them -----------------------------------------------------------------

_Kind = Literal["integer", "number", "text"]
_ARROW_TYPES: dict[str, pa.DataType] = {"integer": pa.int64(), "number": pa.float64(), "text": pa.string()}


@dataclass
class _Raw:
    """One file's rows before conversion, with where each came from."""

    path: Path
    table: pa.Table
    positions: np.ndarray  # 1-based line (text files) or 0-based row (Parquet) of each row
    position_prefix: str  # "<file>:" or "<file>:row "; + position = the ``source`` value
    render: Callable[[pa.Table], list[str]]  # rows → their text, for the quarantine
    #: Rows the parser itself refused, as (position, reason, raw text).
    rejected: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def sources(self, positions: np.ndarray) -> pa.Array:
        return pc.utf8_replace_slice(pc.cast(pa.array(positions, pa.int64()), pa.string()), 0, 0, self.position_prefix)

    def filtered(self, keep: np.ndarray) -> _Raw:
        return replace(self, table=self.table.filter(pa.array(keep)), positions=self.positions[keep])

    def require_columns(self, wanted: dict[str, str | None]) -> None:
        """``wanted`` maps each needed column to the setting that named it (None: fixed by the format)."""
        for column, setting in wanted.items():
            if column not in self.table.column_names:
                origin = f" (mapped from {setting})" if setting else ""
                columns = ", ".join(self.table.column_names)
                raise InputError(f"{self.name}: no column {column!r}{origin}; columns are: {columns}")


def _read_delimited(
    path: Path,
    kinds: dict[str, _Kind],
    *,
    separator: str = ",",
    column_names: list[str] | None = None,
    encoding: str = "utf8",
    quoted: bool = True,
) -> _Raw:
    """Parse a delimited text file; ``kinds`` types the columns the caller converts, the rest stay text.

    ``column_names`` is for files without a header line. A separator of several characters (the
    ``::`` of MovieLens-1M) is replaced by a tab before parsing.
    """
    _require_file(path)
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

    raw = _Raw(path, table, lines, f"{path.name}:", render, list(rejected))
    if min(column.null_count for column in table.columns) > 0:
        blank = functools.reduce(pc.and_, [pc.is_null(column) for column in table.columns])
        raw = raw.filtered(~blank.to_numpy(zero_copy_only=False))
    return raw


def _csv_header(source: Any, read_options: pacsv.ReadOptions, parse_options: pacsv.ParseOptions) -> list[str]:
    with pacsv.open_csv(source, read_options=read_options, parse_options=parse_options) as reader:
        return reader.schema.names


def _read_parquet(path: Path) -> _Raw:
    _require_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file: {err}") from None
    return _Raw(path, table, np.arange(table.num_rows), f"{path.name}:row ", _json_rows)


def _json_rows(rows: pa.Table) -> list[str]:
    return [json.dumps(row, default=str, ensure_ascii=False) for row in rows.to_pylist()]


def _read_table_file(path: Path, kinds: dict[str, _Kind]) -> _Raw:
    """A generic table by its extension: Parquet, CSV or tab-separated (optionally compressed)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".lz4"):
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else "(no extension)"
    if kind in (".parquet", ".pq"):
        return _read_parquet(path)
    if kind in (".csv", ".tsv"):
        return _read_delimited(path, kinds, separator="\t" if kind == ".tsv" else ",")
    raise InputError(f"{path}: unknown table file type {kind!r}; expected .parquet, .csv or .tsv")


def _require_file(path: Path, holds: str = "") -> None:
    if not path.is_file():
        raise InputError(f"{path}: file not found{holds}")


def _require_rows(raw: _Raw) -> None:
    if raw.table.num_rows == 0 and not raw.rejected:
        raise InputError(f"{raw.path}: no interactions in the file")


# --- Column conversion with a reason for every refused value ---------------------------------


@dataclass
class _Checked:
    """A converted column: null where the file's value was missing or could not be converted."""

    column: str  # the file's column, named in the reason
    values: pa.ChunkedArray
    problem: str  # why a present value did not convert: "not an integer", ...
    required: bool = True  # a missing value refuses the row


def _is_text(values: pa.ChunkedArray) -> bool:
    return pa.types.is_string(values.type) or pa.types.is_large_string(values.type)


def _integers(raw: _Raw, column: str) -> pa.ChunkedArray:
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


def _numbers(raw: _Raw, column: str) -> pa.ChunkedArray:
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


def _texts(raw: _Raw, column: str) -> pa.ChunkedArray:
    values = raw.table[column]
    try:
        text = pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"{raw.name}: column {column!r} holds {values.type}, not text") from None
    return pc.if_else(pc.equal(text, ""), None, text)


def _integer_ids(raw: _Raw, column: str) -> _Checked:
    """MovieLens ids: integers, kept as their decimal text."""
    return _Checked(column, pc.cast(_integers(raw, column), pa.string()), "not an integer")


def _text_ids(raw: _Raw, column: str) -> _Checked:
    return _Checked(column, _texts(raw, column), "empty")


_SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000}


def _timestamps(raw: _Raw, column: str, unit: Literal["s", "ms", "us", "iso"]) -> _Checked:
    """Seconds since the epoch from integers in ``unit``, ISO-8601 text, or a Parquet time column."""
    values = raw.table[column]
    if pa.types.is_temporal(values.type):
        return _Checked(column, _temporal_seconds(values), "not a time")
    if unit == "iso":
        if not _is_text(values):
            raise InputError(f"{raw.name}: column {column!r} holds {values.type}, not ISO-8601 text (timestamp_unit)")
        return _Checked(column, _iso_seconds(values), "not an ISO-8601 time")
    seconds = _integers(raw, column)
    if unit != "s":
        seconds = pc.divide(seconds, _SECONDS_PER_UNIT[unit])
    return _Checked(column, seconds, "not an integer")


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


def _keep_valid(raw: _Raw, checks: list[_Checked]) -> tuple[pa.Array | None, pa.Table]:
    """Rows every check accepts (None: all of them) and the file's quarantine, in file order."""
    if all(check.values.null_count == 0 for check in checks):  # the usual case, known without a pass
        return None, _quarantine(raw, [])
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
    return pc.invert(refused), _quarantine(raw, list(refused_rows))


def _quarantine(raw: _Raw, refused: list[tuple[int, str, str]]) -> pa.Table:
    rows = sorted(raw.rejected + refused, key=lambda row: row[0])
    positions = np.array([position for position, _, _ in rows], dtype=np.int64)
    sources = raw.sources(positions).to_pylist()
    return _quarantine_table([(reason, source, text) for (_, reason, text), source in zip(rows, sources)])


def _quarantine_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    """QUARANTINE from (reason, source, record) rows, all refused while reading."""
    reasons, sources, records = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    columns = {"stage": ["read"] * len(rows), "reason": reasons, "source": sources, "record": records}
    return pa.table(columns, schema=QUARANTINE)


def _kept(values: Any, keep: pa.Array | None) -> Any:
    """``values`` (an array or table) at the rows ``keep`` marks; None keeps all."""
    return values if keep is None else values.filter(keep)


# --- Canonical tables --------------------------------------------------------------------------


def _interactions(
    raw: _Raw,
    user: _Checked,
    item: _Checked,
    timestamp: _Checked,
    value: _Checked | None,
    event: _Checked | str,
    also: tuple[_Checked, ...] = (),
) -> tuple[pa.Table, pa.Table, pa.Array | None]:
    """INTERACTIONS of the rows every check accepts, the file's quarantine, and which rows those are.

    ``event`` is a column or the one event of every row; ``also`` are further checks a row must pass.
    """
    event_check = [event] if isinstance(event, _Checked) else []
    checks = [*also, user, item, *([value] if value else []), timestamp, *event_check]
    keep, quarantine = _keep_valid(raw, checks)
    positions = raw.positions if keep is None else raw.positions[keep.to_numpy(zero_copy_only=False)]
    table = pa.table(
        {
            "user_id": _kept(user.values, keep),
            "item_id": _kept(item.values, keep),
            "timestamp": _kept(timestamp.values, keep),
            "event": _kept(event.values, keep) if isinstance(event, _Checked) else pa.repeat(event, len(positions)),
            "value": _kept(value.values, keep) if value else pa.nulls(len(positions), pa.float64()),
            "source": raw.sources(positions),
        },
        schema=INTERACTIONS,
    )
    return table, quarantine, keep


def _items_from(
    raw: _Raw, item: _Checked, fields: Callable[[pa.Array | None], dict[str, Any]]
) -> tuple[pa.Table, pa.Table]:
    """ITEMS_BASE of the rows with a valid id; ``fields(keep)`` gives their canonical fields, the rest are null."""
    keep, quarantine = _keep_valid(raw, [item])
    columns = {"item_id": _kept(item.values, keep), **fields(keep)}
    count = len(columns["item_id"])
    typed = {
        f.name: pc.cast(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type) for f in ITEMS_BASE
    }
    return pa.table(typed, schema=ITEMS_BASE), quarantine


def _users_from(raw: _Raw, user: _Checked) -> tuple[pa.Table, pa.Table]:
    """``user_id`` plus every other column of the file, as text."""
    keep, quarantine = _keep_valid(raw, [user])
    attributes = {name: _kept(_texts(raw, name), keep) for name in raw.table.column_names if name != user.column}
    schema = pa.schema([USER_ID_FIELD, *[pa.field(name, pa.string()) for name in attributes]])
    return pa.table({USER_ID_FIELD.name: _kept(user.values, keep), **attributes}, schema=schema), quarantine


def _result(
    files: Sequence[Path | str], interactions: pa.Table, items: pa.Table, users: pa.Table | None, quarantines: list[pa.Table]
) -> SourceTables:
    """``files``: local paths, made absolute, or names from ``data.storage.file_uri``, kept as they are."""
    return SourceTables(
        interactions=interactions,
        items=items,
        users=users,
        quarantine=pa.concat_tables([QUARANTINE.empty_table(), *quarantines]),
        files=[str(path.resolve()) if isinstance(path, Path) else path for path in files],
    )


# --- MovieLens ---------------------------------------------------------------------------------

_TITLE_WITH_YEAR = r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{4})?\)\s*$"
_NO_GENRES = "(no genres listed)"


def _title_and_year(titles: pa.ChunkedArray) -> dict[str, pa.ChunkedArray]:
    """"Toy Story (1995)" → title "Toy Story", year 1995; a title without a year is kept whole."""
    parts = pc.extract_regex(titles, _TITLE_WITH_YEAR)
    return {
        "title": pc.coalesce(pc.struct_field(parts, "title"), titles),
        "year": pc.cast(pc.struct_field(parts, "year"), pa.int32()),
    }


def _split_genres(genres: pa.ChunkedArray) -> pa.ChunkedArray:
    no_genres = pa.scalar([], pa.list_(pa.string()))
    return pc.if_else(pc.equal(genres, _NO_GENRES), no_genres, pc.split_pattern(genres, "|"))


@dataclass(frozen=True)
class _MovieLensLayout:
    """Where a MovieLens release keeps things, and how its files are written."""

    name: str
    ratings: str
    movies: str
    users: str | None
    separator: str
    #: The CSV releases have a header line and quote titles; the older ones have neither.
    csv: bool
    movie_encoding: str
    rating_columns: tuple[str, str, str, str]  # user, item, rating, timestamp
    embedded: Path | None = None  # the folder read when ``source.path`` is None

    def folder(self, config: SourceConfig) -> Path:
        if config.path is None:
            if self.embedded is None:
                raise InputError(f"source.path: required for format {config.format!r} (a {self.name} folder)")
            return self.embedded
        folder = Path(config.path)
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder; expected a {self.name} folder holding {self.contents()}")
        return folder

    def file(self, folder: Path, name: str) -> Path:
        _require_file(folder / name, f"; a {self.name} folder holds {self.contents()}")
        return folder / name

    def contents(self) -> str:
        return ", ".join(name for name in (self.ratings, self.movies, self.users) if name)

    def read_ratings(self, folder: Path, event: str) -> tuple[pa.Table, pa.Table]:
        user, item, rating, timestamp = self.rating_columns
        raw = _read_delimited(
            self.file(folder, self.ratings),
            {user: "integer", item: "integer", rating: "number", timestamp: "integer"},
            separator=self.separator,
            column_names=None if self.csv else list(self.rating_columns),
            quoted=self.csv,
        )
        _require_rows(raw)
        raw.require_columns(dict.fromkeys(self.rating_columns))
        interactions, quarantine, _ = _interactions(
            raw,
            _integer_ids(raw, user),
            _integer_ids(raw, item),
            _timestamps(raw, timestamp, "s"),
            _Checked(rating, _numbers(raw, rating), "not a number"),
            event,
        )
        return interactions, quarantine

    def read_users(
        self, folder: Path, separator: str, attributes: list[str]
    ) -> tuple[pa.Table | None, list[pa.Table], list[Path]]:
        """Users, their quarantine and the file, if the folder has a users file (some releases have none)."""
        path = folder / self.users if self.users else None
        if path is None or not path.is_file():
            return None, [], []
        columns = ["user_id", *attributes]
        raw = _read_delimited(path, {"user_id": "integer"}, separator=separator, column_names=columns, quoted=False)
        users, quarantine = _users_from(raw, _integer_ids(raw, "user_id"))
        return users, [quarantine], [path]


_RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_ML_100K = _MovieLensLayout(
    "MovieLens-100K", "u.data", "u.item", "u.user", "\t", False, "latin-1", _RATING_COLUMNS, DEFAULT_DATASET_DIR
)
_ML_1M = _MovieLensLayout(
    "MovieLens-1M", "ratings.dat", "movies.dat", "users.dat", "::", False, "latin-1", _RATING_COLUMNS
)
_ML_CSV = _MovieLensLayout(
    "MovieLens CSV", "ratings.csv", "movies.csv", None, ",", True, "utf8", ("userId", "movieId", "rating", "timestamp")
)

#: u.item's genre flags, in order, for a folder without u.genre.
_ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _read_movielens_100k(config: SourceConfig) -> SourceTables:
    layout = _ML_100K
    folder = layout.folder(config)
    interactions, rating_quarantine = layout.read_ratings(folder, config.default_event)
    files = [folder / layout.ratings]
    genres = _ML_100K_GENRES
    if (folder / "u.genre").is_file():
        # "name|index" lines, in index order.
        lines = (folder / "u.genre").read_text(encoding="latin-1").splitlines()
        genres = tuple(line.rsplit("|", 1)[0] for line in lines if line.strip())
        files.append(folder / "u.genre")
    raw = _read_delimited(
        layout.file(folder, layout.movies),
        {"item_id": "integer", **dict.fromkeys(genres, "integer")},
        separator="|",
        column_names=["item_id", "title", "release_date", "video_release_date", "url", *genres],
        encoding=layout.movie_encoding,
        quoted=False,
    )

    def item_fields(keep: pa.Array | None) -> dict[str, Any]:
        flags = np.column_stack(
            [_kept(_integers(raw, genre), keep).to_numpy(zero_copy_only=False) == 1 for genre in genres]
        )
        rows, columns = np.nonzero(flags)  # row-major: each item's genres in u.genre order
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(flags)))]).astype(np.int32)
        names = pa.array(np.array(genres, dtype=object)[columns], pa.string())
        genre_lists = pa.ListArray.from_arrays(pa.array(offsets), names)
        return {**_title_and_year(_kept(raw.table["title"], keep)), "genres": genre_lists}

    items, item_quarantine = _items_from(raw, _integer_ids(raw, "item_id"), item_fields)
    users, user_quarantines, user_files = layout.read_users(folder, "|", ["age", "gender", "occupation", "zip"])
    quarantines = [rating_quarantine, item_quarantine, *user_quarantines]
    return _result([*files, raw.path, *user_files], interactions, items, users, quarantines)


def _read_movielens_1m(config: SourceConfig) -> SourceTables:
    layout = _ML_1M
    folder = layout.folder(config)
    interactions, rating_quarantine = layout.read_ratings(folder, config.default_event)
    raw = _read_delimited(
        layout.file(folder, layout.movies),
        {"item_id": "integer"},
        separator="::",
        column_names=["item_id", "title", "genres"],
        encoding=layout.movie_encoding,
        quoted=False,
    )

    def item_fields(keep: pa.Array | None) -> dict[str, Any]:
        genres = _split_genres(_kept(raw.table["genres"], keep))
        return {**_title_and_year(_kept(raw.table["title"], keep)), "genres": genres}

    items, item_quarantine = _items_from(raw, _integer_ids(raw, "item_id"), item_fields)
    users, user_quarantines, user_files = layout.read_users(folder, "::", ["gender", "age", "occupation", "zip"])
    files = [folder / layout.ratings, raw.path, *user_files]
    return _result(files, interactions, items, users, [rating_quarantine, item_quarantine, *user_quarantines])


def _read_movielens_csv(config: SourceConfig) -> SourceTables:
    layout = _ML_CSV
    folder = layout.folder(config)
    interactions, rating_quarantine = layout.read_ratings(folder, config.default_event)
    raw = _read_delimited(layout.file(folder, layout.movies), {"movieId": "integer"})
    raw.require_columns(dict.fromkeys(["movieId", "title", "genres"]))
    files, quarantines = [folder / layout.ratings, raw.path], [rating_quarantine]
    tags = pa.table({"movieId": pa.array([], pa.string()), "tags": pa.array([], pa.list_(pa.string()))})
    if (folder / "tags.csv").is_file():
        tags, tag_quarantine = _tags_per_movie(folder / "tags.csv")
        files.append(folder / "tags.csv")
        quarantines.append(tag_quarantine)
    movie = _integer_ids(raw, "movieId")

    def item_fields(keep: pa.Array | None) -> dict[str, Any]:
        movie_tags = pc.take(tags["tags"], pc.index_in(_kept(movie.values, keep), tags["movieId"].combine_chunks()))
        return {
            **_title_and_year(_kept(raw.table["title"], keep)),
            "genres": _split_genres(_kept(raw.table["genres"], keep)),
            "tags": pc.if_else(pc.is_null(movie_tags), pa.scalar([], pa.list_(pa.string())), movie_tags),
        }

    items, item_quarantine = _items_from(raw, movie, item_fields)
    return _result(files, interactions, items, None, [*quarantines, item_quarantine])


def _tags_per_movie(path: Path) -> tuple[pa.Table, pa.Table]:
    """(movieId, tags): each movie's distinct tags, whitespace-trimmed, in first-seen order."""
    raw = _read_delimited(path, {"movieId": "integer"})
    raw.require_columns(dict.fromkeys(["movieId", "tag"]))
    movie = _integer_ids(raw, "movieId")
    trimmed = pc.utf8_trim_whitespace(_texts(raw, "tag"))
    tag = _Checked("tag", pc.if_else(pc.equal(trimmed, ""), None, trimmed), "empty")
    keep, quarantine = _keep_valid(raw, [movie, tag])
    pairs = pa.table({"movieId": _kept(movie.values, keep), "tag": _kept(tag.values, keep)})
    pairs = pairs.append_column("order", pa.array(np.arange(pairs.num_rows)))
    first_seen = pairs.group_by(["movieId", "tag"], use_threads=False).aggregate([("order", "min")])
    first_seen = first_seen.sort_by("order_min")
    per_movie = first_seen.group_by("movieId", use_threads=False).aggregate([("tag", "list")])
    return pa.table({"movieId": per_movie["movieId"], "tags": per_movie["tag_list"]}), quarantine


# --- Amazon reviews (JSON lines) ---------------------------------------------------------------


@dataclass(frozen=True)
class _AmazonReviews:
    """Field names of one release of the Amazon reviews; ``marker`` tells the release apart."""

    marker: str
    user: str
    items: tuple[str, ...]  # the first one present is the item id
    rating: str
    timestamp: str
    seconds_per_unit: int


@dataclass(frozen=True)
class _AmazonMetadata:
    marker: str
    items: tuple[str, ...]
    brand: str
    category: str
    main_category: str | None  # 2023 keeps the top-level category apart


_AMAZON_REVIEWS = {
    "2018": _AmazonReviews("reviewerID", "reviewerID", ("asin",), "overall", "unixReviewTime", 1),
    "2023": _AmazonReviews("user_id", "user_id", ("parent_asin", "asin"), "rating", "timestamp", 1_000),
}
# 2023 first: its records may carry "asin" too.
_AMAZON_METADATA = {
    "2023": _AmazonMetadata("parent_asin", ("parent_asin", "asin"), "store", "categories", "main_category"),
    "2018": _AmazonMetadata("asin", ("asin",), "brand", "category", None),
}


class _BadField(ValueError):
    """A record's field is missing or unusable; the message is the quarantine reason."""


def _read_amazon(config: SourceConfig) -> SourceTables:
    if config.path is None:
        raise InputError("source.path: required for format 'amazon' (a reviews JSON-lines file)")
    path = Path(config.path)
    refused: list[tuple[str, str, str]] = []
    rows: list[dict[str, Any]] = []
    variant: _AmazonReviews | None = None
    for source, record, text in _json_records(path, refused):
        variant = variant or _amazon_release(path, record, _AMAZON_REVIEWS, "reviews")
        try:
            rows.append(
                {
                    "user_id": str(_field(record, variant.user)),
                    "item_id": str(_field(record, *variant.items)),
                    "timestamp": _json_integer(record, variant.timestamp) // variant.seconds_per_unit,
                    "event": config.default_event,
                    "value": _json_number(record, variant.rating),
                    "source": source,
                }
            )
        except _BadField as problem:
            refused.append((str(problem), source, text))
    if variant is None and not refused:
        raise InputError(f"{path}: no interactions in the file")
    files, items = [path], ITEMS_BASE.empty_table()
    if config.items_path is not None:
        files.append(Path(config.items_path))
        items = _read_amazon_metadata(files[-1], refused)
    return _result(files, pa.Table.from_pylist(rows, schema=INTERACTIONS), items, None, [_quarantine_table(refused)])


def _read_amazon_metadata(path: Path, refused: list[tuple[str, str, str]]) -> pa.Table:
    rows: list[dict[str, Any]] = []
    variant: _AmazonMetadata | None = None
    for source, record, text in _json_records(path, refused):
        variant = variant or _amazon_release(path, record, _AMAZON_METADATA, "metadata")
        try:
            item_id = str(_field(record, *variant.items))
        except _BadField as problem:
            refused.append((str(problem), source, text))
            continue
        main_category = _strings(record.get(variant.main_category)) if variant.main_category else []
        rows.append(
            {
                "item_id": item_id,
                "title": _first_string(record.get("title")),
                "description": " ".join(_strings(record.get("description"))) or None,
                "brand": _first_string(record.get(variant.brand)),
                "category": list(dict.fromkeys(main_category + _strings(record.get(variant.category)))) or None,
            }
        )
    return pa.Table.from_pylist(rows, schema=ITEMS_BASE)


def _json_records(path: Path, refused: list[tuple[str, str, str]]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(source, record, line) for every line holding a JSON object; other non-blank lines go to ``refused``."""
    _require_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            source, text = f"{path.name}:{number}", line.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                record = json.loads(line)
            except ValueError as err:
                refused.append((f"not valid JSON: {err}", source, text))
                continue
            if isinstance(record, dict):
                yield source, record, text
            else:
                refused.append(("not a JSON object", source, text))


def _amazon_release(path: Path, record: dict[str, Any], releases: dict[str, Any], what: str) -> Any:
    """The release whose marker field the file's first good record has."""
    for release in releases.values():
        if release.marker in record:
            return release
    expected = " or ".join(f"{release.marker!r} ({name})" for name, release in releases.items())
    raise InputError(f"{path}: not Amazon {what}; the first record has fields {sorted(record)}, none of {expected}")


def _field(record: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    raise _BadField(f"missing field {keys[0]!r}")


def _json_integer(record: dict[str, Any], key: str) -> int:
    value = _field(record, key)
    usable = (
        (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value) is not None)
    )
    if not usable or abs(int(value)) >= 2**63:  # beyond int64
        raise _BadField(f"{key} not an integer")
    return int(value)


def _json_number(record: dict[str, Any], key: str) -> float:
    value = _field(record, key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not np.isfinite(number):
        raise _BadField(f"{key} not a number")
    return number


def _strings(value: Any) -> list[str]:
    """A JSON string or list of strings as the list of its non-empty strings."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and v]


def _first_string(value: Any) -> str | None:
    strings = _strings(value)
    return strings[0] if strings else None


# --- Generic tables ----------------------------------------------------------------------------

_LIST_FIELDS = ("genres", "tags", "category")


def _read_table(config: SourceConfig) -> SourceTables:
    if config.path is None:
        raise InputError("source.path: required for format 'table' (a Parquet or CSV interactions file)")
    mapping = config.columns
    unknown = sorted(set(mapping.item_fields) - set(ITEM_TEXT_FIELDS))
    if unknown:
        raise InputError(f"columns.item_fields: unknown field(s) {unknown}; known: {', '.join(ITEM_TEXT_FIELDS)}")
    kinds: dict[str, _Kind] = {mapping.timestamp: "text" if config.timestamp_unit == "iso" else "integer"}
    if mapping.value:
        kinds[mapping.value] = "number"
    raw = _read_table_file(Path(config.path), kinds)
    _require_rows(raw)
    mapped = {"user_id": mapping.user_id, "item_id": mapping.item_id, "timestamp": mapping.timestamp}
    mapped |= {"event": mapping.event, "value": mapping.value}
    raw.require_columns({column: f"columns.{name}" for name, column in mapped.items() if column})
    interactions, quarantine, _ = _interactions(
        raw,
        _text_ids(raw, mapping.user_id),
        _text_ids(raw, mapping.item_id),
        _timestamps(raw, mapping.timestamp, config.timestamp_unit),
        _Checked(mapping.value, _numbers(raw, mapping.value), "not a number", False) if mapping.value else None,
        _Checked(mapping.event, _texts(raw, mapping.event), "empty") if mapping.event else config.default_event,
    )
    files, quarantines = [raw.path], [quarantine]
    items, users = ITEMS_BASE.empty_table(), None
    if config.items_path is not None:
        items_raw = _read_table_file(Path(config.items_path), {})
        fields = mapping.item_fields
        wanted = {mapping.item_id: "columns.item_id"} | {c: f"columns.item_fields.{f}" for f, c in fields.items()}
        items_raw.require_columns(wanted)

        def item_fields(keep: pa.Array | None) -> dict[str, Any]:
            return {f: _kept(_item_field(items_raw, f, c, mapping.list_separator), keep) for f, c in fields.items()}

        items, item_quarantine = _items_from(items_raw, _text_ids(items_raw, mapping.item_id), item_fields)
        files.append(items_raw.path)
        quarantines.append(item_quarantine)
    if config.users_path is not None:
        users_raw = _read_table_file(Path(config.users_path), {})
        users_raw.require_columns({mapping.user_id: "columns.user_id"})
        users, user_quarantine = _users_from(users_raw, _text_ids(users_raw, mapping.user_id))
        files.append(users_raw.path)
        quarantines.append(user_quarantine)
    return _result(files, interactions, items, users, quarantines)


def _item_field(raw: _Raw, name: str, column: str, list_separator: str) -> pa.ChunkedArray:
    """An items-file column as the canonical field ``name``; a year that is not an integer is null."""
    values = raw.table[column]
    if name == "year":
        return pc.cast(_integers(raw, column), pa.int32())
    if name in _LIST_FIELDS:
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            return pc.cast(values, pa.list_(pa.string()))
        return pc.split_pattern(_texts(raw, column), list_separator)
    return _texts(raw, column)


# --- polyrec's own feedback log ----------------------------------------------------------------


def _read_feedback(config: SourceConfig) -> SourceTables:
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
        table = part.read()  # parts may lie on an object store, so not _read_parquet
        raw = _Raw(Path(part.name), table, np.arange(table.num_rows), f"{part.name}:row ", _json_rows)
        raw.require_columns(dict.fromkeys(["event_id", "ts", "user_id", "item_id", "event", "value"]))
        row_counts.append(raw.table.num_rows)
        # Impressions and the like are not interactions; a row without an event is kept, to be refused.
        wanted = pc.or_kleene(pc.is_in(raw.table["event"], wanted_events), pc.is_null(raw.table["event"]))
        raw = raw.filtered(wanted.to_numpy(zero_copy_only=False))
        event_id = _Checked("event_id", _texts(raw, "event_id"), "empty")
        interactions, quarantine, keep = _interactions(
            raw,
            _text_ids(raw, "user_id"),
            _text_ids(raw, "item_id"),
            _timestamps(raw, "ts", "ms"),
            _Checked("value", _numbers(raw, "value"), "not a number", required=False),
            _Checked("event", _texts(raw, "event"), "empty"),
            also=(event_id,),
        )
        logs.append((interactions, _kept(event_id.values, keep), _kept(raw.table, keep)))
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
        duplicates = [("duplicate event_id", source, text) for source, text in zip(sources, _json_rows(originals))]
        quarantines.append(_quarantine_table(duplicates))
        interactions = interactions.filter(pa.array(first))
    files = [part.uri for part in parts]
    items = ITEMS_BASE.empty_table()
    if config.items_path is not None:
        items, registry_quarantine, registry_files = _registered_items(config.items_path)
        files += registry_files
        quarantines.append(registry_quarantine)
    return _result(files, interactions, items, None, quarantines)


def _registered_items(uri: str) -> tuple[pa.Table, pa.Table, list[str]]:
    """The service's item registry as ITEMS_BASE rows (title, and the registered text as ``full_text``: the
    service encoded it as is), the quarantine of its unreadable lines, and the file when there is one."""
    registry = storage.resolve(uri, "source.items_path")
    files = [storage.file_uri(registry, registry.path)] if storage.exists(registry) else []
    refused: list[tuple[str, str, str]] = []
    registered = read_registered_items(uri, refused)
    rows = [{"item_id": item.item_id, "title": item.title or None, "full_text": item.text} for item in registered]
    return pa.Table.from_pylist(rows, schema=ITEMS_BASE), _quarantine_table(refused), files


_READERS: dict[str, Callable[[SourceConfig], SourceTables]] = {
    "movielens-100k": _read_movielens_100k,
    "movielens-1m": _read_movielens_1m,
    "movielens-csv": _read_movielens_csv,
    "amazon": _read_amazon,
    "table": _read_table,
    "feedback": _read_feedback,
}
