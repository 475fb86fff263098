"""The durable feedback log without Ray: WAL fsync per batch, flush into Parquet, replay of a crashed
writer's WAL (a real process killed with SIGKILL), torn lines, idempotent replay, and the contract with
the ``feedback`` reader of ``data.readers``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import data.feedback_log as feedback_log_module
from data.config import SourceConfig
from data.feedback_log import read_feedback_log, read_wal_segment
from data.readers import read_source
from data.schema import FEEDBACK_LOG
from serve.errors import FeedbackLogUnavailable
from serve.feedback_log import FeedbackLog, impression_rows

REPO = Path(__file__).resolve().parents[1]


def events(n: int, *, start: int = 0, event: str = "click") -> list[dict]:
    return [
        {
            "event_id": f"e{i}",
            "ts": 1_700_000_000_000 + i,
            "user_id": f"u{i % 3}",
            "item_id": f"i{i % 5}",
            "event": event,
            "value": float(i) if event == "rate" else None,
        }
        for i in range(start, start + n)
    ]


def parquet_rows(log_dir: Path) -> list[dict]:
    return [row for part in sorted(log_dir.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    return tmp_path / "log", tmp_path / "wal"


def test_append_is_in_the_wal_before_any_flush_and_in_parquet_after(dirs):
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    log.append(events(5))
    log.append(events(3, start=5))

    assert parquet_rows(log_dir) == []
    segments = list(wal_dir.glob("*.wal"))
    assert len(segments) == 1
    assert [row["event_id"] for row in read_wal_segment(segments[0])] == [f"e{i}" for i in range(8)]

    assert log.flush() == 8
    rows = parquet_rows(log_dir)
    assert [row["event_id"] for row in rows] == [f"e{i}" for i in range(8)]
    assert rows[0] == {**events(1)[0], "request_id": None, "model_version": None, "position": None}
    assert pq.read_schema(next(log_dir.glob("part-*.parquet"))) == FEEDBACK_LOG
    assert list(wal_dir.glob("*.wal")) == []
    assert log.flush() == 0
    assert len(parquet_rows(log_dir)) == 8
    log.close()
    assert list(wal_dir.iterdir()) == []


def test_one_fsync_per_append_call_whatever_its_size(dirs, monkeypatch):
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    log.append(events(1))  # creates the segment (file + folder fsync)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log.append(events(500, start=1))
    assert len(synced) == 1
    log.close()


def test_a_full_segment_asks_for_a_flush(dirs):
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w", flush_max_events=10)
    log.append(events(9))
    assert not log.flush_wanted.is_set()
    log.append(events(1, start=9))
    assert log.flush_wanted.is_set()
    log.flush()
    assert not log.flush_wanted.is_set()
    log.close()


def test_wal_of_a_killed_writer_is_replayed_by_the_next_one(dirs):
    log_dir, wal_dir = dirs
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from serve.feedback_log import FeedbackLog
        log = FeedbackLog({str(log_dir)!r}, {str(wal_dir)!r}, writer="doomed")
        for start in range(0, 40, 10):
            log.append([{{"event_id": f"k{{i}}", "ts": i, "user_id": "u", "item_id": "i", "event": "click"}} for i in range(start, start + 10)])
        print("acknowledged", flush=True)
        sys.stdin.read()
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "acknowledged"
        survivor = FeedbackLog(str(log_dir), wal_dir, writer="survivor")
        assert survivor.flush() == 0  # the writer is alive: its WAL is not touched
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert parquet_rows(log_dir) == []
    assert survivor.flush() == 40
    assert sorted(row["event_id"] for row in parquet_rows(log_dir)) == sorted(f"k{i}" for i in range(40))
    assert [path.name for path in wal_dir.iterdir() if "doomed" in path.name] == []
    survivor.close()


def dead_writer_segment(wal_dir: Path, lines: list[str]) -> Path:
    """A WAL segment whose writer is gone (no process holds its lock)."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    segment = wal_dir / "0000000000001-gone-abcd.00000001.wal"
    segment.write_text("".join(lines))
    return segment


def test_a_torn_last_line_is_skipped_and_the_rest_replayed(dirs):
    log_dir, wal_dir = dirs
    complete = [json.dumps(row) + "\n" for row in events(3)]
    dead_writer_segment(wal_dir, [*complete, complete[0][:25]])
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    assert log.flush() == 3
    assert [row["event_id"] for row in parquet_rows(log_dir)] == ["e0", "e1", "e2"]
    log.close()


def test_replay_after_a_crash_between_part_and_segment_delete_writes_no_duplicates(dirs):
    log_dir, wal_dir = dirs
    segment = dead_writer_segment(wal_dir, [json.dumps(row) + "\n" for row in events(4)])
    first = FeedbackLog(str(log_dir), wal_dir, writer="first")
    first.flush()
    # As if the process had died after the rename and before deleting the segment.
    dead_writer_segment(wal_dir, [json.dumps(row) + "\n" for row in events(4)])
    assert segment.exists()
    second = FeedbackLog(str(log_dir), wal_dir, writer="second")
    assert second.flush() == 4
    assert len(list(log_dir.glob("part-*.parquet"))) == 1
    assert len(parquet_rows(log_dir)) == 4
    first.close()
    second.close()


