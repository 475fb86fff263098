"""A kept service stops on Ctrl-C even when an earlier stage of the same process (Ray Train, in the main job)
installed a SIGINT handler of its own, and says which version it serves; stopped while it starts, it leaves nothing
running; and a Ctrl-C or a SIGTERM during a training, or a Ctrl-C after one, interrupts the command as it should."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from cluster.cli import main as polyrec
from data.feedback_log import read_feedback_log
from serve.config import ServeConfig
from serve.runner import Service
from serve.versions import VersionRecord
from tests.ports import free_port
from tests.tiny import tiny_config


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
        Service.serve_until_stopped(service)  # returns: a stop is how a service ends
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    assert service.stopped == 1 and swallowed == []
    printed = capsys.readouterr()
    assert "serving model v1 at http://127.0.0.1:8000" in printed.out
    assert printed.err.strip().splitlines()[-1] == f"polyrec: service stopped; its feedback log is {service.config.feedback.path}"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_stop_during_a_training_interrupts_it_in_one_line_and_leaves_ctrl_c_as_it_was(
    trained_run, tmp_path: Path, capfd: pytest.CaptureFixture[str], stop: signal.Signals
) -> None:
    """Ray Train aborts the run on Ctrl-C and ends it with sys.exit(1), Ray's SIGTERM handler ends it with
    sys.exit(15); either way `polyrec train` says it was interrupted, and nothing else: Ray's C++ crash handler
    printed a stack dump of the process on SIGTERM (captured here at the file descriptor, where it wrote). Ray Train's
    handler (which would ask the finished run's controller to abort, and fail to find it) is gone with the run."""
    (tmp_path / "train.yaml").write_text(tiny_config(trained_run.data, tmp_path / "model", epochs=1000).to_yaml())

    def stop_once_an_epoch_is_checkpointed() -> None:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "model" / "ray_results").glob("*/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), stop)

    threading.Thread(target=stop_once_an_epoch_is_checkpointed, daemon=True).start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh process has it
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    started_ray = not ray.is_initialized()
    try:
        assert polyrec(["train", "--config", str(tmp_path / "train.yaml")]) == 130
        # The Ray connection the command made is closed before it says so (no worker's log line can follow the
        # message); one the caller had stays.
        assert ray.is_initialized() != started_ray
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_sigterm)
        if started_ray:
            ray.shutdown()
    printed = capfd.readouterr().err
    assert printed.strip().splitlines()[-1] == "polyrec train: interrupted", printed[-3000:]
    assert "SIGTERM received" not in printed and "Traceback" not in printed, printed[-3000:]
    assert not (tmp_path / "model" / "artifact").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_service_stopped_while_it_starts_leaves_nothing_running(trained_run, tmp_path: Path, stop: signal.Signals) -> None:
    """Stopped once its replicas run but before it says it serves, `polyrec serve` says so in one line, exits with
    130, and every process of its Ray instance (HAProxy too) is gone."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "feedback_log": str(tmp_path / "feedback"), "port": free_port()}))
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:  # its own Ray instance, whatever else runs here
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--config", str(config), "--model", trained_run.artifact],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RAY_TMPDIR": ray_tmp},
        )
        try:
            started = _descendants_once_a_replica_runs(process)
            process.send_signal(stop)
            out, err = process.communicate(timeout=180)
        finally:
            process.kill()
        assert "Ctrl-C stops" not in out, out  # interrupted while it started
        assert process.returncode == 130 and err.strip().splitlines()[-1] == "polyrec serve: interrupted", err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [_name(p) for p in alive]


def test_a_running_service_stopped_by_kill_ends_cleanly_with_its_feedback_logged(trained_run, tmp_path: Path) -> None:
    """SIGTERM (what a supervisor or `kill` sends; Ctrl-C takes the same path) to a `polyrec serve` that serves: it
    stops gracefully and exits with 0, every process of its Ray instance gone, and the feedback it acknowledged is
    in the log's Parquet parts."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "feedback_log": str(tmp_path / "feedback"), "port": port}))
    env = {name: value for name, value in os.environ.items() if name != "POLYREC_API_KEY"}
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp, out_file.open("w") as out, err_file.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--config", str(config), "--model", trained_run.artifact],
            stdout=out,
            stderr=err,
            text=True,
            env={**env, "RAY_TMPDIR": ray_tmp},
        )
        try:
            deadline = time.monotonic() + 240
            while "Ctrl-C stops" not in out_file.read_text():  # printed, and flushed, once it serves
                assert process.poll() is None and time.monotonic() < deadline, err_file.read_text()[-3000:]
                time.sleep(0.2)
            user = pq.read_table(Path(trained_run.data) / "vocab" / "users.parquet")["user_id"][0].as_py()
            event = {"event_id": "before-the-stop", "user_id": user, "item_id": "1", "event": "click"}
            assert httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json=event, timeout=60).status_code == 200
            running = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=180)
        finally:
            process.kill()
        printed = err_file.read_text()
        assert process.returncode == 0, printed[-3000:]
        assert printed.strip().splitlines()[-1] == f"polyrec: service stopped; its feedback log is {tmp_path / 'feedback'}", printed[-3000:]
        assert "Traceback" not in printed and "interrupted" not in printed, printed[-3000:]
        _, alive = psutil.wait_procs(running, timeout=60)
        assert not alive, [_name(p) for p in alive]
    assert read_feedback_log(str(tmp_path / "feedback"))["event_id"].to_pylist() == ["before-the-stop"]  # the Parquet parts alone


def _descendants_once_a_replica_runs(process: subprocess.Popen) -> list[psutil.Process]:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        descendants = psutil.Process(process.pid).children(recursive=True)
        if any("ServeReplica:polyrec:" in _name(p) for p in descendants):
            return descendants
        time.sleep(0.1)
    raise AssertionError("no replica started in 240 s")


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone since
        return ""
