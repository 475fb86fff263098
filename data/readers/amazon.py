"""Amazon reviews, the 2018 and 2023 releases (JSON lines, optionally gzipped), with the item metadata file
as ``source.items_path``; the release is told apart by the fields of the first good record.

The files are read in a Python loop, one record at a time, the reviews by Ray tasks batch by batch (a task per
span of lines of an uncompressed file); a line that is not a JSON object, or a record missing a field, goes to
the quarantine with its line.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.errors import InputError
from data.config import SourceConfig
from data.readers.canonical import READ_ROWS, SourceTables, source_tables, stream_interactions
from data.readers.files import WHOLE_FILE, LineSpan, Refused, line_spans, quarantine_table, require_file
from data.schema import ITEMS_BASE


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


#: Reviews per block of the read task's output.
_REVIEWS_PER_BATCH = 100_000


def read_amazon(config: SourceConfig) -> SourceTables:
    if config.path is None:
        raise InputError("source.path: required for format 'amazon' (a reviews JSON-lines file)")
    path = Path(config.path)
    first_records = (record for _, record, _ in _json_records(path, lambda *refused: None))
    variant = next((_amazon_release(path, record, _AMAZON_REVIEWS, "reviews") for record in first_records), None)
    reads = [functools.partial(_review_rows, path, span, variant, config.default_event) for span in line_spans(path)]
    interactions = stream_interactions(path, f"{path.name}:", reads)
    files, items, refused = [path], ITEMS_BASE.empty_table(), []
    if config.items_path is not None:
        files.append(Path(config.items_path))
        items = _read_amazon_metadata(files[-1], refused)
    return source_tables(files, interactions, items, None, [quarantine_table(refused)])


def _review_rows(path: Path, span: LineSpan, variant: _AmazonReviews | None, event: str) -> Iterator[pa.Table]:
    """READ_ROWS of the reviews in ``span``, batch by batch; ``variant`` is None when no line holds a JSON object."""
    rows: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []

    def refuse(number: int, reason: str, text: str) -> None:
        refused.append({"part": 0, "number": number, "reason": reason, "record": text})

    for number, record, text in _json_records(path, refuse, span):
        assert variant is not None  # the first record told the release
        try:
            rows.append(
                {
                    "user_id": str(_field(record, variant.user)),
                    "item_id": str(_field(record, *variant.items)),
                    "timestamp": _json_integer(record, variant.timestamp) // variant.seconds_per_unit,
                    "event": event,
                    "value": _json_number(record, variant.rating),
                    "part": 0,
                    "number": number,
                }
            )
        except _BadField as problem:
            refuse(number, str(problem), text)
        if len(rows) + len(refused) == _REVIEWS_PER_BATCH:
            yield pa.Table.from_pylist(rows + refused, schema=READ_ROWS)
            rows.clear()
            refused.clear()
    yield pa.Table.from_pylist(rows + refused, schema=READ_ROWS)


def _read_amazon_metadata(path: Path, refused: list[Refused]) -> pa.Table:
    rows: list[dict[str, Any]] = []
    variant: _AmazonMetadata | None = None

    def refuse(number: int, reason: str, text: str) -> None:
        refused.append((reason, f"{path.name}:{number}", text))

    for number, record, text in _json_records(path, refuse):
        variant = variant or _amazon_release(path, record, _AMAZON_METADATA, "metadata")
        try:
            item_id = str(_field(record, *variant.items))
        except _BadField as problem:
            refuse(number, str(problem), text)
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


def _json_records(path: Path, refuse: Callable[[int, str, str], None], span: LineSpan = WHOLE_FILE) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(line number, record, line) for every line of ``span`` holding a JSON object; other non-blank lines go to
    ``refuse(line number, reason, line)``."""
    require_file(path)
    for number, line in enumerate(span.lines(path), start=span.lines_before + 1):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            record = json.loads(line)
        except ValueError as err:
            refuse(number, f"not valid JSON: {err}", text)
            continue
        if isinstance(record, dict):
            yield number, record, text
        else:
            refuse(number, "not a JSON object", text)


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
