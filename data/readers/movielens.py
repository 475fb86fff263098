"""MovieLens sources: the 100K layout (``u.data``, ``u.item``, ``u.user``), 1M (``ratings.dat``, ``movies.dat``,
``users.dat``, ``::``-separated) and the CSV releases (``ratings.csv``, ``movies.csv``, optional ``tags.csv``).

Ids are integers, kept as their decimal text; titles lose their "(year)", which becomes the ``year`` field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import InputError
from data.config import DEFAULT_DATASET_DIR, SourceConfig
from data.readers.canonical import SourceTables, StreamedInteractions, items_from, read_rows_from, read_rows_of, source_tables, stream_interactions, users_from
from data.readers.columns import CheckedColumn, integer_ids, integers, keep_valid, kept, numbers, texts, timestamps
from data.readers.files import Delimited, FileRows, delimited_batches, line_spans, read_delimited, require_file

_TITLE_WITH_YEAR = r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{4})?\)\s*$"
_NO_GENRES = "(no genres listed)"


def _title_and_year(titles: pa.ChunkedArray) -> dict[str, pa.ChunkedArray]:
    """ "Toy Story (1995)" → title "Toy Story", year 1995; a title without a year is kept whole."""
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
        require_file(folder / name, f"; a {self.name} folder holds {self.contents()}")
        return folder / name

    def contents(self) -> str:
        return ", ".join(name for name in (self.ratings, self.movies, self.users) if name)

    def read_ratings(self, folder: Path, event: str) -> StreamedInteractions:
        user, item, rating, timestamp = self.rating_columns
        path = self.file(folder, self.ratings)
        layout = Delimited(self.separator, None if self.csv else list(self.rating_columns), quoted=self.csv)

        def read_rows(raw: FileRows) -> pa.Table:
            raw.require_columns(dict.fromkeys(self.rating_columns))
            return read_rows_from(
                raw,
                integer_ids(raw, user),
                integer_ids(raw, item),
                timestamps(raw, timestamp, "s"),
                CheckedColumn(rating, numbers(raw, rating), "not a number"),
                event,
            )

        spans = line_spans(path)
        reads = [functools.partial(read_rows_of, functools.partial(delimited_batches, path, layout, span), read_rows) for span in spans]
        return stream_interactions(path, f"{path.name}:", reads)

    def read_users(self, folder: Path, separator: str, attributes: list[str]) -> tuple[pa.Table | None, list[pa.Table], list[Path]]:
        """Users, their quarantine and the file, if the folder has a users file (some releases have none)."""
        path = folder / self.users if self.users else None
        if path is None or not path.is_file():
            return None, [], []
        columns = ["user_id", *attributes]
        raw = read_delimited(path, {"user_id": "integer"}, Delimited(separator, columns, quoted=False))
        users, quarantine = users_from(raw, integer_ids(raw, "user_id"))
        return users, [quarantine], [path]


_RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_ML_100K = _MovieLensLayout("MovieLens-100K", "u.data", "u.item", "u.user", "\t", False, "latin-1", _RATING_COLUMNS, DEFAULT_DATASET_DIR)
_ML_1M = _MovieLensLayout("MovieLens-1M", "ratings.dat", "movies.dat", "users.dat", "::", False, "latin-1", _RATING_COLUMNS)
_ML_CSV = _MovieLensLayout("MovieLens CSV", "ratings.csv", "movies.csv", None, ",", True, "utf8", ("userId", "movieId", "rating", "timestamp"))

#: u.item's genre flags, in order, for a folder without u.genre.
_ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def read_movielens_100k(config: SourceConfig) -> SourceTables:
    layout = _ML_100K
    folder = layout.folder(config)
    interactions = layout.read_ratings(folder, config.default_event)
    files = [folder / layout.ratings]
    genres = _ML_100K_GENRES
    if (folder / "u.genre").is_file():
        # "name|index" lines, in index order.
        lines = (folder / "u.genre").read_text(encoding="latin-1").splitlines()
        genres = tuple(line.rsplit("|", 1)[0] for line in lines if line.strip())
        files.append(folder / "u.genre")
    raw = read_delimited(
        layout.file(folder, layout.movies),
        {"item_id": "integer", **dict.fromkeys(genres, "integer")},
        Delimited("|", ["item_id", "title", "release_date", "video_release_date", "url", *genres], layout.movie_encoding, quoted=False),
    )

    def item_fields(keep: pa.Array | None) -> dict[str, Any]:
        flags = np.column_stack([kept(integers(raw, genre), keep).to_numpy(zero_copy_only=False) == 1 for genre in genres])
        rows, columns = np.nonzero(flags)  # row-major: each item's genres in u.genre order
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(flags)))]).astype(np.int32)
        names = pa.array(np.array(genres, dtype=object)[columns], pa.string())
        genre_lists = pa.ListArray.from_arrays(pa.array(offsets), names)
        return {**_title_and_year(kept(raw.table["title"], keep)), "genres": genre_lists}

    items, item_quarantine = items_from(raw, integer_ids(raw, "item_id"), item_fields)
    users, user_quarantines, user_files = layout.read_users(folder, "|", ["age", "gender", "occupation", "zip"])
    quarantines = [item_quarantine, *user_quarantines]
    return source_tables([*files, raw.path, *user_files], interactions, items, users, quarantines)


def read_movielens_1m(config: SourceConfig) -> SourceTables:
    layout = _ML_1M
    folder = layout.folder(config)
    interactions = layout.read_ratings(folder, config.default_event)
    raw = read_delimited(
        layout.file(folder, layout.movies),
        {"item_id": "integer"},
        Delimited("::", ["item_id", "title", "genres"], layout.movie_encoding, quoted=False),
    )

    def item_fields(keep: pa.Array | None) -> dict[str, Any]:
        genres = _split_genres(kept(raw.table["genres"], keep))
        return {**_title_and_year(kept(raw.table["title"], keep)), "genres": genres}

    items, item_quarantine = items_from(raw, integer_ids(raw, "item_id"), item_fields)
    users, user_quarantines, user_files = layout.read_users(folder, "::", ["gender", "age", "occupation", "zip"])
    files = [folder / layout.ratings, raw.path, *user_files]
    return source_tables(files, interactions, items, users, [item_quarantine, *user_quarantines])


def read_movielens_csv(config: SourceConfig) -> SourceTables:
    layout = _ML_CSV
    folder = layout.folder(config)
    interactions = layout.read_ratings(folder, config.default_event)
    raw = read_delimited(layout.file(folder, layout.movies), {"movieId": "integer"})
    raw.require_columns(dict.fromkeys(["movieId", "title", "genres"]))
    files, quarantines = [folder / layout.ratings, raw.path], []
    tags = pa.table({"movieId": pa.array([], pa.string()), "tags": pa.array([], pa.list_(pa.string()))})
    if (folder / "tags.csv").is_file():
        tags, tag_quarantine = _tags_per_movie(folder / "tags.csv")
        files.append(folder / "tags.csv")
        quarantines.append(tag_quarantine)
    movie = integer_ids(raw, "movieId")

    def item_fields(keep: pa.Array | None) -> dict[str, Any]:
        movie_tags = pc.take(tags["tags"], pc.index_in(kept(movie.values, keep), tags["movieId"].combine_chunks()))
        return {
            **_title_and_year(kept(raw.table["title"], keep)),
            "genres": _split_genres(kept(raw.table["genres"], keep)),
            "tags": pc.if_else(pc.is_null(movie_tags), pa.scalar([], pa.list_(pa.string())), movie_tags),
        }

    items, item_quarantine = items_from(raw, movie, item_fields)
    return source_tables(files, interactions, items, None, [*quarantines, item_quarantine])


def _tags_per_movie(path: Path) -> tuple[pa.Table, pa.Table]:
    """(movieId, tags): each movie's distinct tags, whitespace-trimmed, in first-seen order."""
    raw = read_delimited(path, {"movieId": "integer"})
    raw.require_columns(dict.fromkeys(["movieId", "tag"]))
    movie = integer_ids(raw, "movieId")
    trimmed = pc.utf8_trim_whitespace(texts(raw, "tag"))
    tag = CheckedColumn("tag", pc.if_else(pc.equal(trimmed, ""), None, trimmed), "empty")
    keep, quarantine = keep_valid(raw, [movie, tag])
    pairs = pa.table({"movieId": kept(movie.values, keep), "tag": kept(tag.values, keep)})
    pairs = pairs.append_column("order", pa.array(np.arange(pairs.num_rows)))
    first_seen = pairs.group_by(["movieId", "tag"], use_threads=False).aggregate([("order", "min")])
    first_seen = first_seen.sort_by("order_min")
    per_movie = first_seen.group_by("movieId", use_threads=False).aggregate([("tag", "list")])
    return pa.table({"movieId": per_movie["movieId"], "tags": per_movie["tag_list"]}), quarantine
