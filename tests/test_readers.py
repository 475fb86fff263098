"""Readers: each source format on small files written here, the embedded MovieLens-100K, corrupted
lines going to the quarantine with their line numbers, and the errors a user can run into."""

from __future__ import annotations

import gzip
import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray

from cluster.cli import main as polyrec
from common.errors import InputError
from data.config import DEFAULT_DATASET_DIR, ColumnMapping, SourceConfig, SourceFormat
from data.readers import READERS, SourceTables, files, read_source, read_sources
from data.schema import FEEDBACK_LOG, INTERACTIONS, ITEMS_BASE, QUARANTINE


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    """The interaction files are read by Ray tasks."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _read(config: SourceConfig) -> SourceTables:
    return read_source(config).collected()


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` in ``encoding`` at ``path``, gzipped if ``path`` ends in ``.gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _rows(table: pa.Table, *columns: str) -> list[tuple]:
    return [tuple(row[c] for c in columns) for row in table.to_pylist()]


def _quarantined(tables: SourceTables) -> list[tuple[str, str, str]]:
    assert set(tables.quarantine.column("stage").to_pylist()) <= {"read"}
    return _rows(tables.quarantine, "reason", "source", "record")


def _assert_schemas(tables: SourceTables) -> None:
    assert tables.interactions.schema.equals(INTERACTIONS)
    assert tables.items.schema.equals(ITEMS_BASE)
    assert tables.quarantine.schema.equals(QUARANTINE)


def _item(item_id: str, **fields) -> dict:
    return {name: fields.get(name) for name in ITEMS_BASE.names} | {"item_id": item_id}


# --- The embedded MovieLens-100K ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k() -> SourceTables:
    return _read(SourceConfig())


def test_embedded_movielens_100k(ml100k: SourceTables) -> None:
    _assert_schemas(ml100k)
    interactions = ml100k.interactions
    assert interactions.num_rows == 100_000
    assert len(set(interactions.column("user_id").to_pylist())) == 943
    histogram = Counter(interactions.column("value").to_pylist())
    assert histogram == {1.0: 6110, 2.0: 11370, 3.0: 27145, 4.0: 34174, 5.0: 21201}
    assert set(interactions.column("event").to_pylist()) == {"rate"}
    # u.data's first line is "196\t242\t3\t881250949"; sources follow the file's lines.
    assert interactions.slice(0, 1).to_pylist()[0] == {
        "user_id": "196", "item_id": "242", "timestamp": 881250949, "event": "rate", "value": 3.0, "source": "u.data:1",
    }  # fmt: skip
    assert interactions.column("source")[99_999].as_py() == "u.data:100000"

    items = {row["item_id"]: row for row in ml100k.items.to_pylist()}
    assert len(items) == ml100k.items.num_rows == 1682
    assert items["1"] == _item("1", title="Toy Story", year=1995, genres=["Animation", "Children's", "Comedy"])
    assert "Misérables" in items["543"]["title"]
    assert items["543"]["title"] == "Misérables, Les" and items["543"]["genres"] == ["Drama", "Musical"]
    assert items["267"]["title"] == "unknown" and items["267"]["year"] is None

    assert ml100k.users is not None and ml100k.users.num_rows == 943
    assert ml100k.users.column_names == ["user_id", "age", "gender", "occupation", "zip"]
    first_user = {"user_id": "1", "age": "24", "gender": "M", "occupation": "technician", "zip": "85711"}
    assert ml100k.users.slice(0, 1).to_pylist()[0] == first_user
    assert ml100k.quarantine.num_rows == 0
    assert [Path(f).name for f in ml100k.files] == ["u.data", "u.genre", "u.item", "u.user"]


def test_corrupted_lines_are_quarantined_and_the_rest_kept(tmp_path: Path, ml100k: SourceTables) -> None:
    folder = tmp_path / "ml-100k"
    shutil.copytree(DEFAULT_DATASET_DIR, folder)
    lines = (folder / "u.data").read_text().splitlines()
    bad = {
        10: "\t".join(lines[9].split("\t")[:3]),  # 3 fields
        20: lines[19].rsplit("\t", 2)[0] + "\tfour\t" + lines[19].rsplit("\t", 1)[1],  # rating
        30: lines[29].rsplit("\t", 1)[0] + "\t8812x0949",  # timestamp
        40: "abc\t" + lines[39].split("\t", 1)[1],  # user id
    }
    for number, line in bad.items():
        lines[number - 1] = line
    (folder / "u.data").write_text("\n".join(lines) + "\n")

    tables = _read(SourceConfig(path=str(folder)))

    assert _quarantined(tables) == [
        ("expected 4 fields, got 3", "u.data:10", bad[10]),
        ("rating not a number", "u.data:20", bad[20]),
        ("timestamp not an integer", "u.data:30", bad[30]),
        ("user_id not an integer", "u.data:40", bad[40]),
    ]
    expected = [row for row in ml100k.interactions.to_pylist() if int(row["source"].split(":")[1]) not in bad]
    assert tables.interactions.to_pylist() == expected
    assert tables.items.equals(ml100k.items)


# --- MovieLens-1M and the CSV releases ---------------------------------------------------------


def test_movielens_1m(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::3408::4::978300275\n")
    movies = "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Misérables, Les (1995)::Drama|Musical\n"
    movies += "3408::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Sci-Fi\n"
    _write(tmp_path / "movies.dat", movies, encoding="latin-1")
    _write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")

    tables = _read(SourceConfig(format="movielens-1m", path=str(tmp_path)))

    _assert_schemas(tables)
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "event", "value", "source") == [
        ("1", "1193", 978300760, "rate", 5.0, "ratings.dat:1"),
        ("1", "661", 978302109, "rate", 3.0, "ratings.dat:2"),
        ("2", "3408", 978300275, "rate", 4.0, "ratings.dat:3"),
    ]
    assert tables.items.to_pylist() == [
        _item("1193", title="One Flew Over the Cuckoo's Nest", year=1975, genres=["Drama"]),
        _item("661", title="Misérables, Les", year=1995, genres=["Drama", "Musical"]),
        _item("3408", title="Star Wars: Episode IV - A New Hope", year=1977, genres=["Action", "Adventure", "Sci-Fi"]),
    ]
    assert tables.users.to_pylist() == [
        {"user_id": "1", "gender": "F", "age": "1", "occupation": "10", "zip": "48067"},
        {"user_id": "2", "gender": "M", "age": "56", "occupation": "16", "zip": "70072"},
    ]
    assert tables.quarantine.num_rows == 0
    assert [Path(f).name for f in tables.files] == ["ratings.dat", "movies.dat", "users.dat"]


def test_movielens_1m_bad_lines_report_fields_not_colons(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3\n2::3408::x::978300275\n2::1193::4::978300276\n")
    _write(tmp_path / "movies.dat", "1193::Movie (1975)::Drama\n")

    tables = _read(SourceConfig(format="movielens-1m", path=str(tmp_path)))

    assert _quarantined(tables) == [
        ("expected 4 fields, got 3", "ratings.dat:2", "1::661::3"),
        ("rating not a number", "ratings.dat:3", "2::3408::x::978300275"),
    ]
    assert tables.interactions.column("source").to_pylist() == ["ratings.dat:1", "ratings.dat:4"]
    assert tables.users is None  # ml-10m-style folder without users.dat


def _movielens_csv(folder: Path, ratings: str) -> Path:
    _write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n" + ratings)
    _write(
        folder / "movies.csv",
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "209171,Women of Devil's Island (1962),(no genres listed)\n",
    )
    _write(
        folder / "tags.csv",
        "userId,movieId,tag,timestamp\n"
        "2,11,politics,1445714994\n"
        '3,11,"romance, light",1445714996\n'
        "4,11, politics ,1445714997\n"  # a repeat once trimmed
        "4,1,pixar,1445714998\n"
        "5,11,Aaron Sorkin,1445715000\n"
        "5,999,no such movie,1445715001\n",
    )
    return folder


def test_movielens_csv_with_quoted_titles_and_tags(tmp_path: Path) -> None:
    folder = _movielens_csv(tmp_path, "1,1,4.0,1147880044\n1,11,3.5,1147868817\n\n2,209171,0.5,1147868828\n")

    tables = _read(SourceConfig(format="movielens-csv", path=str(folder)))

    _assert_schemas(tables)
    # The blank line 4 is neither an interaction nor quarantined, and later lines keep their numbers.
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "value", "source") == [
        ("1", "1", 1147880044, 4.0, "ratings.csv:2"),
        ("1", "11", 1147868817, 3.5, "ratings.csv:3"),
        ("2", "209171", 1147868828, 0.5, "ratings.csv:5"),
    ]
    assert tables.items.to_pylist() == [
        _item("1", title="Toy Story", year=1995, genres=["Adventure", "Animation", "Children", "Comedy", "Fantasy"],
              tags=["pixar"]),
        _item("11", title="American President, The", year=1995, genres=["Comedy", "Drama", "Romance"],
              tags=["politics", "romance, light", "Aaron Sorkin"]),
        _item("209171", title="Women of Devil's Island", year=1962, genres=[], tags=[]),
    ]  # fmt: skip
    assert tables.users is None
    assert tables.quarantine.num_rows == 0
    assert [Path(f).name for f in tables.files] == ["ratings.csv", "movies.csv", "tags.csv"]


def test_movielens_csv_bad_lines(tmp_path: Path) -> None:
    ratings = "1,1,4.0,1147880044\n1,11,3.5\n1,11,abc,1147868817\n2,11,,1147868817\n2,1,5.0,1147868828\n"
    folder = _movielens_csv(tmp_path, ratings)

    tables = _read(SourceConfig(format="movielens-csv", path=str(folder)))

    assert _quarantined(tables) == [
        ("expected 4 fields, got 3", "ratings.csv:3", "1,11,3.5"),
        ("rating not a number", "ratings.csv:4", "1,11,abc,1147868817"),
        ("rating missing", "ratings.csv:5", "2,11,,1147868817"),
    ]
    assert tables.interactions.column("source").to_pylist() == ["ratings.csv:2", "ratings.csv:6"]


def test_the_driver_parses_only_the_first_block_of_a_large_ratings_file(tmp_path: Path) -> None:
    """The ratings are parsed by a Ray task: while the source is read and its rows counted, the driver's
    Arrow allocations stay far below what the parsed file takes. (The reader parses the first block here,
    to refuse an unusable file at once, and pyarrow reads a fixed amount ahead of it: about 40 MB.)"""
    count = 4_000_000
    rng = np.random.default_rng(0)
    ratings = pa.table(
        {
            "userId": rng.integers(1, 10_000, count),
            "movieId": rng.choice([1, 11, 209171], count),
            "rating": rng.integers(1, 11, count) / 2,
            "timestamp": rng.integers(1_000_000_000, 1_500_000_000, count),
        }
    )
    folder = _movielens_csv(tmp_path, "")
    pacsv.write_csv(ratings, folder / "ratings.csv", pacsv.WriteOptions(quoting_style="none"))
    pool = pa.default_memory_pool()
    before = peak = pool.bytes_allocated()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, pool.bytes_allocated())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        tables = read_source(SourceConfig(format="movielens-csv", path=str(folder)))
        read = tables.streamed[0].rows.count()
        peak = max(peak, pool.bytes_allocated())
    finally:
        done.set()
        sampler.join()

    assert read == count and tables.interactions.num_rows == 0
    assert peak - before < ratings.nbytes / 2


# --- Amazon reviews ----------------------------------------------------------------------------


def _json_lines(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    text = "".join(json.dumps(record) + "\n" for record in records) + "".join(line + "\n" for line in extra_lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_amazon_2018_with_a_truncated_line(tmp_path: Path) -> None:
    truncated = '{"overall": 4.0, "reviewerID": "A2", "asin": "B01'
    reviews = _json_lines(
        tmp_path / "Video_Games.json",
        [
            {"overall": 5.0, "verified": True, "reviewTime": "10 17, 2015", "reviewerID": "A1", "asin": "0700026657",
             "unixReviewTime": 1445040000},
            {"overall": "bad", "reviewerID": "A1", "asin": "0700026658", "unixReviewTime": 1445040001},
        ],
        extra_lines=(
            truncated,
            json.dumps({"overall": 3.0, "reviewerID": "A3", "asin": "0700026657", "unixReviewTime": 1445040002}),
        ),
    )  # fmt: skip
    meta = _json_lines(
        tmp_path / "meta_Video_Games.json",
        [
            {"asin": "0700026657", "title": "Anno 2070", "brand": "Ubisoft", "category": ["Video Games", "PC", "Games"],
             "description": ["Build a city.", "Save the planet."]},
            {"asin": "0700026658", "title": "Other", "description": "Just text.", "category": []},
        ],
    )  # fmt: skip

    tables = _read(SourceConfig(format="amazon", path=str(reviews), items_path=str(meta)))

    _assert_schemas(tables)
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "event", "value", "source") == [
        ("A1", "0700026657", 1445040000, "rate", 5.0, "Video_Games.json:1"),
        ("A3", "0700026657", 1445040002, "rate", 3.0, "Video_Games.json:4"),
    ]
    [(reason_2, source_2, _), (reason_3, source_3, record_3)] = _quarantined(tables)
    assert (reason_2, source_2) == ("overall not a number", "Video_Games.json:2")
    assert reason_3.startswith("not valid JSON") and (source_3, record_3) == ("Video_Games.json:3", truncated)
    assert tables.items.to_pylist() == [
        _item("0700026657", title="Anno 2070", brand="Ubisoft", category=["Video Games", "PC", "Games"],
              description="Build a city. Save the planet."),
        _item("0700026658", title="Other", description="Just text."),
    ]  # fmt: skip


def test_amazon_2023_gzipped(tmp_path: Path) -> None:
    reviews = _json_lines(
        tmp_path / "All_Beauty.jsonl.gz",
        [
            {"rating": 5.0, "title": "Great", "asin": "B00YQ6X8EO", "parent_asin": "B00YQ6X8EO", "user_id": "AGKH", "timestamp": 1588687728923},
            {"rating": 4, "asin": "B081TJ8YS3", "parent_asin": "B081TJ8YS4", "user_id": "AGKH", "timestamp": 1588615855070},
            {"rating": 1.0, "asin": "B0000000AA", "user_id": "AE23", "timestamp": 1589665266052},
            {"rating": 2.0, "parent_asin": "B0000000AB", "user_id": "AE23"},
        ],
    )
    meta = _json_lines(
        tmp_path / "meta_All_Beauty.jsonl.gz",
        [
            {"main_category": "All Beauty", "title": "Howard LC0008", "store": "Howard Products", "categories": [],
             "description": [], "parent_asin": "B00YQ6X8EO"},
            {"main_category": "All Beauty", "title": "Yes to Tomatoes", "store": "Yes To",
             "categories": ["Beauty", "Skin Care"], "description": ["Clears skin."], "parent_asin": "B081TJ8YS4"},
        ],
    )  # fmt: skip

    tables = _read(SourceConfig(format="amazon", path=str(reviews), items_path=str(meta)))

    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "value", "source") == [
        ("AGKH", "B00YQ6X8EO", 1588687728, 5.0, "All_Beauty.jsonl.gz:1"),
        ("AGKH", "B081TJ8YS4", 1588615855, 4.0, "All_Beauty.jsonl.gz:2"),  # parent_asin wins
        ("AE23", "B0000000AA", 1589665266, 1.0, "All_Beauty.jsonl.gz:3"),  # no parent_asin: asin
    ]
    assert _rows(tables.quarantine, "reason", "source") == [("missing field 'timestamp'", "All_Beauty.jsonl.gz:4")]
    assert tables.items.to_pylist() == [
        _item("B00YQ6X8EO", title="Howard LC0008", brand="Howard Products", category=["All Beauty"]),
        _item("B081TJ8YS4", title="Yes to Tomatoes", brand="Yes To", category=["All Beauty", "Beauty", "Skin Care"],
              description="Clears skin."),
    ]  # fmt: skip
    assert [Path(f).name for f in tables.files] == ["All_Beauty.jsonl.gz", "meta_All_Beauty.jsonl.gz"]


# --- Generic tables ----------------------------------------------------------------------------


def test_table_csv_with_a_mapping_and_millisecond_timestamps(tmp_path: Path) -> None:
    ratings = _write(
        tmp_path / "events.csv",
        "uid,iid,when_ms,action,score,extra\nu1,i1,1600000000999,click,,x\nu2,i2,1600000001000,rate,4.5,y\nu2,i1,16000000x,rate,4.0,z\n",
    )
    items = _write(tmp_path / "items.csv", 'iid,name,kinds,yr\ni1,"Widget, large",tools|home,2001\ni2,Gadget,,n/a\n')
    users = _write(tmp_path / "users.csv", "uid,country,age\nu1,FR,31\nu2,DE,\n")
    mapping = ColumnMapping(
        user_id="uid", item_id="iid", timestamp="when_ms", event="action", value="score",
        item_fields={"title": "name", "genres": "kinds", "year": "yr"},
    )  # fmt: skip
    config = SourceConfig(
        format="table", path=str(ratings), items_path=str(items), users_path=str(users), columns=mapping,
        timestamp_unit="ms",
    )  # fmt: skip

    tables = _read(config)

    _assert_schemas(tables)
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "event", "value", "source") == [
        ("u1", "i1", 1600000000, "click", None, "events.csv:2"),
        ("u2", "i2", 1600000001, "rate", 4.5, "events.csv:3"),
    ]
    assert _quarantined(tables) == [("when_ms not an integer", "events.csv:4", "u2,i1,16000000x,rate,4.0,z")]
    assert tables.items.to_pylist() == [
        _item("i1", title="Widget, large", genres=["tools", "home"], year=2001),
        _item("i2", title="Gadget"),  # an unusable year is left out, the item kept
    ]
    assert tables.users.to_pylist() == [
        {"user_id": "u1", "country": "FR", "age": "31"},
        {"user_id": "u2", "country": "DE", "age": None},  # an empty field is null
    ]


@pytest.mark.parametrize("compression", ["", ".gz"])
def test_table_csv_rows_with_bytes_not_utf8_are_quarantined_and_the_rest_kept(tmp_path: Path, compression: str) -> None:
    """Written as latin-1, each "ÿ" or "é" below is one byte that is not UTF-8 in a file that otherwise is."""
    events = _write(
        tmp_path / f"events.csv{compression}",
        "user_id,item_id,timestamp,rating\nu1,i1,1,4\nu2,i\xff2,2,3\nu3,i3,3,5\nu\xff4,i\xff4,4,2\n",
        encoding="latin-1",
    )
    items = _write(tmp_path / f"items.csv{compression}", "item_id,title\ni1,A\ni3,Caf\xe9\ni5,E\n", encoding="latin-1")

    tables = _read(SourceConfig(format="table", path=str(events), items_path=str(items), columns=ColumnMapping(item_fields={"title": "title"})))

    _assert_schemas(tables)
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "value", "source") == [
        ("u1", "i1", 1, 4.0, f"{events.name}:2"),
        ("u3", "i3", 3, 5.0, f"{events.name}:4"),
    ]
    assert _quarantined(tables) == [
        ("item_id not valid UTF-8", f"{events.name}:3", "u2,i\ufffd2,2,3"),
        ("user_id not valid UTF-8", f"{events.name}:5", "u\ufffd4,i\ufffd4,4,2"),  # the first column at fault
        ("title not valid UTF-8", f"{items.name}:3", "i3,Caf\ufffd"),
    ]
    assert tables.items.to_pylist() == [_item("i1", title="A"), _item("i5", title="E")]


def test_preprocess_quarantines_a_row_with_bytes_not_utf8(tmp_path: Path) -> None:
    """`polyrec preprocess` on a table source with such a row finishes, the row in its read quarantine."""
    ratings = "".join(f"u{user},i{item},{10 * user + item},4\n" for user in range(1, 4) for item in range(1, 4))
    events = _write(tmp_path / "events.csv", "user_id,item_id,timestamp,rating\n" + ratings + "u3,i\xff3,99,5\n", encoding="latin-1")
    items = _write(tmp_path / "items.csv", "item_id,title\ni1,A\ni2,B\ni3,C\n")
    config = f"source:\n  format: table\n  path: {events}\n  items_path: {items}\noutput: {tmp_path / 'out'}\nray: {{num_partitions: 1}}\n"
    (tmp_path / "preprocess.yaml").write_text(config)

    assert polyrec(["preprocess", "--config", str(tmp_path / "preprocess.yaml")]) == 0

    quarantine = pq.read_table(tmp_path / "out" / "quarantine" / "read.parquet")
    assert _rows(quarantine, "stage", "reason", "source", "record") == [("read", "item_id not valid UTF-8", "events.csv:11", "u3,i\ufffd3,99,5")]


def test_table_parquet_with_iso_timestamps(tmp_path: Path) -> None:
    events = tmp_path / "events.parquet"
    pq.write_table(
        pa.table({
            "user": ["a", "b", "c", "d"],
            "item": [1, 2, 1, 3],  # integer ids become text
            "time": ["2021-03-04T05:06:07Z", "2021-03-04 07:06:07+02:00", "2021-03-04", "yesterday"],
            "rating": [5, 3, None, 4],
        }),
        events,
    )  # fmt: skip
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item": ["1", "2"], "title": ["One", "Two"], "tags": [["x", "y"], []]}), items)
    config = SourceConfig(
        format="table", path=str(events), items_path=str(items), timestamp_unit="iso", default_event="purchase",
        columns=ColumnMapping(
            user_id="user", item_id="item", timestamp="time", item_fields={"title": "title", "tags": "tags"}
        ),
    )  # fmt: skip

    tables = _read(config)

    march_4 = 1614816000  # 2021-03-04T00:00:00Z
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "event", "value", "source") == [
        ("a", "1", march_4 + 5 * 3600 + 367, "purchase", 5.0, "events.parquet:row 0"),
        ("b", "2", march_4 + 5 * 3600 + 367, "purchase", 3.0, "events.parquet:row 1"),
        ("c", "1", march_4, "purchase", None, "events.parquet:row 2"),
    ]
    [(reason, source, record)] = _quarantined(tables)
    assert (reason, source) == ("time not an ISO-8601 time", "events.parquet:row 3")
    assert json.loads(record) == {"user": "d", "item": 3, "time": "yesterday", "rating": 4}
    assert tables.items.to_pylist() == [_item("1", title="One", tags=["x", "y"]), _item("2", title="Two", tags=[])]
    assert tables.users is None


# --- Large text files, read by a task per span of lines ------------------------------------------


def test_line_spans_cut_a_file_at_line_starts(tmp_path: Path) -> None:
    text = b"".join(b"x" * (n % 17) + (b"\r\n" if n % 3 else b"\n") for n in range(500)) + b"a last line without a break"
    path = tmp_path / "lines.csv"
    path.write_bytes(text)

    spans = files.line_spans(path, task_bytes=300)

    assert len(spans) >= len(text) // 400 and spans[0].start == 0 and spans[-1].end is None
    assert [span.end for span in spans[:-1]] == [span.start for span in spans[1:]]
    for before, span in zip(spans, spans[1:]):
        assert span.start - before.start >= 300 and text[span.start - 1 : span.start] == b"\n"
        assert span.lines_before == text[: span.start].count(b"\n")
    assert b"".join(span.open(path).read() for span in spans) == text
    assert b"".join(line for span in spans for line in span.lines(path)) == text
    packed = tmp_path / "lines.csv.gz"
    packed.write_bytes(gzip.compress(text))
    assert files.line_spans(packed, task_bytes=300) == [files.WHOLE_FILE]  # a compressed file cannot be entered midway


def _ratings_in_spans(folder: Path, format: str) -> tuple[SourceConfig, Path, list[int]]:
    """A source of ``format`` whose interactions file holds 3,000 ratings and, spread over it, a blank line and
    lines a reader refuses; returns the config, that file and the numbers of the refused lines."""
    rng = np.random.default_rng(1)
    count = 3_000
    ratings = zip(rng.integers(1, 40, count), rng.choice([1, 11, 209171], count), rng.integers(1, 6, count), rng.integers(10**9, 2 * 10**9, count))
    ratings = [[str(value) for value in rating] for rating in ratings]
    if format == "amazon":
        lines = [json.dumps({"reviewerID": f"A{u}", "asin": i, "overall": float(r), "unixReviewTime": int(t)}) for u, i, r, t in ratings]
        bad = {400: '{"reviewerID": "A1", "asin": "1", "overall"', 1_700: json.dumps({"reviewerID": "A1", "asin": "1", "overall": "x", "unixReviewTime": 1})}
    else:
        separator = {"movielens-1m": "::", "movielens-csv": ",", "table": ","}[format]
        lines = [separator.join(rating) for rating in ratings]
        bad = {400: separator.join(["1", "11", "4"]), 1_700: separator.join(["1", "11", "x", "1000000000"])}
    header = {"movielens-csv": "userId,movieId,rating,timestamp", "table": "user_id,item_id,rating,timestamp"}.get(format)
    for number, line in [*bad.items(), (2_500, ""), (2_990, next(iter(bad.values())))]:
        lines.insert(number - 1 - (header is not None), line)
    text = "".join(line + "\n" for line in ([header] if header else []) + lines)
    if format == "movielens-1m":
        path = _write(folder / "ratings.dat", text)
        _write(folder / "movies.dat", "1::One (1995)::Drama\n11::Eleven (1995)::Drama\n209171::Many (1962)::Drama\n")
        config = SourceConfig(format=format, path=str(folder))
    elif format == "movielens-csv":
        path = _movielens_csv(folder, "") / "ratings.csv"
        path.write_text(text)
        config = SourceConfig(format=format, path=str(folder))
    else:
        path = _write(folder / ("reviews.json" if format == "amazon" else "events.csv"), text)
        config = SourceConfig(format=format, path=str(path))
    return config, path, [400, 1_700, 2_990]


@pytest.mark.parametrize("format", ["movielens-1m", "movielens-csv", "table", "amazon"])
def test_a_file_read_in_spans_reads_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, format: str) -> None:
    """A file above ``READ_TASK_BYTES`` is parsed by a read task per span of lines: the interactions and the
    refused lines, with their line numbers, are those of one task reading it whole."""
    config, path, refused_lines = _ratings_in_spans(tmp_path, format)
    whole = _read(config)
    monkeypatch.setattr(files, "READ_TASK_BYTES", path.stat().st_size // 6)
    assert len(files.line_spans(path)) >= 6

    in_spans = _read(config)

    assert [source for _, source, _ in _quarantined(in_spans)] == [f"{path.name}:{number}" for number in refused_lines]
    assert in_spans.interactions.num_rows == 3_000
    assert in_spans.interactions.equals(whole.interactions) and in_spans.quarantine.equals(whole.quarantine)


def test_bytes_not_utf8_in_a_later_span_are_quarantined_with_their_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = {number: f"u{number % 7},i{number % 5},{1_600_000_000 + number},4" for number in range(2, 1_002)}
    lines[900] = "u1,i\xff1,1600000900,4"
    path = _write(tmp_path / "events.csv", "user_id,item_id,timestamp,rating\n" + "".join(line + "\n" for line in lines.values()), encoding="latin-1")
    monkeypatch.setattr(files, "READ_TASK_BYTES", path.stat().st_size // 4)
    spans = files.line_spans(path)
    assert len(spans) >= 4 and next(span for span in reversed(spans) if span.lines_before < 900).start > 0

    tables = _read(SourceConfig(format="table", path=str(path)))

    assert _quarantined(tables) == [("item_id not valid UTF-8", "events.csv:900", "u1,i\ufffd1,1600000900,4")]
    assert tables.interactions.column("source").to_pylist() == [f"events.csv:{number}" for number in lines if number != 900]


# --- The feedback log ----------------------------------------------------------------------------


def _feedback(path: Path, rows: list[tuple]) -> Path:
    names = ["event_id", "ts", "user_id", "item_id", "event", "value"]
    columns = {name: [row[i] for row in rows] for i, name in enumerate(names)}
    columns |= {"request_id": ["r"] * len(rows), "model_version": ["v1"] * len(rows), "position": [None] * len(rows)}
    table = pa.table(columns, schema=FEEDBACK_LOG)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_feedback_log_folder(tmp_path: Path) -> None:
    log = tmp_path / "feedback"
    _feedback(log / "2024-01-01" / "part-0.parquet", [
        ("e1", 1_700_000_000_500, "u1", "i1", "impression", 0.9),
        ("e2", 1_700_000_001_000, "u1", "i1", "click", None),
        ("e3", 1_700_000_002_000, "u1", "i2", "rate", 4.0),
    ])  # fmt: skip
    _feedback(log / "2024-01-02" / "part-0.parquet", [
        ("e3", 1_700_000_002_000, "u1", "i2", "rate", 4.0),  # written twice
        ("e4", 1_700_000_003_999, "u2", "i3", "like", None),
    ])  # fmt: skip

    tables = _read(SourceConfig(format="feedback", path=str(log)))

    _assert_schemas(tables)
    assert _rows(tables.interactions, "user_id", "item_id", "timestamp", "event", "value", "source") == [
        ("u1", "i1", 1_700_000_001, "click", None, "2024-01-01/part-0.parquet:row 1"),
        ("u1", "i2", 1_700_000_002, "rate", 4.0, "2024-01-01/part-0.parquet:row 2"),
        ("u2", "i3", 1_700_000_003, "like", None, "2024-01-02/part-0.parquet:row 1"),
    ]
    [(reason, source, record)] = _quarantined(tables)
    assert (reason, source) == ("duplicate event_id", "2024-01-02/part-0.parquet:row 0")
    assert json.loads(record)["event_id"] == "e3"
    assert tables.items.num_rows == 0 and tables.items.schema.equals(ITEMS_BASE)
    assert tables.users is None
    assert len(tables.files) == 2


def test_read_sources_appends_the_feedback_log(tmp_path: Path, ml100k: SourceTables) -> None:
    log = _feedback(tmp_path / "log.parquet", [("e1", 1_700_000_000_000, "196", "242", "rate", 5.0)])

    tables = read_sources([SourceConfig(), SourceConfig(format="feedback", path=str(log))]).collected()

    assert tables.interactions.num_rows == 100_001
    assert tables.interactions.slice(0, 100_000).equals(ml100k.interactions)
    assert _rows(tables.interactions.slice(100_000), "user_id", "source") == [("196", "log.parquet:row 0")]
    assert tables.items.equals(ml100k.items) and tables.users.equals(ml100k.users)
    assert tables.files == [*ml100k.files, str(log.resolve())]


# --- Errors --------------------------------------------------------------------------------------


def _error(config: SourceConfig) -> str:
    with pytest.raises(InputError) as raised:
        read_source(config)
    return str(raised.value)


def test_missing_folder_and_file_are_named(tmp_path: Path) -> None:
    message = _error(SourceConfig(format="movielens-1m", path=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in message and "ratings.dat" in message

    _write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    message = _error(SourceConfig(format="movielens-1m", path=str(tmp_path)))
    assert str(tmp_path / "movies.dat") in message and "not found" in message

    message = _error(SourceConfig(format="amazon", path=str(tmp_path / "reviews.json")))
    assert "reviews.json" in message

    assert "source.path" in _error(SourceConfig(format="movielens-1m"))  # only ml-100k is embedded


def test_unknown_format() -> None:
    message = _error(SourceConfig.model_construct(format="netflix-prize", path=None))
    assert "netflix-prize" in message and "movielens-csv" in message


def test_every_configurable_format_has_a_reader() -> None:
    assert list(READERS) == list(get_args(SourceFormat))


def test_a_mapped_column_missing_is_named(tmp_path: Path) -> None:
    csv_file = _write(tmp_path / "ratings.csv", "user,item,timestamp,rating\nu,i,1,5\n")
    message = _error(SourceConfig(format="table", path=str(csv_file), columns=ColumnMapping(user_id="uid")))
    expected = "ratings.csv: no column 'uid' (mapped from columns.user_id); columns are: user, item, timestamp, rating"
    assert message == expected

    parquet_file = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"], "timestamp": [1]}), parquet_file)
    message = _error(SourceConfig(format="table", path=str(parquet_file)))
    assert message.startswith("ratings.parquet: no column 'rating' (mapped from columns.value)")


def test_an_empty_interactions_file(tmp_path: Path) -> None:
    folder = _movielens_csv(tmp_path / "csv", "")
    assert "ratings.csv" in _error(SourceConfig(format="movielens-csv", path=str(folder)))

    _write(tmp_path / "ml" / "u.data", "")
    assert "u.data" in _error(SourceConfig(path=str(tmp_path / "ml")))

    reviews = _write(tmp_path / "reviews.json", "\n")
    assert "reviews.json" in _error(SourceConfig(format="amazon", path=str(reviews)))

    log = tmp_path / "log.parquet"
    pq.write_table(FEEDBACK_LOG.empty_table(), log)
    assert "log.parquet" in _error(SourceConfig(format="feedback", path=str(log)))


def test_amazon_file_with_other_fields(tmp_path: Path) -> None:
    reviews = _json_lines(tmp_path / "reviews.json", [{"customer": "c1", "product": "p1", "stars": 5}])
    message = _error(SourceConfig(format="amazon", path=str(reviews)))
    assert "reviews.json" in message and "reviewerID" in message and "user_id" in message
