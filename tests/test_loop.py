"""The closed loop as a user operates it, on a real `polyrec train` artifact and real Ray Serve over HTTP:
the artifact brings its users to the service; `polyrec retrain` finds the version in service, retrains from
the feedback log, gates both versions on one split and swaps the new one in under load without restarting a
replica or losing a history, on both graphs; a bad candidate is refused while the live version keeps
answering; rollback returns to the version that served before."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from mlflow import MlflowClient
from ray import serve

from cluster.retrain import RetrainConfig, run_retrain
from common.errors import InputError
from data.manifest import load_manifest
from serve.config import FeedbackLogConfig, ServeConfig
from serve.runner import APP_NAME, Service, rollback, run_service, swap_model
from serve.versions import VersionHistory
from tests.ports import free_port
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow

API_KEY = "loop-key"
AUTH = {"X-API-Key": API_KEY}


PORT = free_port()  # Serve's HTTP options are fixed when it first starts


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as environment:  # replicas inherit the environment of the Ray instance
        environment.setenv("POLYREC_API_KEY", API_KEY)
        # A replica that cannot load its model fails alike on every try: Serve's 3 tries per replica before it calls the
        # deployment failed only delay the rollback that the last test checks.
        environment.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
        # Serving holds about one CPU for as long as it runs; the retraining's Ray Data and Train tasks need theirs.
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            yield
            serve.shutdown()
        finally:
            ray.shutdown()


def start(root: Path, model: str, graph: str, **settings: Any) -> Service:
    """A fresh application of ``graph`` serving ``model``, with nothing but the model (and ``settings``) named: its
    users come from the data the artifact records."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    config = ServeConfig(
        graph=graph,
        model=model,
        state_dir=str(root / graph / "state"),
        port=PORT,
        feedback=FeedbackLogConfig(path=str(root / graph / "feedback")),
        **settings,
    )
    return run_service(config, blocking=False)


def replica_names() -> set[str]:
    """The names of the application's replica actors: a restarted replica comes back under a new name."""
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if f":{APP_NAME}#" in actor["name"]}


