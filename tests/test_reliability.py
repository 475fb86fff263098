"""The service past capacity, on a full disk and in an unsafe setup, over real Ray Serve HTTP: refused work gets 503 with
Retry-After and never hangs, a write the log cannot make durable is refused and nothing acknowledged is lost, and a
service beyond loopback does not start without an API key."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from cluster.cli import main as polyrec
from common.errors import InputError
from data.feedback_log import read_feedback_log
from serve.config import AdmissionConfig, FeedbackLogConfig, ServeConfig, api_key
from serve.runner import APP_NAME, Service, deployed_config, run_service
from tests.ports import free_port
from tests.serving_fixtures import build_random_artifact, build_training_data

pytestmark = pytest.mark.slow

PORT = free_port()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reliability")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield {"artifact": str(build_random_artifact(root / "model")), "data": build_training_data(root / "data"), "root": str(root)}
        serve.shutdown()
    finally:
        ray.shutdown()


def start(model: dict[str, str], name: str, **settings) -> Service:
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    root = Path(model["root"]) / name
    settings.setdefault("feedback", FeedbackLogConfig(path=str(root / "feedback"), flush_interval_s=3600))
    config = ServeConfig(model=model["artifact"], training_data=model["data"], state_dir=str(root / "state"), port=PORT, **settings)
    return run_service(config, blocking=False)


@pytest.fixture(scope="module")
def admitting_two(model) -> Service:
    """A service that works on two requests at once; the CLI's swap runs on it too, one request at a time, so that
    the module starts one service fewer."""
    return start(model, "admission", admission=AdmissionConfig(max_in_progress=2, retry_after_s=2))


def test_requests_past_capacity_are_refused_at_once_with_503_and_retry_after(admitting_two):
    service = admitting_two
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(24)

    def ask(user: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            barrier.wait()
            answers.append(client.post("/v1/recommend", json={"user_id": str(user % 40 + 1), "k": 5}))

    threads = [threading.Thread(target=ask, args=(user,)) for user in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 503}, statuses  # some served, the rest refused; nothing else, nothing hanging
    assert all(answer.headers["retry-after"] == "2" for answer in answers if answer.status_code == 503)
    assert all(len(answer.json()["items"]) == 5 for answer in answers if answer.status_code == 200)


def test_polyrec_serve_beside_the_running_service_swaps_its_model_in_place_and_returns(model, admitting_two, tmp_path, capsys):
    service = admitting_two
    second = build_random_artifact(tmp_path / "second", seed=1, model_version="second-version")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "port": PORT}))
    with httpx.Client(base_url=service.url, timeout=60) as client:
        first = client.get("/v1/model").json()["model_version"]
        assert polyrec(["serve", "--config", str(config), "--model", str(second)]) == 0  # returns: it swaps, it does not serve
        assert "is running already: only its model changes" in capsys.readouterr().out
        assert client.get("/v1/model").json()["model_version"] == "second-version"
        assert polyrec(["serve", "--config", str(config), "--model", model["artifact"]]) == 0
        assert client.get("/v1/model").json()["model_version"] == first
    assert deployed_config().state_dir == service.config.state_dir  # the running service's settings stay


def test_a_request_past_its_deadline_is_answered_503(model):
    service = start(model, "deadline", admission=AdmissionConfig(request_timeout_s=0.001, retry_after_s=1))
    answer = httpx.post(f"{service.url}/v1/recommend", json={"user_id": "1", "k": 5}, timeout=60)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "not answered within" in answer.json()["detail"]
    assert httpx.get(f"{service.url}/healthz", timeout=60).status_code == 200


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB file system for the write-ahead log: it fills after a few hundred events."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_refuses_feedback_with_503_and_loses_nothing_acknowledged(model, tiny_disk, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("k3y\n")  # as `openssl rand -hex 32 > file` writes it: the newline is no part of the key
    service = start(
        model,
        "disk-full",
        api_key_env=None,
        api_key_file=str(key_file),
        feedback=FeedbackLogConfig(path=str(Path(model["root"]) / "disk-full" / "feedback"), wal_dir=str(tiny_disk), flush_interval_s=3600),
    )
    acknowledged, refused = [], None
    with httpx.Client(base_url=service.url, timeout=60, headers={"X-API-Key": "k3y"}) as client:
        unkeyed = httpx.post(f"{service.url}/v1/feedback", json={"user_id": "7", "item_id": "50", "event": "view"}, timeout=60)
        assert unkeyed.status_code == 401
        for batch in range(200):
            events = [{"event_id": f"b{batch}-{i}", "user_id": "7", "item_id": "50", "event": "view"} for i in range(20)]
            answer = client.post("/v1/feedback", json={"events": events})
            if answer.status_code != 200:
                refused = answer
                break
            acknowledged += answer.json()["event_ids"]
        assert refused is not None, "the disk never filled"
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "feedback log unavailable" in refused.json()["detail"]
        assert refused.json()["event_ids"] == [event["event_id"] for event in events]  # what a retry resends
        logged = set(read_feedback_log(service.config.feedback.path, tiny_disk)["event_id"].to_pylist())
        assert set(acknowledged) <= logged and f"b{batch}-0" not in logged

        # Moving the WAL into the log's Parquet parts frees the disk: writes are taken again, and everything
        # acknowledged before and after is in the log once.
        serve.get_deployment_handle("FeedbackLogger", app_name=APP_NAME).flush.remote().result()
        again = client.post("/v1/feedback", json={"event_id": "after", "user_id": "7", "item_id": "50", "event": "view"})
        assert again.status_code == 200
    logged = read_feedback_log(service.config.feedback.path, tiny_disk)["event_id"].to_pylist()
    assert sorted(logged) == sorted([*acknowledged, "after"])


def test_a_service_beyond_loopback_does_not_start_without_an_api_key(model, monkeypatch, capsys):
    monkeypatch.delenv("POLYREC_API_KEY", raising=False)
    running = deployed_config()
    with pytest.raises(InputError, match="listening on 0.0.0.0 needs an API key"):
        run_service(ServeConfig(model=model["artifact"], host="0.0.0.0", port=free_port()), blocking=False)
    assert polyrec(["serve", "--model", model["artifact"], "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("polyrec serve: error: serve: listening on 0.0.0.0 needs an API key")
    assert deployed_config() == running  # the running service was not touched


def test_keys_read_from_the_environment_or_a_file_are_stripped(monkeypatch, tmp_path):
    key_file = tmp_path / "polyrec-api-key"
    key_file.write_text("0123abcd\n")  # `openssl rand -hex 32 > file` ends in a newline
    monkeypatch.setenv("POLYREC_KEY_UNDER_TEST", "  s3cret\n")
    assert api_key(ServeConfig(api_key_env="POLYREC_KEY_UNDER_TEST")) == "s3cret"
    assert api_key(ServeConfig(api_key_env="POLYREC_NO_SUCH_KEY", api_key_file=str(key_file))) == "0123abcd"
    monkeypatch.setenv("POLYREC_KEY_UNDER_TEST", " \n")
    assert api_key(ServeConfig(api_key_env="POLYREC_KEY_UNDER_TEST")) is None
