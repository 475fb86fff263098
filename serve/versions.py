"""The model versions a service has run, which one is live, and the gate decisions behind them:
``<state_dir>/versions.json``.

Records are kept in the order the versions were first offered. Exactly one is ``live``; a version
that served and was replaced is ``retired``; a rollback marks the live one ``rolled_back`` and makes
the newest ``retired`` one live again (the version that served before it); a candidate the
retraining gate refused is ``rejected`` and never served. A record carries the gate's figures when
a retraining produced it. The file is replaced atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from common.errors import InputError
from train.artifact import read_metadata

VERSIONS_FILE = "versions.json"
MAX_RECORDS = 50
Status = Literal["live", "retired", "rolled_back", "rejected"]


@dataclass(frozen=True)
class VersionRecord:
    model: str  # artifact path
    model_version: str
    status: Status
    recorded_at: str  # ISO 8601, UTC: when the record was made
    live_since: str | None = None  # when it last went live
    gate: dict[str, Any] | None = field(default=None)  # the retraining gate's decision, when one was made


def artifact_version(path: str) -> str:
    """The ``model_version`` in an artifact's metadata, read without loading the model."""
    return read_metadata(path)["model_version"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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

    def live(self) -> VersionRecord | None:
        return next((record for record in self.records() if record.status == "live"), None)

    def record_live(self, model: str, gate: dict[str, Any] | None = None) -> VersionRecord:
        """Note ``model`` as the version now served; the one served until now is retired. Nothing
        changes when it already is the live version."""
        records = self.records()
        live = next((record for record in records if record.status == "live"), None)
        if live is not None and live.model == model:
            return live
        now = _now()
        entry = VersionRecord(model, artifact_version(model), "live", now, now, gate)
        self._write([replace(r, status="retired") if r.status == "live" else r for r in records] + [entry])
        return entry

    def record_rejected(self, model: str, gate: dict[str, Any]) -> VersionRecord:
        """Note a candidate the gate refused, with its figures; it never serves."""
        entry = VersionRecord(model, artifact_version(model), "rejected", _now(), None, gate)
        self._write([*self.records(), entry])
        return entry

    def rollback_target(self) -> VersionRecord:
        """The version that served before the live one."""
        records = self.records()
        live = [i for i, record in enumerate(records) if record.status == "live"]
        earlier = [record for record in records[: live[0] if live else len(records)] if record.status == "retired"]
        if not earlier:
            raise InputError(f"{self.path}: no earlier model version to roll back to")
        return earlier[-1]

    def record_rollback(self, target: VersionRecord) -> VersionRecord:
        """The live version is rolled back and ``target`` (``rollback_target()``) is live again."""
        now = _now()
        updated = []
        for record in self.records():
            if record.status == "live":
                record = replace(record, status="rolled_back")
            elif record == target:
                record = replace(record, status="live", live_since=now)
            updated.append(record)
        self._write(updated)
        return replace(target, status="live", live_since=now)

    def _write(self, records: list[VersionRecord]) -> None:
        if len(records) > MAX_RECORDS:  # the oldest go first, never the live one
            live = [record for record in records if record.status == "live"]
            others = [record for record in records if record.status != "live"][len(records) - MAX_RECORDS :]
            records = [record for record in records if record in live or record in others]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        with open(temporary, "w") as file:
            json.dump({"versions": [asdict(record) for record in records]}, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
