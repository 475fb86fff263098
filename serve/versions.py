"""The model versions a service has run, for rollback: ``<state_dir>/versions.json``.

The last record is the version being served. A swap appends one; a rollback removes the last and
serves the one before it. The file is replaced atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from data.errors import InputError
from train.artifact import read_metadata

VERSIONS_FILE = "versions.json"
MAX_RECORDS = 50


@dataclass(frozen=True)
class VersionRecord:
    model: str  # artifact path
    model_version: str
    deployed_at: str  # ISO 8601, UTC


def artifact_version(path: str) -> str:
    """The ``model_version`` in an artifact's metadata, read without loading the model."""
    return read_metadata(path)["model_version"]


class VersionHistory:
    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / VERSIONS_FILE

    def records(self) -> list[VersionRecord]:
        if not self.path.is_file():
            return []
        try:
            return [VersionRecord(**record) for record in json.loads(self.path.read_text())["versions"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{self.path}: not a version history ({err})") from None

    def current(self) -> VersionRecord | None:
        records = self.records()
        return records[-1] if records else None

    def record(self, model: str) -> VersionRecord:
        """Note ``model`` as the version now served (nothing changes if it already is)."""
        records = self.records()
        if records and records[-1].model == model:
            return records[-1]
        entry = VersionRecord(model, artifact_version(model), datetime.now(UTC).isoformat(timespec="seconds"))
        self._write([*records, entry][-MAX_RECORDS:])
        return entry

    def previous(self) -> VersionRecord:
        records = self.records()
        if len(records) < 2:
            raise InputError(f"{self.path}: no earlier model version to roll back to")
        return records[-2]

    def drop_current(self) -> VersionRecord:
        """Forget the version served now; returns the one before it, which is now current."""
        previous = self.previous()
        self._write(self.records()[:-1])
        return previous

    def _write(self, records: list[VersionRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        with open(temporary, "w") as file:
            json.dump({"versions": [asdict(record) for record in records]}, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
