"""A kept service stops on Ctrl-C even when an earlier stage of the same process (Ray Train, in the main job)
installed a SIGINT handler of its own, and says which version it serves."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from serve.config import ServeConfig
from serve.runner import _serve_until_stopped
from serve.versions import VersionRecord


class _KeptService:
    def __init__(self, state_dir: Path) -> None:
        self.url = "http://127.0.0.1:8000"
        self.model = VersionRecord(model="/models/v1", model_version="v1", status="live", recorded_at="2026-12-05T00:00:00Z")
        self.config = ServeConfig(state_dir=str(state_dir))
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


def test_ctrl_c_stops_the_kept_service_whatever_handler_came_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service = _KeptService(tmp_path)
    swallowed = []
    previous = signal.signal(signal.SIGINT, lambda *_: swallowed.append(True))  # as Ray Train's handler does
    previous_term = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _serve_until_stopped(service)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    assert service.stopped == 1 and swallowed == []
    assert "serving model v1 at http://127.0.0.1:8000" in capsys.readouterr().out