def test_read_feedback_log_merges_parts_and_wal_and_keeps_the_first_of_each_event_id(dirs):
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    log.append(events(4))
    log.flush()
    retried = {**events(1, start=2)[0], "item_id": "changed"}
    log.append([retried, *events(2, start=4)])
    table = read_feedback_log(str(log_dir), wal_dir)
    assert table.schema == FEEDBACK_LOG
    assert table["event_id"].to_pylist() == ["e0", "e1", "e2", "e3", "e4", "e5"]
    assert table["item_id"].to_pylist()[2] == "i2"
    assert read_feedback_log(str(log_dir)).num_rows == 4  # parts only
    log.close()


@pytest.mark.parametrize("flushed_while", ["LogPart.read", "read_wal_segment"])
def test_a_flush_during_a_read_of_the_log_loses_no_row(dirs, monkeypatch, flushed_while):
    # The store rebuilds from the log while the FeedbackLogger flushes (a segment's part published, then the segment
    # deleted): whenever that happens during the read, every row logged before it is in what the read returns.
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    log.append(events(3))
    log.flush()
    log.append(events(3, start=3))  # in the WAL alone
    owner, name = (feedback_log_module.LogPart, "read") if flushed_while == "LogPart.read" else (feedback_log_module, "read_wal_segment")
    unpatched = getattr(owner, name)

    def flush_first(*args, **kwargs):
        if log.flush():  # the first call only: then nothing is left to flush
            monkeypatch.setattr(owner, name, unpatched)
        return unpatched(*args, **kwargs)

    monkeypatch.setattr(owner, name, flush_first)
    assert read_feedback_log(str(log_dir), wal_dir)["event_id"].to_pylist() == [f"e{i}" for i in range(6)]
    assert len(list(log_dir.glob("part-*.parquet"))) == 2 and not list(wal_dir.glob("*.wal"))  # it did flush during the read
    log.close()


def test_impression_rows_number_positions_from_one():
    rows = impression_rows(request_id="r", user_id="u", items=[("a", 2.5), ("b", 1.0)], model_version="v1", ts=7)
    assert [(row["item_id"], row["position"], row["value"], row["event"]) for row in rows] == [("a", 1, 2.5, "impression"), ("b", 2, 1.0, "impression")]
    assert all(row["request_id"] == "r" and row["model_version"] == "v1" and row["ts"] == 7 for row in rows)
    assert len({row["event_id"] for row in rows}) == 2 and all(uuid.UUID(row["event_id"]).version == 4 for row in rows)


def test_the_feedback_reader_reads_the_log_without_impressions_or_duplicate_events(dirs):
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    clicks, ratings = events(4), events(2, start=4, event="rate")
    log.append(clicks + ratings + impression_rows(request_id="r", user_id="u0", items=[("i1", 1.0)], model_version="v", ts=1))
    log.flush()
    log.append(clicks[:2])  # a client retry: same event ids
    log.close()

    interactions = read_source(SourceConfig(format="feedback", path=str(log_dir))).interactions
    assert interactions.num_rows == 6
    assert sorted(zip(interactions["user_id"].to_pylist(), interactions["item_id"].to_pylist(), interactions["event"].to_pylist())) == sorted(
        (row["user_id"], row["item_id"], row["event"]) for row in clicks + ratings
    )
    assert sorted(interactions["timestamp"].to_pylist()) == sorted(row["ts"] // 1000 for row in clicks + ratings)


@pytest.mark.parametrize("truncate_fails", [False, True])
def test_a_failed_write_is_refused_and_leaves_nothing_for_the_next_line_to_be_glued_to(dirs, monkeypatch, truncate_fails):
    """A disk that fills mid-write: the append raises FeedbackLogUnavailable (nothing is acknowledged); the partial
    bytes are cut off, or, when even that fails, the segment is closed at them and the next append starts a new one.
    Every acknowledged row reads back whole, and no later row is lost to a torn line."""
    log_dir, wal_dir = dirs
    log = FeedbackLog(str(log_dir), wal_dir, writer="w")
    log.append(events(3))
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2 + 5]))  # e3's line and the start of e4's land, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    if truncate_fails:
        monkeypatch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(FeedbackLogUnavailable, match="No space left on device"):
        log.append(events(2, start=3))
    monkeypatch.setattr(os, "write", real_write)
    log.append(events(2, start=5))  # the disk has room again

    segments = sorted(wal_dir.glob("*.wal"))
    assert len(segments) == (2 if truncate_fails else 1)
    read_back = [row["event_id"] for segment in segments for row in read_wal_segment(segment)]
    # When the cut fails, e3's whole line stays (unacknowledged: the client's retry with its id is deduplicated) and
    # e4's torn start is skipped; either way e5 is whole.
    assert read_back == (["e0", "e1", "e2", "e3", "e5", "e6"] if truncate_fails else ["e0", "e1", "e2", "e5", "e6"])
    assert log.flush() == len(read_back) and [row["event_id"] for row in parquet_rows(log_dir)] == read_back
    log.close()
