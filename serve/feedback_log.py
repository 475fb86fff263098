"""The durable feedback log: write-ahead JSON lines on local disk, batched into Parquet parts.

Contract: ``FeedbackLog.append(rows)`` returns only once the rows are on disk (one write, flush and
``os.fsync`` per call, however many rows), so the caller may acknowledge them. ``flush()`` closes the
active WAL segment and turns every closed segment into one Parquet part, written under a temporary
name and renamed into place; the segment is deleted only after its part is in place. A crash
between the two leaves both; the replay then rewrites the same part name, so nothing is doubled.

Each writer (a FeedbackLogger replica) owns the segments carrying its name and holds an ``flock``
on its lock file while alive. A writer that starts, and every writer's periodic flush, replays the
segments of owners whose lock is free, i.e. whose process died: that is how the WAL of a crashed
replica reaches Parquet. The WAL folder must be a local file system that honours ``flock`` and
``fsync``; the Parquet parts may go to any pyarrow file system (local folder, s3://, gs://).

The layout and the readers are ``data.feedback_log``'s. Rows with the same ``event_id`` may appear
twice when a client retries; the readers keep the first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.storage import resolve
from data.feedback_log import LOCK_SUFFIX, PART_PREFIX, PART_SUFFIX, WAL_SUFFIX, read_wal_segment, rows_to_table
from data.schema import FEEDBACK_LOG
from serve.errors import FeedbackLogUnavailable

logger = logging.getLogger(__name__)

IMPRESSION = "impression"


def now_ms() -> int:
    return int(time.time() * 1000)


def impression_rows(*, request_id: str, user_id: str, items: Sequence[tuple[str, float]], model_version: str, ts: int) -> list[dict[str, Any]]:
    """One ``impression`` row per recommended (item_id, score), ``position`` counting from 1."""
    return [
        {
            "event_id": str(uuid.uuid4()),
            "ts": ts,
            "user_id": user_id,
            "item_id": item_id,
            "event": IMPRESSION,
            "value": float(score),
            "request_id": request_id,
            "model_version": model_version,
            "position": position,
        }
        for position, (item_id, score) in enumerate(items, start=1)
    ]


def safe_name(text: str, limit: int = 48) -> str:
    """``text`` reduced to a file-name fragment that cannot leave its folder."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:limit] or "x"