def recommend(url: str, user_id: str, k: int = 5) -> dict:
    response = httpx.post(f"{url}/v1/recommend", json={"user_id": user_id, "k": k}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def known_users(data: str) -> list[str]:
    import pyarrow.parquet as pq

    from data import schema

    return pq.read_table(Path(data) / schema.USER_VOCAB_PATH, columns=["user_id"])["user_id"].to_pylist()


@pytest.fixture(scope="module")
def colocated_service(cluster, trained_run, tmp_path_factory) -> tuple[Service, str]:
    """The colocated application serving the trained artifact, and what starting it printed: the first test asks it,
    then ``swapped`` retrains against it (one start fewer)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        service = start(tmp_path_factory.mktemp("served"), trained_run.artifact, "colocated")
    return service, printed.getvalue()


def test_a_served_artifact_brings_its_users_and_reports_its_metrics(colocated_service, trained_run):
    service, printed = colocated_service
    users = known_users(trained_run.data)
    assert f"histories of {len(users)} users" in printed
    recorded = json.loads((Path(trained_run.artifact) / "artifact.json").read_text())
    assert (recorded["rating"]["low"], recorded["rating"]["high"]) == (1.0, 5.0)  # the data's rating scale, which predictions keep to
    for user in users[:5]:
        items = recommend(service.url, user)["items"]
        assert any(item["because"] for item in items), user
        assert all(1.0 <= item["rating"] <= 5.0 for item in items), user

    model = httpx.get(f"{service.url}/v1/model", timeout=60)
    assert model.status_code == 200, model.text
    assert model.json()["metrics"] == recorded["metrics"]
    # Ratings are taken on the scale the artifact records, and nowhere else set: 5 is one, 5.5 is not.
    assert model.json()["rating_scale"] == {"low": 1.0, "high": 5.0}
    rate = {"user_id": users[0], "item_id": "50", "event": "rate"}
    assert httpx.post(f"{service.url}/v1/feedback", json={**rate, "value": 5}, headers=AUTH, timeout=60).status_code == 200
    refused = httpx.post(f"{service.url}/v1/feedback", json={**rate, "value": 5.5}, headers=AUTH, timeout=60)
    assert refused.status_code == 422 and "a rate event's value is a rating in [1, 5]" in refused.text, refused.text
    assert set(recorded["metrics"]) == {"validation", "test"} and "NDCG@10" in recorded["metrics"]["test"]
    assert recorded["metrics"]["validation"].keys() == recorded["metrics"]["test"].keys()  # the same figures, by the same names
    assert model.json()["model_version"] == recorded["model_version"]


@pytest.fixture(scope="module", params=["colocated", "split"])
def swapped(request, cluster, trained_run, tmp_path_factory) -> dict:
    """A service of each graph, a user's clicks logged through the API, then `polyrec retrain`'s path run against
    it while four clients ask for recommendations; what they saw, and the replicas before and after."""
    graph = request.param
    root = tmp_path_factory.mktemp(f"loop-{graph}")
    service = request.getfixturevalue("colocated_service")[0] if graph == "colocated" else start(root, trained_run.artifact, graph)
    users = known_users(trained_run.data)
    clicked = ["181", "174", "172"]
    response = httpx.post(
        f"{service.url}/v1/feedback", headers=AUTH, timeout=60, json={"events": [{"user_id": users[0], "item_id": item, "event": "click"} for item in clicked]}
    )
    assert response.status_code == 200, response.text
    replicas = replica_names()

    outcomes: list[tuple[int, str | None, bool]] = []  # status, model version, any non-empty because
    stop = threading.Event()

    def load(user: str) -> None:
        with httpx.Client(base_url=service.url, timeout=120) as http:
            while not stop.is_set():
                answer = http.post("/v1/recommend", json={"user_id": user, "k": 5})
                body = answer.json() if answer.status_code == 200 else {}
                outcomes.append((answer.status_code, body.get("model_version"), any(i["because"] for i in body.get("items", []))))
                time.sleep(0.25)  # 4 clients at about 3 requests a second each; faster, they starve the retraining of the CPU

    config = RetrainConfig(
        feedback_log=service.config.feedback.path,
        output=str(root / "retrain"),
        train=tiny_config(trained_run.data, root / "unused", epochs=1, model_version=f"v2-{graph}"),
    )
    config.preprocess = config.preprocess.model_validate(load_manifest(trained_run.data).config)
    # Promotion is what this fixture exercises; the gate itself is tested in tests/test_gate.py.
    config.gate = config.gate.model_copy(update={"ndcg_tolerance": 1.0, "rmse_tolerance": 10.0, "like_auc_tolerance": 1.0})
    threads = [threading.Thread(target=load, args=(user,)) for user in users[:4]]
    for thread in threads:
        thread.start()
    try:
        outcome = run_retrain(config)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return {
        "service": service,
        "outcome": outcome,
        "outcomes": outcomes,
        "replicas_before": replicas,
        "replicas_after": replica_names(),
        "users": users,
        "clicked": clicked,
        "graph": graph,
        "root": root,
    }


def test_retrain_swaps_the_model_in_place_under_load(swapped, trained_run):
    outcome, service = swapped["outcome"], swapped["service"]
    assert outcome.promoted and outcome.swapped, outcome.reason
    assert outcome.current_model == trained_run.artifact  # found as the live version of the running service
    assert swapped["replicas_after"] == swapped["replicas_before"]  # no replica restarted
    statuses = [status for status, _, _ in swapped["outcomes"]]
    assert statuses and set(statuses) == {200}
    first_version = json.loads((Path(trained_run.artifact) / "artifact.json").read_text())["model_version"]
    assert {version for _, version, _ in swapped["outcomes"]} == {first_version, f"v2-{swapped['graph']}"}
    assert all(explained for _, _, explained in swapped["outcomes"])  # every answer personal, before and after

    after = recommend(service.url, swapped["users"][0], k=10)
    assert after["model_version"] == f"v2-{swapped['graph']}"
    assert any(item["because"] for item in after["items"])
    # The store kept the clicks logged before the swap: they are still the user's latest history.
    store = serve.get_deployment_handle("UserStateStore", app_name=APP_NAME)
    assert store.context.remote(swapped["users"][0]).result().history[-3:] == swapped["clicked"]
    live = VersionHistory(service.config.state_dir).live()
    assert live.model == outcome.new_model and live.gate["promoted"]
    assert live.gate["serving"]["NDCG@10"] == outcome.gate.serving["NDCG@10"]
    retrain_json = json.loads(next(Path(swapped["root"], "retrain").glob("*/retrain.json")).read_text())
    assert retrain_json["gate"]["candidate"] == pytest.approx(outcome.gate.candidate)
    # The promoted version is registered in MLflow with the gate's decision.
    registered = MlflowClient(f"sqlite:///{swapped['root'] / 'mlruns' / 'mlflow.db'}").get_model_version("polyrec", outcome.registered_version)
    assert registered.source == str(Path(outcome.new_model).resolve())
    assert registered.tags == {"gate.promoted": "true", "gate.reason": outcome.gate.reason}


def test_a_bad_candidate_is_refused_and_the_live_version_keeps_answering(swapped, tmp_path):
    service, live = swapped["service"], swapped["outcome"].new_model
    truncated = tmp_path / "truncated"
    shutil.copytree(live, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    other_format = tmp_path / "other-format"
    shutil.copytree(live, other_format)
    metadata = json.loads((other_format / "artifact.json").read_text())
    (other_format / "artifact.json").write_text(json.dumps({**metadata, "format_version": 99}))
    before = VersionHistory(service.config.state_dir).records()
    for candidate, named in ((truncated, "model.safetensors"), (other_format, "artifact.json")):
        with pytest.raises(InputError, match=f"{candidate / named}"):
            swap_model(str(candidate))
        assert recommend(service.url, swapped["users"][1])["model_version"] == f"v2-{swapped['graph']}"
    assert VersionHistory(service.config.state_dir).records() == before


def test_rollback_returns_to_the_version_that_served_before(swapped, trained_run):
    service = swapped["service"]
    record = rollback(service.config, blocking=False)
    assert record.model == trained_run.artifact and record.status == "live"
    answer = recommend(service.url, swapped["users"][0])
    assert answer["model_version"] == record.model_version
    assert any(item["because"] for item in answer["items"])
    statuses = {r.model: r.status for r in VersionHistory(service.config.state_dir).records()}
    assert statuses == {trained_run.artifact: "live", swapped["outcome"].new_model: "rolled_back"}
    assert replica_names() == swapped["replicas_before"]
    with pytest.raises(InputError, match="no earlier model version"):
        rollback(service.config, blocking=False)


def test_a_candidate_the_replicas_cannot_load_is_rolled_back_to_the_live_version(swapped, tmp_path, monkeypatch):
    """The driver's check is skipped, so the replicas' own load fails: the application is put back as it was
    (last: the failed replicas are replaced)."""
    service = swapped["service"]
    live = VersionHistory(service.config.state_dir).live()
    truncated = tmp_path / "truncated"
    shutil.copytree(swapped["outcome"].new_model, truncated)
    (truncated / "item_vectors.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setattr("serve.runner.check_model", lambda path, model_root=None: None)
    with pytest.raises(InputError, match=f"{live.model} is still serving"):
        swap_model(str(truncated))
    assert recommend(service.url, swapped["users"][1])["model_version"] == live.model_version
    assert VersionHistory(service.config.state_dir).live() == live
