"""The preprocessing stage on real Ray and real Parquet: the embedded MovieLens-100K end to end
(checked against an independent pandas leave-one-out), cleaning accounting on a deliberately
corrupted table, hand-computed leave-one-out / temporal / normalisation examples, the users' histories
for serving, cold items, determinism, a file:// output, and the errors a user can run into."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from common import storage
from common.errors import InputError
from data.config import DEFAULT_DATASET_DIR, CleanConfig, FeatureConfig, PreprocessConfig, RayDataConfig, SplitConfig
from data.features import rating_normalisation, render_item_text
from data.manifest import Manifest, format_report, load_manifest
from data.pipeline import preprocess_tables, run_preprocess
from data.readers import SourceTables, files
from data.schema import EVAL_SEQUENCE, INTERACTIONS, ITEMS_BASE, QUARANTINE, SCHEMA_VERSION, TRAIN_SEQUENCE, USER_HISTORIES, USER_VOCAB_PATH
from data.user_histories import read_user_histories

DAY = 86_400
T0 = 1_599_955_200  # 2020-09-13 00:00 UTC


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    # A higher worker soft limit keeps the hash shuffle's dedicated workers alive between runs
    # instead of restarting them for every dataset (seconds each on a 2-core machine).
    ray.init(num_cpus=2, include_dashboard=False, _system_config={"num_workers_soft_limit": 6})
    yield
    ray.shutdown()


# --- Helpers ----------------------------------------------------------------------------------------


def _sources(rows: list[tuple], item_ids: list[str], read_quarantine: list[tuple] = ()) -> SourceTables:
    """rows: (user, item, timestamp, value, event); their source is "hand.csv:<line>" from line 2."""
    interactions = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "event": [r[4] for r in rows],
            "value": [r[3] for r in rows],
            "source": [f"hand.csv:{line}" for line in range(2, len(rows) + 2)],
        },
        schema=INTERACTIONS,
    )
    items = pa.table(
        {name: [None] * len(item_ids) for name in ITEMS_BASE.names}
        | {"item_id": item_ids, "title": [f"Film {i}" for i in item_ids], "genres": [["Drama", i[:1]] for i in item_ids]},
        schema=ITEMS_BASE,
    )
    quarantine = pa.table(
        {
            "stage": ["read"] * len(read_quarantine),
            "reason": [q[0] for q in read_quarantine],
            "source": [q[1] for q in read_quarantine],
            "record": [q[2] for q in read_quarantine],
        },
        schema=QUARANTINE,
    )
    return SourceTables(interactions=interactions, items=items, users=None, quarantine=quarantine, files=[])


def _config(output: Path | str, **sections) -> PreprocessConfig:
    return PreprocessConfig(output=str(output), ray=RayDataConfig(num_partitions=3), **sections)


def _read(root: Path, relative: str) -> pa.Table:
    return pq.read_table(root / relative)


def _decode(root: Path, table: pa.Table) -> pd.DataFrame:
    """Sequences with user and item ids instead of indices."""
    users = dict(zip(*_read(root, "vocab/users.parquet").select(["user_idx", "user_id"]).to_pydict().values()))
    items = dict(zip(*_read(root, "vocab/items.parquet").select(["item_idx", "item_id"]).to_pydict().values()))
    frame = table.to_pandas()
    frame["user"] = frame["user_idx"].map(users)
    for column in ("items", "history", "seen_items"):
        if column in frame:
            frame[column] = frame[column].map(lambda ids: [items[i] for i in ids])
    if "target_item" in frame:
        frame["target"] = frame["target_item"].map(items)
    return frame.set_index("user")


def _train_chunks(train: pd.DataFrame, user: str, column: str = "items") -> list[list[str]]:
    """A user's training rows in time order, as item-id lists of ``column``."""
    rows = train.loc[[user]]
    return [list(values) for _, values in sorted(zip(rows["timestamps"].map(lambda ts: ts[0]), rows[column]))]


