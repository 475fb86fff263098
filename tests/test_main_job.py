"""The main job (`make run`'s `polyrec pipeline`) end to end, as a user runs it, on stage files of their own (the
tiny slice of ml-100k, a tiny model): every stage runs, the report says what happened, what it says is what the
run folder holds, and the service is gone when the command returns."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data.feedback_log import read_feedback_log
from tests.ports import free_port
from tests.tiny import tiny_config, tiny_preprocess_config

pytestmark = pytest.mark.slow


def test_the_main_job_runs_every_stage_and_reports_what_its_run_folder_holds(tmp_path: Path) -> None:
    configs, run = tmp_path / "configs", tmp_path / "run"
    configs.mkdir()
    (configs / "preprocess.yaml").write_text(tiny_preprocess_config(tmp_path).to_yaml())
    (configs / "train.yaml").write_text(tiny_config("set by the job", "set by the job", epochs=1).to_yaml())
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "pipeline", "--output", str(run), "--configs", str(configs), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    future = pq.read_table(run / "replay" / "future.parquet").sort_by("timestamp")  # replayed in time order
    base = pq.read_table(run / "replay" / "base.parquet")
    assert base["timestamp"].to_numpy().max() < future["timestamp"].to_numpy().min()  # the future is after the base data
    report = json.loads((run / "report.json").read_text())
    online, held_out = report["online"], report["held_out"]
    assert online["errors"] == 0 and held_out["before"]["errors"] == held_out["after"]["errors"] == 0
    assert online["requests"] + held_out["before"]["requests"] <= future.num_rows and held_out["before"]["requests"] > 0
    # Every replayed interaction came back as feedback, and the log holds exactly those (besides the impressions).
    log = read_feedback_log(str(run / "feedback"))
    logged = log.filter(pc.not_equal(log["event"], "impression"))
    replayed = future.slice(0, online["requests"])
    assert set(log.filter(pc.equal(log["event"], "impression"))["user_id"].to_pylist()) >= set(replayed["user_id"].to_pylist())
    assert online["feedback_events"] == online["requests"] == logged.num_rows
    assert sorted(zip(logged["user_id"].to_pylist(), logged["item_id"].to_pylist())) == sorted(
        zip(replayed["user_id"].to_pylist(), replayed["item_id"].to_pylist())
    )
    # The report's gate outcome is the service's version history.
    versions = json.loads((run / "serve" / "versions.json").read_text())
    text = (run / "report.md").read_text()
    swapped = "hot swap done" in text
    first, candidate = versions["versions"]
    assert (first["status"], candidate["status"]) == (("retired", "live") if swapped else ("live", "rejected"))
    assert candidate["gate"]["promoted"] == swapped
    assert held_out["before"]["model_versions"] == [first["model_version"]]
    assert held_out["after"]["model_versions"] == [(candidate if swapped else first)["model_version"]]
    # Nothing listens on the service's port any more.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_a_configs_folder_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    """Not the defaults in silence: a mistyped folder would otherwise run the embedded ml-100k."""
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "pipeline", "--output", str(tmp_path / "run"), "--configs", str(tmp_path / "confgs")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"--configs {tmp_path / 'confgs'}: no such folder" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("stage", "setting"), [("train", "epochs: 0"), ("retrain", "gate:\n  ndcg_tolerance: -1")])
def test_a_mistake_in_any_stages_file_is_reported_before_the_first_stage_runs(tmp_path: Path, stage: str, setting: str) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{stage}.yaml").write_text(setting + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "pipeline", "--output", str(tmp_path / "run"), "--configs", str(configs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"polyrec pipeline: error: {configs / stage}.yaml: "), done.stderr
    assert not (tmp_path / "run" / "data").exists()  # nothing ran
