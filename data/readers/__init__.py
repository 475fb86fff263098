"""Source readers: every supported dataset layout → the canonical tables of ``data.schema``.

``read_source`` turns one ``SourceConfig`` into ``SourceTables``: interactions in source order, the
item text fields, the user attributes when the source has them, and one quarantine row for every
line that could not be read (why, where, and the raw line); every other line is kept. The interaction
files (MovieLens ratings, a generic table) are read by Ray tasks, batch by batch, into a Ray dataset
(``SourceTables.streamed``): the driver holds the small files only. ``SourceTables.collected()`` brings
everything into the driver, for small sources.

``READERS`` maps each ``source.format`` to its reader, one module per source family:

* ``movielens``: the MovieLens 100K, 1M and CSV layouts;
* ``amazon``: Amazon reviews 2018 and 2023 (JSON lines) with their metadata;
* ``generic_table``: any Parquet, CSV or TSV table, its columns mapped by ``source.columns``;
* ``feedback``: polyrec's own feedback log and the items registered through the service.

They share ``files`` (parsing a file into rows that know where they came from), ``columns`` (converting
columns, with a reason for every refused value) and ``canonical`` (``SourceTables`` and the canonical
tables built from checked columns).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from common.errors import InputError
from data.config import SourceConfig
from data.readers.amazon import read_amazon
from data.readers.canonical import SourceTables
from data.readers.feedback import read_feedback
from data.readers.generic_table import read_generic_table
from data.readers.movielens import read_movielens_1m, read_movielens_100k, read_movielens_csv
from data.schema import INTERACTIONS

__all__ = ["READERS", "SourceTables", "read_source", "read_sources"]

#: ``source.format`` → its reader; ``data.config.SourceFormat`` lists the same names.
READERS: dict[str, Callable[[SourceConfig], SourceTables]] = {
    "movielens-100k": read_movielens_100k,
    "movielens-1m": read_movielens_1m,
    "movielens-csv": read_movielens_csv,
    "amazon": read_amazon,
    "table": read_generic_table,
    "feedback": read_feedback,
}


def read_source(config: SourceConfig) -> SourceTables:
    """One source in canonical form; bad input raises ``InputError`` naming the file, column or setting."""
    reader = READERS.get(config.format)
    if reader is None:
        raise InputError(f"source.format: unknown format {config.format!r}; known formats are: {', '.join(READERS)}")
    return reader(config)


def read_sources(configs: list[SourceConfig]) -> SourceTables:
    """The sources one after the other, e.g. the base dataset followed by the feedback log."""
    if not configs:
        raise InputError("no sources configured")
    parts = [read_source(config) for config in configs]
    users = [part.users for part in parts if part.users is not None]
    return SourceTables(
        # Each source's interactions stay apart, in source order: a file's own are not read into the driver.
        interactions=INTERACTIONS.empty_table(),
        items=pa.concat_tables([part.items for part in parts]),
        # Sources may know different user attributes; a user lacking one gets null there.
        users=pa.concat_tables(users, promote_options="permissive") if users else None,
        quarantine=pa.concat_tables([part.quarantine for part in parts]),
        files=[name for part in parts for name in part.files],
        streamed=[inputs for part in parts for inputs in part.interaction_inputs()],
    )