def _expected_chunks(items: list[str], size: int) -> list[list[str]]:
    """Every item once: the items after the first cut back from the end into chunks of ``size`` (the oldest
    takes the rest), the first item joining the oldest chunk."""
    first, rest = items[:1], items[1:]
    head = len(rest) % size or min(size, len(rest))
    return [first + rest[:head]] + [rest[i : i + size] for i in range(head, len(rest), size)]


def _assert_accounting(manifest: Manifest, root: Path) -> None:
    """Before − after of every step equals what the quarantine holds for it, in the manifest and on disk."""
    on_disk = _read(root, "quarantine").to_pandas().groupby("stage").size().to_dict()
    by_stage = {}
    for q in manifest.quarantine:
        by_stage[q.stage] = by_stage.get(q.stage, 0) + q.count
    for step in manifest.steps:
        assert step.before - step.after == by_stage.get(f"clean:{step.step}", 0) == on_disk.get(f"clean:{step.step}", 0)
    assert [s.before for s in manifest.steps[1:]] == [s.after for s in manifest.steps[:-1]]
    assert manifest.steps[0].before == manifest.num_input_interactions
    assert manifest.steps[-1].after == manifest.num_interactions


# --- The embedded MovieLens-100K --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> tuple[Manifest, Path]:
    root = tmp_path_factory.mktemp("ml100k") / "data"
    return run_preprocess(PreprocessConfig(output=str(root))), root


def _pandas_leave_one_out() -> pd.DataFrame:
    """An independent leave-one-out on u.data: per user, by timestamp, ties in file order."""
    ratings = pd.read_csv(DEFAULT_DATASET_DIR / "u.data", sep="\t", names=["user", "item", "rating", "ts"], dtype=str)
    ratings["ts"] = ratings["ts"].astype(int)
    ratings["line"] = np.arange(len(ratings))
    ratings = ratings.sort_values(["user", "ts", "line"])
    ratings["from_end"] = ratings.groupby("user").cumcount(ascending=False)
    return ratings


