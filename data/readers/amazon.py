"""Amazon reviews, the 2018 and 2023 releases (JSON lines, optionally gzipped), with the item metadata file
as ``source.items_path``; the release is told apart by the fields of the first good record.

The files are small enough to read in a Python loop, one record at a time; a line that is not a JSON
object, or a record missing a field, goes to the quarantine with its line.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.errors import InputError
from data.config import SourceConfig
from data.readers.canonical import SourceTables, source_tables
from data.readers.files import Refused, quarantine_table, require_file
from data.schema import INTERACTIONS, ITEMS_BASE


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


def read_amazon(config: SourceConfig) -> SourceTables:
    if config.path is None:
        raise InputError("source.path: required for format 'amazon' (a reviews JSON-lines file)")
    path = Path(config.path)
    refused: list[Refused] = []
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
    return source_tables(files, pa.Table.from_pylist(rows, schema=INTERACTIONS), items, None, [quarantine_table(refused)])


def _read_amazon_metadata(path: Path, refused: list[Refused]) -> pa.Table:
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


def _json_records(path: Path, refused: list[Refused]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(source, record, line) for every line holding a JSON object; other non-blank lines go to ``refused``."""
    require_file(path)
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