class FeedbackLog:
    """One writer's WAL plus the flush into Parquet parts. Thread-safe: appends may come from the
    event loop while a background thread flushes."""

    def __init__(self, log_uri: str, wal_dir: str | Path, *, writer: str, flush_max_events: int = 20_000):
        self.location = resolve(log_uri, "feedback log")
        self.wal_dir = Path(wal_dir).expanduser().resolve()
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        self.location.filesystem.create_dir(self.location.path, recursive=True)
        # A start-time prefix keeps part names in time order; the random suffix makes a restarted
        # replica with the same tag a new owner.
        self.owner = f"{now_ms():013d}-{safe_name(writer)}-{uuid.uuid4().hex[:8]}"
        self.flush_max_events = flush_max_events
        self._lock_fd = self._take_lock()
        self._append_lock = threading.Lock()  # the active segment
        self._flush_lock = threading.Lock()  # one flush at a time
        self._seq = 0
        self._segment_fd: int | None = None
        self._segment_rows = 0
        self._closed_segments: list[Path] = []
        self.flush_wanted = threading.Event()  # set when the active segment is full

    # --- writing ------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        """Create and lock ``<owner>.lock``. It is locked before it appears under its name, so a
        visible lock file whose lock is free always belongs to a dead writer."""
        staging = self.wal_dir / f".{self.owner}{LOCK_SUFFIX}.new"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(staging, self.wal_dir / f"{self.owner}{LOCK_SUFFIX}")
        _fsync_dir(self.wal_dir)
        return fd

    def _segment_path(self, owner: str, seq: int) -> Path:
        return self.wal_dir / f"{owner}.{seq:08d}{WAL_SUFFIX}"

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` to the WAL and fsync once; when this returns they survive a crash. A write that
        fails (a full disk, an I/O error) raises ``FeedbackLogUnavailable`` and leaves no partial bytes for
        a later line to be glued to: the segment is cut back to its last whole line, or, if that fails
        too, closed there and a new one started."""
        if not rows:
            return
        payload = "".join(json.dumps({name: row.get(name) for name in FEEDBACK_LOG.names}, separators=(",", ":")) + "\n" for row in rows).encode()
        with self._append_lock:
            try:
                if self._segment_fd is None:
                    self._seq += 1
                    self._segment_fd = os.open(self._segment_path(self.owner, self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    _fsync_dir(self.wal_dir)
                whole = os.lseek(self._segment_fd, 0, os.SEEK_END)
            except OSError as error:
                raise FeedbackLogUnavailable(f"feedback log unavailable: {error.strerror}") from error
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(self._segment_fd, view) :]
                os.fsync(self._segment_fd)
            except OSError as error:
                self._cut_back(whole)
                raise FeedbackLogUnavailable(f"feedback log unavailable: {error.strerror}") from error
            self._segment_rows += len(rows)
            if self._segment_rows >= self.flush_max_events:
                self.flush_wanted.set()

    def _cut_back(self, whole: int) -> None:
        """Drop a failed write's bytes from the active segment (called with the append lock held)."""
        try:
            os.ftruncate(self._segment_fd, whole)
            os.fsync(self._segment_fd)
        except OSError:
            logger.exception("could not cut %s back after a failed write: it is closed there", self._segment_path(self.owner, self._seq))
            self._close_segment()

    def _rotate(self) -> None:
        with self._append_lock:
            self._close_segment()

    def _close_segment(self) -> None:
        if self._segment_fd is not None:
            os.close(self._segment_fd)
            self._closed_segments.append(self._segment_path(self.owner, self._seq))
            self._segment_fd = None
            self._segment_rows = 0

    # --- WAL → Parquet ------------------------------------------------------------------------

    def flush(self) -> int:
        """Move everything written so far (and any dead writer's WAL) into Parquet; rows written."""
        with self._flush_lock:
            self.flush_wanted.clear()
            self._rotate()
            written = 0
            while self._closed_segments:
                written += self._convert(self._closed_segments[0])
                self._closed_segments.pop(0)
            return written + self._recover_orphans()

    def _convert(self, segment: Path) -> int:
        """Segment → ``part-<owner>-<seq>.parquet`` (temporary name, then rename) → delete the segment."""
        rows = read_wal_segment(segment)
        if rows:
            self._write_part(rows_to_table(rows), f"{PART_PREFIX}{segment.stem.replace('.', '-')}{PART_SUFFIX}")
        segment.unlink()
        _fsync_dir(self.wal_dir)
        return len(rows)

    def _write_part(self, table: pa.Table, name: str) -> None:
        # The temporary name is no part's (see data.feedback_log): readers never see it.
        final, temporary = self.location.join(name), self.location.join(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        filesystem = self.location.filesystem
        if self.location.is_local:
            with open(temporary, "wb") as file:
                pq.write_table(table, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
            _fsync_dir(Path(self.location.path))
        else:
            # An object store's upload is durable once the stream closes; the move publishes it.
            pq.write_table(table, temporary, filesystem=filesystem)
            filesystem.move(temporary, final)

    def _recover_orphans(self) -> int:
        """Replay the segments of writers that died (their lock is free) into Parquet."""
        owners = {path.name.split(".", 1)[0] for path in self.wal_dir.iterdir() if path.suffix in (WAL_SUFFIX, LOCK_SUFFIX) and not path.name.startswith(".")}
        owners.discard(self.owner)
        written = 0
        for owner in sorted(owners):
            lock_path = self.wal_dir / f"{owner}{LOCK_SUFFIX}"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                segments = sorted(self.wal_dir.glob(f"{owner}.*{WAL_SUFFIX}"))
                for segment in segments:
                    written += self._convert(segment)
                if segments:
                    logger.info("replayed %d WAL segment(s) of dead writer %s into Parquet", len(segments), owner)
                lock_path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return written

    def close(self) -> int:
        """Flush everything and release the lock (graceful shutdown)."""
        written = self.flush()
        (self.wal_dir / f"{self.owner}{LOCK_SUFFIX}").unlink(missing_ok=True)
        os.close(self._lock_fd)
        return written


def _fsync_dir(path: Path) -> None:
    """Make a file's creation, rename or deletion in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