def test_ml100k_end_to_end(ml100k) -> None:
    manifest, root = ml100k
    assert (manifest.num_input_interactions, manifest.num_interactions) == (100_000, 100_000)
    assert (manifest.num_users, manifest.num_items, manifest.num_attributes) == (943, 1682, 19)
    assert manifest.splits["test"].rows == manifest.splits["validation"].rows == 943
    train_lengths = _pandas_leave_one_out().query("from_end >= 2").groupby("user").size()
    assert manifest.splits["train"].rows == int((-(-(train_lengths - 1) // 50)).sum()) > 943  # max_history targets a row
    assert manifest.splits["train"].interactions == 98_114
    assert manifest.kcore_converged and manifest.kcore_iterations == 0 and manifest.quarantine == []
    assert manifest.rating.kind == "none" and manifest.tokenizer.class_name == "BertTokenizer"
    assert load_manifest(str(root)) == manifest
    assert json.loads((root / "manifest.json").read_text())["content_hash"] == manifest.content_hash
    _assert_accounting(manifest, root)
    report = format_report(manifest)
    assert "98,114" in report and "kcore" in report and manifest.content_hash in report

    users = _read(root, "vocab/users.parquet")
    assert users.schema.names == ["user_id", "user_idx", "rating_offset"]
    assert users["user_id"].to_pylist() == sorted(str(u) for u in range(1, 944))  # string order: "1", "10", ...
    assert users["user_idx"].to_pylist() == list(range(1, 944))
    attributes = _read(root, "vocab/attributes.parquet")
    assert attributes["attribute"].to_pylist()[:3] == ["Action", "Adventure", "Animation"]

    items = _read(root, "items").sort_by("item_idx")
    toy_story = items.filter(pc.equal(items["item_id"], "1")).to_pylist()[0]
    assert toy_story["text"] == "Toy Story. Year: 1995. Genres: Animation, Children's, Comedy."
    assert toy_story["input_ids"][0] == 101 and toy_story["input_ids"][-1] == 102  # [CLS] ... [SEP]
    assert max(len(ids) for ids in items["input_ids"].to_pylist()) <= 64
    names = attributes["attribute"].to_pylist()
    assert [names[i - 1] for i in toy_story["attributes"]] == ["Animation", "Children's", "Comedy"]

    expected = _pandas_leave_one_out()
    test = _decode(root, _read(root, "sequences/test"))
    validation = _decode(root, _read(root, "sequences/validation"))
    train = _decode(root, _read(root, "sequences/train"))
    assert test["target"].to_dict() == expected[expected["from_end"] == 0].set_index("user")["item"].to_dict()
    assert validation["target"].to_dict() == expected[expected["from_end"] == 1].set_index("user")["item"].to_dict()
    for user in ("1", "405", "943"):  # the heaviest user (405) and two others
        history = expected[expected["user"] == user]["item"].tolist()
        chunks = _expected_chunks(history[:-2], 50)
        assert _train_chunks(train, user) == chunks
        # each row's context: the (at most) 50 training items just before its first
        assert _train_chunks(train, user, "history") == [sum(chunks[:i], [])[-50:] for i in range(len(chunks))]
        assert test.loc[user, "seen_items"] == history[:-1]
        assert test.loc[user, "history"] == history[:-1][-50:]
        assert validation.loc[user, "history"] == history[:-2][-50:]
        ratings = expected[expected["user"] == user]["rating"].astype(float).tolist()
        assert test.loc[user, "history_ratings"].tolist() == ratings[:-1][-50:]  # "none": raw
        rating_chunks = _expected_chunks(ratings[:-2], 50)
        assert _train_chunks(train, user, "history_ratings") == [sum(rating_chunks[:i], [])[-50:] for i in range(len(chunks))]
    raw = expected[expected["from_end"] == 0].set_index("user")["rating"].astype(float)
    assert (test["target_rating"] == test.index.map(raw)).all()  # "none": ratings stay raw


# --- Cleaning accounting on a corrupted table -------------------------------------------------------

# min_user_interactions=3, min_item_interactions=2, at most 3 events per user and day.
CORRUPTED = [
    # a stable core: three users, three items each
    *[(u, i, T0 + n * 60, 4.0, "rate") for n, (u, i) in enumerate([(u, i) for u in ("u1", "u2", "u3") for i in ("i1", "i2", "i3")])],
    ("u1", "i1", T0 + 9_000, 7.0, "rate"),  # value out of range
    ("u2", "i2", -5, 3.0, "rate"),  # timestamp out of range
    ("u3", "ghost", T0 + 9_100, 3.0, "rate"),  # item without metadata
    ("u1", "i1", T0, 4.0, "rate"),  # exact duplicate of the very first row
    ("u2", "i3", T0 + DAY + 9_200, None, "click"),  # no value: passes the range check
    # a bot: five events in one UTC day (source order ≠ time order); the two latest go
    ("bot", "i1", T0 + 5 * DAY + 500, 5.0, "rate"),
    ("bot", "i2", T0 + 5 * DAY + 100, 5.0, "rate"),
    ("bot", "i3", T0 + 5 * DAY + 400, 5.0, "rate"),
    ("bot", "i1", T0 + 5 * DAY + 200, 5.0, "rate"),
    ("bot", "i2", T0 + 5 * DAY + 300, 5.0, "rate"),
    # k-core: iA has one rating, so x drops to 2 and goes; then iB has one left, so y goes too
    ("x", "iA", T0 + 1_000, 3.0, "rate"),
    ("x", "i1", T0 + 1_100, 3.0, "rate"),
    ("x", "iB", T0 + 1_200, 3.0, "rate"),
    ("y", "iB", T0 + 1_300, 3.0, "rate"),
    ("y", "i2", T0 + 1_400, 3.0, "rate"),
    ("y", "i3", T0 + 1_500, 3.0, "rate"),
]
CORRUPTED_CLEAN = CleanConfig(min_user_interactions=3, min_item_interactions=2, max_events_per_user_per_day=3)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> tuple[Manifest, Path]:
    root = tmp_path_factory.mktemp("corrupted") / "data"
    sources = _sources(CORRUPTED, ["i1", "i2", "i3", "iA", "iB"], read_quarantine=[("bad line", "hand.csv:99", "x,y")])
    return preprocess_tables(sources, _config(root, clean=CORRUPTED_CLEAN)), root


def test_cleaning_counts_and_reasons(corrupted) -> None:
    manifest, root = corrupted
    assert manifest.num_input_interactions == len(CORRUPTED)
    dropped = {s.step: s.dropped for s in manifest.steps}
    assert dropped == {"range": 2, "item_metadata": 1, "duplicates": 1, "bot_filter": 2, "kcore": 6}
    assert manifest.kcore_iterations == 2 and manifest.kcore_converged
    reasons = {(q.stage, q.reason): q.count for q in manifest.quarantine}
    assert reasons == {
        ("read", "bad line"): 1,
        ("clean:range", "value outside [1.0, 5.0]"): 1,
        ("clean:range", "timestamp outside [0, 4102444800]"): 1,
        ("clean:item_metadata", "item has no metadata"): 1,
        ("clean:duplicates", "exact duplicate of an earlier row"): 1,
        ("clean:bot_filter", "more than 3 events of the user on one UTC day"): 2,
        ("clean:kcore", "item has fewer than 2 interactions (k-core)"): 2,
        ("clean:kcore", "user has fewer than 3 interactions (k-core)"): 4,
    }
    _assert_accounting(manifest, root)

    quarantine = _read(root, "quarantine").to_pandas().set_index("source")
    line = {f"hand.csv:{n + 2}": row for n, row in enumerate(CORRUPTED)}
    assert quarantine.loc["hand.csv:99", "stage"] == "read"
    for source, entry in quarantine.drop(index="hand.csv:99").iterrows():
        user, item, timestamp, value, event = line[source]
        assert json.loads(entry["record"]) == {"user_id": user, "item_id": item, "timestamp": timestamp, "event": event, "value": value, "source": source}
    bot = quarantine[quarantine["stage"] == "clean:bot_filter"]
    assert sorted(json.loads(r)["timestamp"] for r in bot["record"]) == [T0 + 5 * DAY + 400, T0 + 5 * DAY + 500]
    assert quarantine.loc[line_of(("u1", "i1", T0, 4.0, "rate"), last=True), "stage"] == "clean:duplicates"

    assert _read(root, "vocab/users.parquet")["user_id"].to_pylist() == ["bot", "u1", "u2", "u3"]
    assert _read(root, "vocab/items.parquet")["item_id"].to_pylist() == ["i1", "i2", "i3"]
    assert manifest.splits["train"].interactions + 2 * 4 == manifest.num_interactions == 9 + 1 + 3


def line_of(row: tuple, last: bool = False) -> str:
    lines = [n + 2 for n, r in enumerate(CORRUPTED) if r == row]
    return f"hand.csv:{lines[-1] if last else lines[0]}"


def test_reruns_are_byte_identical_and_file_uri_works(corrupted, tmp_path) -> None:
    first_manifest, first = corrupted
    second = tmp_path / "again"
    sources = _sources(CORRUPTED, ["i1", "i2", "i3", "iA", "iB"], read_quarantine=[("bad line", "hand.csv:99", "x,y")])
    manifest = preprocess_tables(sources, _config(second.as_uri(), clean=CORRUPTED_CLEAN))
    assert manifest.content_hash == first_manifest.content_hash
    assert manifest.model_dump(exclude={"created_at", "config"}) == first_manifest.model_dump(exclude={"created_at", "config"})
    files = sorted(p.relative_to(first) for p in first.rglob("*.parquet"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.parquet"))
    assert any(str(f).startswith("sequences/train/part-") for f in files)
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    assert load_manifest(second.as_uri()) == manifest


def test_ml100k_read_by_a_task_per_span_gives_the_same_output(ml100k, tmp_path, monkeypatch) -> None:
    """u.data (1.9 MB) cut into spans of 256 KiB, each parsed by its own read task: the same data as one task gives."""
    manifest, root = ml100k
    monkeypatch.setattr(files, "READ_TASK_BYTES", 256 << 10)
    assert len(files.line_spans(DEFAULT_DATASET_DIR / "u.data")) >= 7

    in_spans = run_preprocess(PreprocessConfig(output=str(tmp_path / "data")))

    assert in_spans.model_dump(exclude={"created_at", "config"}) == manifest.model_dump(exclude={"created_at", "config"})
    for folder in ("sequences/train", "sequences/validation", "sequences/test", "user_histories", "items", "vocab", "quarantine"):
        tables = [ds.dataset(output / folder, format="parquet").to_table() for output in (root, tmp_path / "data")]
        keys = [(field.name, "ascending") for field in tables[0].schema if not pa.types.is_list(field.type)]
        assert tables[0].sort_by(keys).equals(tables[1].sort_by(keys)), folder


# --- Hand-computed splits and normalisations ---------------------------------------------------------


#: User a's five ratings, two of them at the same second.
USER_A_WITH_A_TIE = [
    ("a", "i1", T0 + 10, 4.0, "rate"),
    ("a", "i2", T0 + 20, 2.0, "rate"),  # tie with the next row: source order decides
    ("a", "i3", T0 + 20, 5.0, "rate"),
    ("a", "i4", T0 + 5, 3.0, "rate"),
    ("a", "i5", T0 + 30, 1.0, "rate"),
]


def test_leave_one_out_with_a_timestamp_tie_and_user_centring(tmp_path) -> None:
    rows = [
        *USER_A_WITH_A_TIE,
        ("b", "i1", T0 + 1, 5.0, "rate"),  # fewer than 3 interactions: all train
        ("b", "i2", T0 + 2, None, "like"),
    ]
    features = FeatureConfig(max_history=2, rating_normalisation="user_center")
    manifest = preprocess_tables(
        _sources(rows, ["i1", "i2", "i3", "i4", "i5"]),
        _config(tmp_path, clean=CleanConfig(min_user_interactions=1), features=features),
    )
    train = _decode(tmp_path, _read(tmp_path, "sequences/train"))
    validation = _decode(tmp_path, _read(tmp_path, "sequences/validation"))
    test = _decode(tmp_path, _read(tmp_path, "sequences/test"))
    # a in time order: i4 (5), i1 (10), i2 (20), i3 (20), i5 (30)
    assert train.loc["a", "items"] == ["i4", "i1", "i2"]  # max_history = 2 targets (i1, i2) and the first item
    assert (validation.loc["a", "target"], validation.loc["a", "history"]) == ("i3", ["i1", "i2"])
    assert validation.loc["a", "seen_items"] == ["i4", "i1", "i2"]
    assert (test.loc["a", "target"], test.loc["a", "history"]) == ("i5", ["i2", "i3"])
    assert test.loc["a", "seen_items"] == ["i4", "i1", "i2", "i3"]
    assert train.loc["b", "items"] == ["i1", "i2"] and "b" not in test.index
    assert (manifest.splits["train"].interactions, manifest.splits["test"].rows) == (5, 1)

    # user_center: a's training mean is (3 + 4 + 2) / 3 = 3; b's is 5 (the like has no value)
    offsets = dict(zip(*_read(tmp_path, "vocab/users.parquet").select(["user_id", "rating_offset"]).to_pydict().values()))
    assert offsets == {"a": 3.0, "b": 5.0}
    assert train.loc["a", "ratings"].tolist() == [0.0, 1.0, -1.0]
    assert train.loc["a", "likes"].tolist() == [0, 1, 0]  # 3 < 4, 4 ≥ 4, 2 < 4
    assert (test.loc["a", "target_rating"], test.loc["a", "target_rating_raw"]) == (-2.0, 1.0)
    assert validation.loc["a", "history_ratings"].tolist() == [1.0, -1.0]  # i1 (4), i2 (2), centred on 3
    assert test.loc["a", "history_ratings"].tolist() == [-1.0, 2.0]  # i2 (2), i3 (5)
    assert train.loc["b", "ratings"][0] == 0.0 and np.isnan(train.loc["b", "ratings"][1])
    assert train.loc["b", "likes"].tolist() == [1, 1]  # 5 ≥ 4; a "like" event
    assert manifest.rating.model_dump() == {"kind": "user_center", "shift": 0.0, "scale": 1.0, "low": 1.0, "high": 5.0}


def test_temporal_split_with_minmax_ratings(tmp_path) -> None:
    # Ten events half a day apart; ranks 6 and 8 (fractions 0.2 / 0.2) hold the cut points. Events 5
    # and 6 share a second, so the validation window starts at event 5.
    times = [T0 + k * DAY // 2 for k in (0, 1, 2, 3, 4, 5, 5, 7, 8, 9)]
    users = ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"]
    rows = [(u, f"i{k % 3}", t, float(1 + k % 5), "rate") for k, (u, t) in enumerate(zip(users, times))]
    split = SplitConfig(strategy="temporal", validation_fraction=0.2, test_fraction=0.2)
    manifest = preprocess_tables(
        _sources(rows, ["i0", "i1", "i2"]),
        _config(tmp_path, clean=CleanConfig(min_user_interactions=1), split=split, features=FeatureConfig(rating_normalisation="minmax")),
    )
    assert manifest.temporal_cutoffs == [times[6], times[8]]
    validation = _read(tmp_path, "sequences/validation").to_pandas()
    test = _read(tmp_path, "sequences/test").to_pandas()
    train = _decode(tmp_path, _read(tmp_path, "sequences/train"))
    assert sorted(validation["target_timestamp"]) == [times[5], times[6], times[7]]
    assert sorted(test["target_timestamp"]) == [times[8], times[9]]
    assert train.loc["a", "timestamps"].tolist() == [times[0], times[2], times[4]]
    assert train.loc["b", "timestamps"].tolist() == [times[1], times[3]]
    # b's test target (event 9) sees everything b did before it, validation events included
    b_test = _decode(tmp_path, _read(tmp_path, "sequences/test")).loc["b"]
    assert b_test["seen_items"] == [rows[k][1] for k in (1, 3, 5, 7)]
    # minmax over [1, 5]: value v → (v − 1) / 4
    assert train.loc["a", "ratings"].tolist() == [0.0, 0.5, 1.0]  # values 1, 3, 5
    assert sorted(test["target_rating"]) == [0.75, 1.0] and sorted(test["target_rating_raw"]) == [4.0, 5.0]
    assert manifest.rating.model_dump() == {"kind": "minmax", "shift": 1.0, "scale": 4.0, "low": 1.0, "high": 5.0}
    # Predictions go back to the raw scale clipped to the cleaning's range: −1 → 1, 4 stays, 6.2 → 5
    users = _read(tmp_path, USER_VOCAB_PATH)
    back = manifest.rating.denormaliser(users)(np.array([-0.5, 0.75, 1.3, np.nan]), users["user_idx"].to_numpy()[[0, 0, 1, 1]])
    np.testing.assert_array_equal(back, [1.0, 4.0, 5.0, np.nan])


def test_a_rating_range_left_open_leaves_predictions_unclipped() -> None:
    offsets = np.array([3.5, 2.0, 2.0])
    normalised = np.array([2.0, -1.5, np.nan])
    closed = rating_normalisation(FeatureConfig(rating_normalisation="user_center"), CleanConfig())
    np.testing.assert_array_equal(closed.invert(normalised, offsets), [5.0, 1.0, np.nan])  # 5.5 and 0.5, clipped to [1, 5]
    open_above = rating_normalisation(FeatureConfig(rating_normalisation="user_center"), CleanConfig(max_value=None))
    np.testing.assert_array_equal(open_above.invert(normalised, offsets), [5.5, 1.0, np.nan])


@pytest.mark.parametrize("normalisation", ["user_center", "minmax"])
def test_user_histories_hold_the_kept_interactions_by_id_in_milliseconds_with_raw_values(tmp_path, normalisation) -> None:
    rows = [
        *USER_A_WITH_A_TIE,
        ("b", "i1", T0 + 1, 5.0, "rate"),
        ("b", "i2", T0 + 2, None, "like"),
        ("b", "i9", T0 + 3, 4.0, "rate"),  # no item metadata: dropped
        ("c", "i3", T0 + 7, 9.0, "rate"),  # outside [1, 5]: dropped, and c with it
    ]
    features = FeatureConfig(max_history=2, rating_normalisation=normalisation)
    preprocess_tables(_sources(rows, ["i1", "i2", "i3", "i4", "i5"]), _config(tmp_path, clean=CleanConfig(min_user_interactions=1), features=features))
    histories = read_user_histories(str(tmp_path))
    assert histories.schema.equals(USER_HISTORIES)
    by_user: dict[str, list[tuple]] = {}
    for row in histories.to_pylist():
        by_user.setdefault(row["user_id"], []).append((row["item_id"], row["ts"], row["rating"]))
    # Each user's kept interactions in time order (ties in source order), seconds × 1000, the values as given.
    assert by_user == {
        "a": [
            ("i4", (T0 + 5) * 1000, 3.0),
            ("i1", (T0 + 10) * 1000, 4.0),
            ("i2", (T0 + 20) * 1000, 2.0),
            ("i3", (T0 + 20) * 1000, 5.0),
            ("i5", (T0 + 30) * 1000, 1.0),
        ],
        "b": [("i1", (T0 + 1) * 1000, 5.0), ("i2", (T0 + 2) * 1000, None)],
    }


def test_cold_items_never_reach_training(tmp_path) -> None:
    rng = np.random.default_rng(7)
    rows = [
        (f"u{u:02d}", f"i{item:02d}", T0 + int(t), float(rng.integers(1, 6)), "rate")
        for u in range(40)
        for t, item in enumerate(rng.choice(30, size=12, replace=False))
    ]
    split = SplitConfig(cold_item_fraction=0.2, seed=3)
    manifest = preprocess_tables(_sources(rows, [f"i{k:02d}" for k in range(30)]), _config(tmp_path, split=split))
    cold = set(_read(tmp_path, "cold_items.parquet")["item_id"].to_pylist())
    assert len(cold) == manifest.num_cold_items == round(0.2 * manifest.num_items) == 6
    train = _decode(tmp_path, _read(tmp_path, "sequences/train"))
    assert not cold & {item for items in train["items"] for item in items}
    test = _decode(tmp_path, _read(tmp_path, "sequences/test"))
    assert (test["target"].isin(cold) == test["is_cold_target"]).all() and test["is_cold_target"].any()
    assert any(cold & set(history) for history in test["history"])  # cold items stay in eval histories
    items = _read(tmp_path, "items").to_pandas()
    assert set(items.loc[items["is_cold"], "item_id"]) == cold
    in_train_split = sum(1 for r in rows) - 2 * 40
    assert manifest.splits["train"].interactions + manifest.cold_withheld_interactions == in_train_split
    # Serving's histories leave out what training does: each user's first 10 items unless cold, then the last 2.
    histories = read_user_histories(str(tmp_path)).to_pylist()
    expected = [(user, item) for user, item, t, _, _ in rows if t - T0 >= 10 or item not in cold]
    assert sorted((row["user_id"], row["item_id"]) for row in histories) == sorted(expected)


# --- Errors and output handling ----------------------------------------------------------------------


def test_empty_result_names_the_step_and_keeps_the_old_output(corrupted) -> None:
    manifest, root = corrupted
    sources = _sources(CORRUPTED, ["i1", "i2", "i3", "iA", "iB"])
    with pytest.raises(InputError, match=r"k-core \(min_user_interactions=50, min_item_interactions=1\) left no interactions"):
        preprocess_tables(sources, _config(root, clean=CleanConfig(min_user_interactions=50)))
    assert load_manifest(str(root)) == manifest  # the previous output is untouched
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_unwritable_output_is_an_input_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="not writable"):
        preprocess_tables(_sources(CORRUPTED, ["i1"]), _config(blocker / "out"))


def test_a_ratings_file_unreadable_past_its_first_block_is_named_in_one_line(tmp_path) -> None:
    """The reader checks the first block itself; the rest is parsed by a Ray task, whose error reaches
    the user as the reader's message, without Ray's traceback."""
    folder = tmp_path / "ml"
    folder.mkdir()
    lines = [f"{n % 50 + 1},{n % 7 + 1},4.0,{T0 + n}" for n in range(200_000)]
    # A line longer than pyarrow's block (1 MiB) cannot be parsed: "straddles two block boundaries".
    (folder / "ratings.csv").write_text("\n".join(["userId,movieId,rating,timestamp", *lines, "1,2,4.0," + "9" * (2 << 20)]) + "\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Crime\n")
    config = PreprocessConfig(source={"format": "movielens-csv", "path": str(folder)}, output=str(tmp_path / "out"), ray=RayDataConfig(num_partitions=2))
    with pytest.raises(InputError) as raised:
        run_preprocess(config)
    assert str(raised.value).startswith(f"{folder / 'ratings.csv'}: cannot be read: ") and "\n" not in str(raised.value)


def test_bad_text_template_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="features.text_template"):
        preprocess_tables(_sources(CORRUPTED, ["i1"]), _config(tmp_path, features=FeatureConfig(text_template="{plot}")))


def test_item_text_rendering() -> None:
    template = FeatureConfig().text_template
    assert render_item_text({"title": "Heat", "year": 1995, "genres": ["Crime", "Drama"]}, template) == ("Heat. Year: 1995. Genres: Crime, Drama.")
    assert render_item_text({"title": "Alien: Covenant", "tags": ["space"], "description": "Lost crew."}, template) == (
        "Alien: Covenant. Tags: space. Lost crew."
    )
    assert render_item_text({"year": 2001, "genres": []}, template) == "Year: 2001."


def test_object_store_commit_writes_the_manifest_last() -> None:
    """The copy-based commit used for object stores, on pyarrow's in-memory filesystem."""
    fs = pafs._MockFileSystem()  # pyarrow's own test filesystem: not local, so commit copies
    target = storage.Location(fs, "bucket/data", "mock://bucket/data")
    for relative, text in (("old.txt", "old"), ("manifest.json", "{}")):
        fs.create_dir("bucket/data", recursive=True)
        storage.write_text(target, relative, text)
    staging = storage.open_staging(target)
    storage.write_table(pa.table({"x": [1, 2]}), staging, "vocab/users.parquet")
    storage.commit(staging, target, "manifest.json", '{"new": true}')
    found = sorted(info.path for info in fs.get_file_info(pafs.FileSelector("bucket", recursive=True)) if info.is_file)
    assert found == ["bucket/data/manifest.json", "bucket/data/vocab/users.parquet"]
    assert storage.read_text(target, "manifest.json") == '{"new": true}'
    assert storage.read_table(target, "vocab/users.parquet")["x"].to_pylist() == [1, 2]


def test_output_schemas(corrupted) -> None:
    _, root = corrupted
    assert _read(root, "sequences/train").schema.equals(TRAIN_SEQUENCE)
    assert _read(root, "sequences/test").schema.equals(EVAL_SEQUENCE)
    assert _read(root, "quarantine").schema.equals(QUARANTINE)
    assert _read(root, "user_histories").schema.equals(USER_HISTORIES)


def test_a_manifest_of_another_schema_version_is_refused_by_name(ml100k, tmp_path):
    _, root = ml100k
    stale = tmp_path / "stale"
    stale.mkdir()
    document = json.loads((root / "manifest.json").read_text())
    document["schema_version"] = SCHEMA_VERSION - 1
    (stale / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"manifest.json: field schema_version is .*preprocess"):
        load_manifest(str(stale))


def test_the_main_job_sets_the_latest_interactions_of_the_embedded_dataset_aside(tmp_path) -> None:
    """The main job's replay: the latest 5% of ml-100k by time, the rest as the base it trains on."""
    from cluster.pipeline import set_aside_future

    source, future = set_aside_future(PreprocessConfig().source, tmp_path, 0.05)
    seconds = pd.read_csv(DEFAULT_DATASET_DIR / "u.data", sep="\t", names=["user", "item", "rating", "ts"])["ts"].to_numpy()
    cutoff = np.quantile(seconds, 0.95, method="higher")
    base = pq.read_table(source.path)
    assert (base.num_rows, future.num_rows) == (int((seconds < cutoff).sum()), int((seconds >= cutoff).sum()))
    assert base.num_rows + future.num_rows == 100_000 and 0.04 < future.num_rows / 100_000 < 0.06
    assert pc.max(base["timestamp"]).as_py() < pc.min(future["timestamp"]).as_py()
