"""The Serve graph over real HTTP: recommendations, bad input, cold start, feedback, new items, a model
hot swap under load with rollback, and feedback durability across a FeedbackLogger crash.

One Ray instance (2 CPUs) for the module. The Serve application first runs the colocated graph (two
Recommender replicas), whose answers to a set of requests are kept and whose stateful behaviours (new items,
feedback, impressions, hot swap and rollback) are checked; then it is replaced by the split graph,
with its own fresh state, which must answer those requests the same and which the rest
of the module tests. The model is a random tiny artifact over the first 40 MovieLens-100K users
(``tests.serving_fixtures``). Expected values come from the MovieLens files directly. Tests that change
server-side state (feedback, new items) come after those that read popularity, and the crash test
comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import ray
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.cli import main as polyrec
from common.config import RayConfig
from common.errors import InputError
from data.config import DEFAULT_DATASET_DIR
from data.feedback_log import RegisteredItem, read_feedback_log
from serve.batching import batched, set_batching
from serve.config import (
    LOCAL_SERVE_ENV,
    STOP_POLL_S,
    BatchingConfig,
    DeploymentOptions,
    FeedbackLogConfig,
    RankingConfig,
    ReRankConfig,
    ServeConfig,
    StateConfig,
)
from serve.feedback_log import FeedbackLog, impression_rows
from serve.messages import Ranked, RetrievalRequest
from serve.model_runtime import ModelCache, ServingModel
from serve.recommendation import RetrievalStage
from serve.rerank import explain, genre_capped, maximal_marginal_relevance, rerank_batch
from serve.runner import APP_NAME, SERVE_CONFIG_FILE, Service, application_config, rollback, run_service, serve_config_document, swap_model
from serve.state import ItemExists, ServerState
from serve.versions import VersionHistory
from tests.ports import free_port
from tests.serving_fixtures import build_random_artifact, build_training_data

NUM_USERS = 40
API_KEY = "test-key"
AUTH = {"X-API-Key": API_KEY}


# --- expected values, straight from the MovieLens files --------------------------------------


def ratings() -> pd.DataFrame:
    frame = pd.read_csv(DEFAULT_DATASET_DIR / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    return frame[frame["user"] <= NUM_USERS].astype({"user": str, "item": str})


def movies() -> pd.DataFrame:
    return pd.read_csv(DEFAULT_DATASET_DIR / "u.item", sep="|", encoding="latin-1", header=None).astype({0: str})


def user_items(user: str) -> set[str]:
    frame = ratings()
    return set(frame[frame["user"] == user]["item"])


def most_popular() -> list[str]:
    counts = Counter(ratings()["item"])
    return [item for item, _ in sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))]


def item_text(item_id: str) -> str:
    """The text tests.serving_fixtures gives the item (its title and genres)."""
    genres = [line.split("|")[0] for line in (DEFAULT_DATASET_DIR / "u.genre").read_text().splitlines() if line.strip()]
    row = movies().set_index(0).loc[item_id]
    names = [genres[g] for g, flag in enumerate(row.iloc[4:]) if flag]
    return f"{row[1]}. Genres: {', '.join(names)}."


# --- the service -----------------------------------------------------------------------------


FIRST_SCALE = {"kind": "none", "low": 1.0, "high": 5.0}
SECOND_SCALE = {"kind": "none", "low": 1.0, "high": 10.0}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve")
    return {
        "root": str(root),
        # Rating scales as the data's cleaning records them; the second's differs, as after a swap to data rated 1-10.
        "first": str(build_random_artifact(root / "model-a", num_users=NUM_USERS, seed=0, model_version="random-0", rating=FIRST_SCALE)),
        "second": str(build_random_artifact(root / "model-b", num_users=NUM_USERS, seed=1, model_version="random-1", rating=SECOND_SCALE)),
        "training_data": build_training_data(root / "data", num_users=NUM_USERS),
        "port": free_port(),
    }


def start(artifacts: dict[str, str], graph: str) -> Service:
    """The application with ``graph`` and its own fresh state, in place of any running one (a running
    application would only have its model swapped)."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    root = Path(artifacts["root"]) / graph
    config = ServeConfig(
        graph=graph,
        model=artifacts["first"],
        training_data=artifacts["training_data"],
        state_dir=str(root / "state"),
        # Parquet only at start and shutdown, so the crash test proves the WAL replay.
        feedback=FeedbackLogConfig(path=str(root / "feedback"), flush_interval_s=3600),
        # Ranked by the retrieval logit alone, so an exact text match comes first whatever the random
        # heads say; the mix of the three scores is tested on its own below.
        ranking=RankingConfig(weights={"retrieval": 1.0, "like": 0.0, "rating": 0.0}),
        port=artifacts["port"],
    )
    if graph == "colocated":  # two replicas, each with its own cache of user contexts
        recommender = config.deployments["Recommender"]
        config.deployments["Recommender"] = recommender.model_copy(update={"num_cpus": 0.5, "min_replicas": 2, "max_replicas": 2})
    running = run_service(config, blocking=False)
    running.second_model = artifacts["second"]
    return running


@pytest.fixture(scope="module")
def ray_instance() -> int:
    """A local Ray instance; its Prometheus metrics port, whose values are at most a second old."""
    saved_key = os.environ.get("POLYREC_API_KEY")
    os.environ["POLYREC_API_KEY"] = API_KEY  # replicas inherit the environment of the Ray instance
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        yield metrics_port
        serve.shutdown()  # graceful: the FeedbackLogger flushes its WAL
    finally:
        ray.shutdown()
        if saved_key is None:
            os.environ.pop("POLYREC_API_KEY", None)
        else:
            os.environ["POLYREC_API_KEY"] = saved_key


@pytest.fixture(scope="module")
def colocated_service(ray_instance, artifacts) -> Service:
    return start(artifacts, "colocated")


@pytest.fixture(scope="module")
def service(colocated_service, artifacts) -> Service:
    """The split graph, which replaces the colocated one (so the colocated tests must come first)."""
    return start(artifacts, "split")


@pytest.fixture(scope="module")
def colocated_client(colocated_service) -> httpx.Client:
    with httpx.Client(base_url=colocated_service.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def client(service) -> httpx.Client:
    with httpx.Client(base_url=service.url, timeout=120) as http:
        yield http


def recommend(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def because_ids(item: dict) -> set[str]:
    """The history items a recommended item's ``because`` names."""
    return {reason["item_id"] for reason in item["because"]}


def field_named(response: httpx.Response, field: str) -> bool:
    return any(field in [str(part) for part in error["loc"]] for error in response.json()["detail"])


# --- behaviours both graphs have (checked on each) ------------------------------------------


def check_impressions_are_logged_with_positions_and_version(client, service):
    answer = recommend(client, user_id="2", k=4)
    feedback = service.config.feedback
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = read_feedback_log(feedback.path, Path(service.config.state_dir) / "wal").to_pandas()
        rows = log[log["request_id"] == answer["request_id"]].sort_values("position")
        if len(rows) == 4:
            break
        time.sleep(0.5)
    assert rows["item_id"].tolist() == [item["item_id"] for item in answer["items"]]
    assert rows["position"].tolist() == [1, 2, 3, 4]
    assert set(rows["event"]) == {"impression"} and set(rows["model_version"]) == {"random-0"}
    assert rows["value"].tolist() == pytest.approx([item["score"] for item in answer["items"]])


def check_a_registered_item_is_recommendable_at_once(client):
    text = "Robots Sing in Space. Genres: Musical, Sci-Fi."
    created = client.post("/v1/items", json={"item_id": "robot-musical", "title": "Robots Sing", "text": text}, headers=AUTH)
    assert created.status_code == 201, created.text
    assert client.get("/v1/items/robot-musical").json() == {"item_id": "robot-musical", "title": "Robots Sing", "registered": True, "attributes": []}
    answer = recommend(client, user_id="nobody-4", k=3, interests=text)
    assert answer["items"][0] == {**answer["items"][0], "item_id": "robot-musical", "title": "Robots Sing"}
    assert client.post("/v1/items", json={"item_id": "robot-musical", "text": text}, headers=AUTH).status_code == 409
    assert client.post("/v1/items", json={"item_id": "50", "text": text}, headers=AUTH).status_code == 409


def check_feedback_extends_the_server_side_history(client):
    clicked = ["181", "174", "172"]  # Return of the Jedi, Raiders of the Lost Ark, The Empire Strikes Back
    assert set(clicked) <= set(ratings()["item"])
    before = recommend(client, user_id="newcomer", k=5)
    assert before["items"][0]["score"] == pytest.approx(1.0)  # popular: nothing known yet
    response = client.post("/v1/feedback", headers=AUTH, json={"events": [{"user_id": "newcomer", "item_id": item, "event": "click"} for item in clicked]})
    assert response.status_code == 200 and response.json()["accepted"] == 3
    after = recommend(client, user_id="newcomer", k=5)
    ids = [item["item_id"] for item in after["items"]]
    assert ids != [item["item_id"] for item in before["items"]]
    assert not set(ids) & set(clicked)
    assert all(because_ids(item) <= set(clicked) for item in after["items"])
    assert any(item["because"] for item in after["items"])


def check_ratings_are_taken_on_the_scale_of_the_served_version(client, scale: dict) -> None:
    """The served version's rating scale, as its artifact records it, is what /v1/model reports, what the OpenAPI
    document bounds a rate event's value by, and what /v1/feedback accepts."""
    assert client.get("/v1/model").json()["rating_scale"] == {"low": scale["low"], "high": scale["high"]}
    event = client.get("/openapi.json").json()["components"]["schemas"]["FeedbackEvent"]
    assert event["allOf"][0]["then"]["properties"]["value"] == {"type": "number", "minimum": scale["low"], "maximum": scale["high"]}
    for value in (scale["low"], scale["high"], scale["low"] - 0.5, scale["high"] + 0.5):
        response = client.post("/v1/feedback", json={"user_id": "rater", "item_id": "50", "event": "rate", "value": value}, headers=AUTH)
        if scale["low"] <= value <= scale["high"]:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 422 and field_named(response, "value"), response.text
            assert f"[{scale['low']:g}, {scale['high']:g}]" in response.text


def check_hot_swap_under_load_has_no_failed_request_and_rollback_returns(client, service, capsys, tmp_path):
    outcomes: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def load(user: int) -> None:
        with httpx.Client(base_url=service.url, timeout=120) as http:
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post("/v1/recommend", json={"user_id": str(user), "k": 5})
                version = response.json().get("model_version") if response.status_code == 200 else None
                outcomes.append((sent, response.status_code, version))

    threads = [threading.Thread(target=load, args=(user,)) for user in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        record = swap_model(service.second_model)
        swapped = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert record.model_version == "random-1"
    check_ratings_are_taken_on_the_scale_of_the_served_version(client, SECOND_SCALE)
    assert [status for _, status, _ in outcomes if status != 200] == []
    assert {version for _, _, version in outcomes} == {"random-0", "random-1"}
    assert {version for sent, _, version in outcomes if sent > swapped} == {"random-1"}
    assert client.get("/v1/model").json()["model_version"] == "random-1"
    history = VersionHistory(service.config.state_dir)
    assert [(r.model_version, r.status) for r in history.records()] == [("random-0", "retired"), ("random-1", "live")]

    # As a user rolls back: the command beside the running service, which swaps the version in place and returns.
    (tmp_path / "serve.yaml").write_text(service.config.to_yaml())
    capsys.readouterr()
    assert polyrec(["serve", "--rollback", "--config", str(tmp_path / "serve.yaml")]) == 0
    previous = history.live()
    assert previous.model_version == "random-0"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"polyrec serve: rolled back to random-0 ({previous.model}) in place"
    assert recommend(client, user_id="1", k=3)["model_version"] == "random-0"
    assert [(r.model_version, r.status) for r in history.records()] == [("random-0", "live"), ("random-1", "rolled_back")]
    check_ratings_are_taken_on_the_scale_of_the_served_version(client, FIRST_SCALE)
    with pytest.raises(InputError, match="no earlier model version"):
        rollback(service.config, blocking=False)


# --- the colocated graph (first: the split graph then replaces it) ---------------------------


def compared_requests() -> list[dict]:
    """Personal (with excluded items, client history and context), popular fallback, interests, and
    ignored history: one request of each path through the stages."""
    seen = user_items("1")
    unseen_popular = [item for item in most_popular() if item not in seen]
    return [
        {"user_id": "1", "k": 10, "exclude": unseen_popular[:3], "history": unseen_popular[3:4], "context": {"page": "home"}},
        {"user_id": "7", "k": 20},
        {"user_id": "nobody-1", "k": 5},
        {"user_id": "nobody-2", "k": 5, "interests": item_text("50")},
        {"user_id": "12", "k": 8, "interests": "Space adventure"},
        {"user_id": "nobody-3", "k": 5, "history": ["no-such-item", "50", "no-such-item"]},
    ]


@pytest.fixture(scope="module")
def colocated_answers(colocated_client) -> list[dict]:
    """The colocated graph's answers to ``compared_requests``, before any state changes."""
    return [recommend(colocated_client, **body) for body in compared_requests()]


def test_colocated_graph_serves_and_runs_the_stages_in_one_recommender(colocated_answers):
    assert set(serve.status().applications[APP_NAME].deployments) == {"Recommender", "UserStateStore", "FeedbackLogger"}
    popular = [answer["items"][0]["score"] == pytest.approx(1.0) for answer in colocated_answers]  # popular mode: share of the top count
    assert popular == [False, False, True, False, False, False]
    assert [len(answer["items"]) for answer in colocated_answers] == [body["k"] for body in compared_requests()]


def test_a_local_services_ingress_replicas_run_without_the_load_balancers_drain_window(colocated_service):
    """Ray keeps a stopping ingress replica reachable 30 s for load balancers to deregister it; a service on a local
    instance has none (HAProxy retries elsewhere), so its replicas run with a short window, and a cluster's keep Ray's."""
    ((name, short),) = LOCAL_SERVE_ENV.items()
    ours = psutil.Process().children(recursive=True)  # this test's Ray instance: its raylet is a child of this process
    recommenders = [p for p in ours if "ServeReplica:polyrec:Recommender" in _command_line(p)]
    assert len(recommenders) == colocated_service.config.deployments["Recommender"].min_replicas
    assert [replica.environ().get(name) for replica in recommenders] == [short] * len(recommenders)
    on_a_cluster = colocated_service.config.model_copy(update={"ray": RayConfig(address="ray://head:10001")})
    assert name not in application_config(on_a_cluster, models=["m"], active="m")["runtime_env"]["env_vars"]


def _command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # a short-lived process, gone since
        return ""


def assert_same_answer(ours: dict, theirs: dict) -> None:
    """The same recommendation (but for its request id), up to float error in the scores."""
    assert {**ours, "request_id": None, "items": None} == {**theirs, "request_id": None, "items": None}
    assert [item["item_id"] for item in ours["items"]] == [item["item_id"] for item in theirs["items"]]
    for our_item, their_item in zip(ours["items"], theirs["items"]):
        assert our_item == {
            **their_item,
            "score": pytest.approx(their_item["score"], abs=1e-5),
            "p_like": pytest.approx(their_item["p_like"], abs=1e-5),
            "rating": pytest.approx(their_item["rating"], abs=1e-4),
        }


def test_colocated_graph_answers_concurrent_requests_as_it_answers_each_alone(colocated_answers, colocated_client, colocated_service):
    """Concurrent requests of every path (personal, popular, interests, ignored history) are recommended in shared
    batches; each gets the answer it gets alone."""
    assert_concurrent_answers_are_the_lone_ones(colocated_client, colocated_answers)


def assert_concurrent_answers_are_the_lone_ones(client: httpx.Client, lone_answers: list[dict]) -> None:
    bodies = compared_requests() * 2  # 12: within what a replica admits at once
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: recommend(client, **body), bodies))
    for answer, alone in zip(answers, lone_answers * 2, strict=True):
        assert_same_answer(answer, alone)


def test_colocated_graph_logs_impressions(colocated_client, colocated_service):
    check_impressions_are_logged_with_positions_and_version(colocated_client, colocated_service)


def test_colocated_graph_recommends_a_registered_item_at_once(colocated_client):
    check_a_registered_item_is_recommendable_at_once(colocated_client)


def test_colocated_graph_reads_the_history_feedback_extends(colocated_client):
    check_feedback_extends_the_server_side_history(colocated_client)


def test_colocated_graph_replicas_never_answer_from_a_context_that_acknowledged_feedback_changed(colocated_client, ray_instance):
    """Both Recommender replicas answer the user from the contexts they cached; once feedback is acknowledged,
    neither answers from the context before it: the clicked item, the first before, is seen and never recommended."""
    user = "7"

    def cached_by_replica() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{ray_instance}/metrics", timeout=30).text
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ray_polyrec_user_contexts_total" and sample.labels.get("source") == "cache":
                    counts[sample.labels["replica"]] = counts.get(sample.labels["replica"], 0.0) + sample.value
        return counts

    before = cached_by_replica()
    first = recommend(colocated_client, user_id=user, k=5)["items"][0]["item_id"]
    deadline = time.monotonic() + 60
    # Asked until each replica has answered from its cache: on a busy machine a replica's lease can lapse for a
    # while (it then reads from the store), and the router may send a short burst to one replica.
    while sum(count > before.get(replica, 0.0) for replica, count in cached_by_replica().items()) < 2:
        assert time.monotonic() < deadline, f"not both replicas answered from their caches: {cached_by_replica()}"
        answers = [recommend(colocated_client, user_id=user, k=5) for _ in range(10)]
        assert {answer["items"][0]["item_id"] for answer in answers} == {first}
        time.sleep(0.5)

    response = colocated_client.post("/v1/feedback", headers=AUTH, json={"user_id": user, "item_id": first, "event": "click"})
    assert response.status_code == 200, response.text
    for _ in range(30):
        items = recommend(colocated_client, user_id=user, k=5)["items"]
        assert first not in [item["item_id"] for item in items]


def metric_totals(port: int, wanted: dict[str, dict[str, str]]) -> dict[str, float]:
    """Per name in ``wanted``: the sum of the Prometheus samples of that name whose labels include the given ones."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and wanted[sample.name].items() <= sample.labels.items():
                totals[sample.name] += sample.value
    return totals


def test_colocated_graph_exports_stage_latency_feedback_events_and_requests_to_prometheus(colocated_client, ray_instance):
    wanted = {
        "ray_polyrec_stage_latency_ms_count": {"stage": "rank", "deployment": "Recommender"},
        "ray_polyrec_feedback_events_total": {"event": "skip"},
        "ray_serve_num_http_requests_total": {"route": "/v1/recommend", "application": APP_NAME},
    }
    before = metric_totals(ray_instance, wanted)
    while True:  # until the earlier tests' requests have all been reported
        time.sleep(2.5)
        settled = metric_totals(ray_instance, wanted)
        if settled == before:
            break
        before = settled
    for user in ("1", "2", "3", "4"):
        recommend(colocated_client, user_id=user, k=3)
    skips = [{"user_id": "5", "item_id": item, "event": "skip"} for item in ("1", "2", "3")]
    assert colocated_client.post("/v1/feedback", json={"events": skips}, headers=AUTH).status_code == 200
    expected = {
        "ray_polyrec_stage_latency_ms_count": before["ray_polyrec_stage_latency_ms_count"] + 4,
        "ray_polyrec_feedback_events_total": before["ray_polyrec_feedback_events_total"] + 3,
        "ray_serve_num_http_requests_total": before["ray_serve_num_http_requests_total"] + 4,
    }
    deadline = time.monotonic() + 60
    while (after := metric_totals(ray_instance, wanted)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert after == expected


def test_colocated_graph_hot_swap_under_load_has_no_failed_request_and_rollback_returns(colocated_client, colocated_service, capsys, tmp_path):
    check_hot_swap_under_load_has_no_failed_request_and_rollback_returns(colocated_client, colocated_service, capsys, tmp_path)


# --- recommendations -------------------------------------------------------------------------


def test_recommend_returns_k_unseen_items_explained_by_the_history(client):
    seen = user_items("1")
    unseen_popular = [item for item in most_popular() if item not in seen]
    exclude, extra_history = unseen_popular[:3], unseen_popular[3:4]
    answer = recommend(client, user_id="1", k=10, exclude=exclude, history=extra_history, context={"page": "home"})

    ids = [item["item_id"] for item in answer["items"]]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert not set(ids) & (seen | set(exclude) | set(extra_history))
    assert answer["model_version"] == "random-0"
    assert len(answer["request_id"]) == 32
    assert answer["ignored_history"] == []
    titles = movies().set_index(0)[1]
    for item in answer["items"]:
        assert item["title"] == titles[item["item_id"]]
        assert because_ids(item) <= seen | set(extra_history)
        assert [reason["title"] for reason in item["because"]] == [titles[reason["item_id"]] for reason in item["because"]]
        assert 0 < item["p_like"] < 1
    assert any(item["because"] for item in answer["items"])


def test_unknown_user_without_history_gets_popular_items(client):
    answer = recommend(client, user_id="nobody-1", k=5)
    popular = most_popular()
    ids = [item["item_id"] for item in answer["items"]]
    assert ids[0] == popular[0]  # diversity keeps the most relevant first
    assert set(ids) <= set(popular[:50])
    assert answer["items"][0]["score"] == pytest.approx(1.0)  # popular mode: share of the top count
    assert all(item["because"] == [] for item in answer["items"])


def test_unknown_user_with_interests_gets_the_item_described(client):
    answer = recommend(client, user_id="nobody-2", k=5, interests=item_text("50"))
    assert answer["items"][0]["item_id"] == "50"
    popular_answer = recommend(client, user_id="nobody-2", k=5)
    assert [i["item_id"] for i in answer["items"]] != [i["item_id"] for i in popular_answer["items"]]


def test_unknown_history_items_are_ignored_and_reported(client):
    answer = recommend(client, user_id="nobody-3", k=5, history=["no-such-item", "50", "no-such-item"])
    assert answer["ignored_history"] == ["no-such-item"]
    ids = [item["item_id"] for item in answer["items"]]
    assert "50" not in ids and len(ids) == 5
    assert all(because_ids(item) <= {"50"} for item in answer["items"])
    assert answer["items"][0]["score"] != pytest.approx(1.0)  # personal, not the popular fallback


def test_impressions_are_logged_with_positions_and_version(client, service):
    check_impressions_are_logged_with_positions_and_version(client, service)


def test_split_graph_answers_like_the_colocated_graph(colocated_answers, client):
    for body, colocated in zip(compared_requests(), colocated_answers, strict=True):
        assert_same_answer(recommend(client, **body), colocated)
    assert_concurrent_answers_are_the_lone_ones(client, colocated_answers)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/recommend", {"user_id": "u", "k": 0}, "k"),
        ("/v1/recommend", {"user_id": "u", "k": 1001}, "k"),
        ("/v1/recommend", {"user_id": "u", "k": "many"}, "k"),
        ("/v1/recommend", {"k": 5}, "user_id"),
        ("/v1/recommend", {"user_id": ""}, "user_id"),
        ("/v1/recommend", {"user_id": "u", "history": "50"}, "history"),
        ("/v1/recommend", {"user_id": "u", "history": ["50"] * 501}, "history"),
        ("/v1/recommend", {"user_id": "u", "interests": ""}, "interests"),
        ("/v1/recommend", {"user_id": "u", "colour": "red"}, "colour"),
        ("/v1/feedback", {"user_id": "u", "item_id": "i"}, "event"),
        ("/v1/feedback", {"user_id": "u", "item_id": "i", "event": "teleport"}, "event"),
        ("/v1/feedback", {"user_id": "u", "item_id": "i", "event": "rate", "value": "high"}, "value"),
        ("/v1/feedback", {"events": []}, "events"),
        ("/v1/feedback", {"events": [{"user_id": "u", "item_id": "i", "event": "click", "ts": -5}]}, "ts"),
        ("/v1/items", {"item_id": "x"}, "text"),
    ],
)
def test_bad_fields_are_422_naming_the_field(client, path, body, field):
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert field_named(response, field), response.text


def test_malformed_json_is_422(client):
    response = client.post("/v1/recommend", content=b'{"user_id": "u", "k": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_oversized_bodies_are_413_declared_or_streamed(client, service):
    limit = service.config.max_body_bytes
    assert client.post("/v1/feedback", content=b" " * (limit + 1), headers={**AUTH, "content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"null",
        b'"text"',
        b"1e999",
        b'{"user_id": null}',
        b'{"user_id": "u", "k": 1e30}',
        b'{"user_id": "u", "k": 5.5}',
        b'{"user_id": "\\ud800"}',
        b'{"user_id": {"a": []}}',
        b'{"user_id": "u", "exclude": [null]}',
        b'{"user_id": "u", "context": {"x": [1]}}',
    ],
)
def test_no_input_gets_a_server_error(client, body):
    for path in ("/v1/recommend", "/v1/feedback", "/v1/items"):
        response = client.post(path, content=body, headers={**AUTH, "content-type": "application/json"})
        assert 400 <= response.status_code < 500, (path, body, response.text)


def test_write_endpoints_need_the_api_key(client):
    event = {"user_id": "u", "item_id": "50", "event": "click"}
    assert client.post("/v1/feedback", json=event).status_code == 401
    assert client.post("/v1/feedback", json=event, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/v1/items", json={"item_id": "k", "text": "t"}).status_code == 401
    assert client.get("/v1/model").status_code == 200


# --- items, model, docs ----------------------------------------------------------------------


def test_item_model_health_and_docs_endpoints(client):
    star_wars = client.get("/v1/items/50").json()
    flags = movies().set_index(0).loc["50"].iloc[4:].to_numpy()
    assert star_wars == {"item_id": "50", "title": "Star Wars (1977)", "registered": False, "attributes": [g + 1 for g, flag in enumerate(flags) if flag]}
    assert client.get("/v1/items/no-such-item").status_code == 404
    model = client.get("/v1/model").json()
    assert model["model_version"] == "random-0"
    assert model["data_manifest_hash"] == f"movielens-100k-first-{NUM_USERS}-users"
    assert model["num_items"] == ratings()["item"].nunique()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    assert {"/v1/recommend", "/v1/feedback", "/v1/items", "/v1/items/{item_id}", "/v1/model"} <= set(client.get("/openapi.json").json()["paths"])


def test_a_registered_item_is_recommendable_at_once(client):
    check_a_registered_item_is_recommendable_at_once(client)


def test_feedback_extends_the_server_side_history(client):
    check_feedback_extends_the_server_side_history(client)


# --- model versions --------------------------------------------------------------------------


def test_hot_swap_under_load_has_no_failed_request_and_rollback_returns(client, service, capsys, tmp_path):
    check_hot_swap_under_load_has_no_failed_request_and_rollback_returns(client, service, capsys, tmp_path)


def test_an_id_only_model_put_in_service_refuses_the_text_it_cannot_read_and_serves_the_rest(client, service, tmp_path):
    # Items were registered by their text under the model before; then a model that reads no text is swapped in.
    assert client.get("/v1/items/robot-musical").status_code == 200
    before = VersionHistory(service.config.state_dir).live().model
    swap_model(str(build_random_artifact(tmp_path / "id-only", num_users=NUM_USERS, model_version="id-only", reads_text=False)))
    try:
        assert recommend(client, user_id="1", k=5)["model_version"] == "id-only"
        assert client.get("/v1/model").json()["model_version"] == "id-only"
        refused = client.post("/v1/recommend", json={"user_id": "1", "k": 5, "interests": "robots that sing"})
        assert refused.status_code == 422 and field_named(refused, "interests"), refused.text
        refused = client.post("/v1/items", json={"item_id": "robot-opera", "text": "Robots sing an opera."}, headers=AUTH)
        assert refused.status_code == 422 and field_named(refused, "text"), refused.text
        assert client.get("/v1/items/robot-opera").status_code == 404  # nothing registered
    finally:
        swap_model(before)
    assert recommend(client, user_id="1", k=5, interests="robots that sing")["items"]


# --- the contract, under a schema-driven fuzzer -----------------------------------------------


def test_the_openapi_document_lists_every_status_enum_and_bound(client):
    document = client.get("/openapi.json").json()
    statuses = {path: {method: set(operation["responses"]) for method, operation in operations.items()} for path, operations in document["paths"].items()}
    assert {"400", "401", "413", "422", "503"} <= statuses["/v1/feedback"]["post"]
    assert {"401", "409", "503"} <= statuses["/v1/items"]["post"] and "404" in statuses["/v1/items/{item_id}"]["get"]
    assert document["paths"]["/v1/recommend"]["post"]["responses"]["503"]["headers"]["Retry-After"]
    event = document["components"]["schemas"]["FeedbackEvent"]
    assert event["properties"]["event"]["enum"] == ServeConfig().accepted_events
    rate = event["allOf"][0]
    assert rate["if"]["properties"]["event"] == {"const": "rate"}
    assert rate["then"]["properties"]["value"] | {"type": "number"} == {"type": "number", "minimum": 1.0, "maximum": 5.0}
    assert document["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_a_schema_driven_fuzzer_finds_no_failure(service, tmp_path):
    """schemathesis, every check, against the running service: statuses and bodies as the document says, schema-valid
    requests accepted, invalid ones refused, no 5xx."""
    report = tmp_path / "report"
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{service.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "30",
            "--header",
            f"X-API-Key: {API_KEY}",
            "--workers",
            "2",
            "--seed",
            "1",
            "--report",
            "junit",
            "--report-dir",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # its cache folder goes there
    )
    assert run.returncode == 0, run.stdout[-6000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]


# --- exactly once, and the service's hold on its state -------------------------------------------


def test_a_retried_event_counts_once_in_the_live_state(client):
    store = serve.get_deployment_handle("UserStateStore", app_name=APP_NAME)
    before = dict(store.popular.remote(10_000).result())
    event = {"event_id": "retried-once", "user_id": "retrier", "item_id": "50", "event": "click"}
    for _ in range(3):  # the client did not see the first answer and retried twice
        assert client.post("/v1/feedback", json=event, headers=AUTH).status_code == 200
    assert store.context.remote("retrier").result().history == ["50"]
    assert dict(store.popular.remote(10_000).result())["50"] == before.get("50", 0) + 1


def test_ratings_outside_the_rating_range_are_422_naming_the_value(client):
    for body in (
        {"user_id": "u", "item_id": "50", "event": "rate", "value": 99},
        {"events": [{"user_id": "u", "item_id": "50", "event": "rate", "value": 0.5}]},
        {"user_id": "u", "item_id": "50", "event": "rate"},
    ):
        response = client.post("/v1/feedback", json=body, headers=AUTH)
        assert response.status_code == 422 and field_named(response, "value"), response.text
    assert client.post("/v1/feedback", json={"user_id": "u", "item_id": "50", "event": "rate", "value": 5}, headers=AUTH).status_code == 200


def test_a_killed_user_state_store_comes_back_with_every_history(client):
    """kill -9 of the store's process: Serve starts another, which rebuilds the histories from the training data, the
    feedback log's Parquet parts and the write-ahead log (this module's log is flushed only at shutdown). Feedback
    given while it is away is acknowledged, and is in the history once it is back."""
    store = serve.get_deployment_handle("UserStateStore", app_name=APP_NAME)
    users = ["1", "newcomer", "retrier"]
    before = {user: store.context.remote(user).result() for user in users}
    assert before["newcomer"].history and before["retrier"].history
    unseen = next(item for item, _ in store.popular.remote(10_000).result() if item not in before["newcomer"].seen)
    (replica,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#UserStateStore#" in a["name"]]
    os.kill(ray.get(ray.get_actor(replica, namespace="serve").__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)
    click = {"event_id": "while-the-store-was-away", "user_id": "newcomer", "item_id": unseen, "event": "click"}
    assert client.post("/v1/feedback", json=click, headers=AUTH).status_code == 200
    deadline = time.monotonic() + 180
    while True:
        try:
            after = {user: store.context.remote(user).result(timeout_s=30) for user in users}
            if after["newcomer"].history[-1:] == [unseen]:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "the store did not come back with the click given while it was away"
        time.sleep(1)
    for user in ["1", "retrier"]:
        assert (after[user].history, after[user].seen) == (before[user].history, before[user].seen), user
        np.testing.assert_array_equal(after[user].history_ratings, before[user].history_ratings)
    assert after["newcomer"].history == [*before["newcomer"].history, unseen]
    np.testing.assert_array_equal(after["newcomer"].history_ratings, [*before["newcomer"].history_ratings, np.nan])
    assert recommend(client, user_id="newcomer", k=5)["items"]


# --- durability (last: it kills a replica) ---------------------------------------------------


def test_acknowledged_feedback_survives_a_feedback_logger_crash(client, service):
    event_ids = [f"durable-{i}" for i in range(60)]
    for start in range(0, 60, 10):
        batch = [{"event_id": e, "user_id": "1", "item_id": "50", "event": "view"} for e in event_ids[start : start + 10]]
        response = client.post("/v1/feedback", headers=AUTH, json={"events": batch})
        assert response.status_code == 200 and response.json()["event_ids"] == event_ids[start : start + 10]
    log_path = service.config.feedback.path
    assert not set(event_ids) & set(read_feedback_log(log_path)["event_id"].to_pylist())  # only in the WAL so far

    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#FeedbackLogger#" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)

    deadline = time.monotonic() + 180  # Serve notices the death and starts a replica, which replays the WAL
    while time.monotonic() < deadline and not set(event_ids) <= set(read_feedback_log(log_path)["event_id"].to_pylist()):
        time.sleep(1)
    assert set(event_ids) <= set(read_feedback_log(log_path)["event_id"].to_pylist())
    deadline = time.monotonic() + 60
    while client.post("/v1/feedback", headers=AUTH, json={"user_id": "1", "item_id": "50", "event": "view"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)


# --- pieces without Ray ----------------------------------------------------------------------


def test_ranker_score_mixes_the_task_outputs_with_the_rating_on_the_raw_scale(tmp_path):
    path = build_random_artifact(tmp_path / "model", num_users=NUM_USERS, rating={"kind": "minmax", "shift": 1.0, "scale": 4.0})
    model = ServingModel(str(path))
    history_ids = ["50", "181", "1", "50"]
    history = [model.item_index[item] for item in history_ids]
    raw_ratings = [5.0, float("nan"), 2.0, 3.0]
    ratings = torch.tensor([[(4.0 / 4), float("nan"), (1.0 / 4), (2.0 / 4)]])  # (raw - 1) / 4; none stays none
    request = RetrievalRequest(
        model=str(path),
        user_id="3",
        history=history_ids,
        history_ratings=raw_ratings,
        interests=None,
        num_candidates=20,
        registry_version=0,
        exclude=["50", "181", "1"],
    )
    candidates = model.retrieve([request], history_length=50, interests_weight=0.5)[0]
    assert len(candidates.item_ids) == 20 and not {"50", "181", "1"} & set(candidates.item_ids)
    ranked = model.rank([candidates], {"retrieval": 1.0, "like": 2.0, "rating": 0.5})[0]

    user_idx = model.user_index["3"]
    with torch.no_grad():
        direct = model.model.score_candidates(
            torch.tensor([history]), torch.tensor([user_idx]), torch.from_numpy(candidates.item_idx)[None], input_ratings=ratings
        )
        attention = model.model.attention_contributions(torch.tensor([history]), torch.tensor([user_idx]), ratings)[0].numpy()
        unrated = model.model.score_candidates(torch.tensor([history]), torch.tensor([user_idx]), torch.from_numpy(candidates.item_idx)[None])
    assert not np.allclose(unrated["rating"].numpy(), direct["rating"].numpy(), atol=1e-3)  # the ratings are read
    assert candidates.retrieval == pytest.approx(direct["retrieval"][0].numpy(), abs=1e-4)
    assert ranked.p_like == pytest.approx(direct["like"][0].numpy(), abs=1e-5)
    assert ranked.rating == pytest.approx(direct["rating"][0].numpy() * 4.0 + 1.0, abs=1e-4)
    assert ranked.score == pytest.approx(candidates.retrieval + 2.0 * ranked.p_like + 0.5 * ranked.rating, abs=1e-4)

    # because: per candidate, attention × similarity summed per distinct history item, largest first.
    assert ranked.history_ids == history_ids and ranked.contributions == pytest.approx(attention)
    shares = attention[None, :] * (ranked.keys @ model.keys[history].T)
    per_item = {"50": shares[:, 0] + shares[:, 3], "181": shares[:, 1], "1": shares[:, 2]}
    expected = [[item for item in sorted(per_item, key=lambda item: -per_item[item][c])[:2] if per_item[item][c] > 0] for c in range(len(candidates.item_ids))]
    assert explain(ranked, list(range(len(candidates.item_ids))), 2) == expected
    assert any(expected)


def test_the_store_remembers_the_last_event_ids_it_was_told_to_and_a_retry_of_one_counts_once(tmp_path):
    state = ServerState(StateConfig(remembered_event_ids=2), tmp_path / "items.jsonl")
    assert [state.record("1", item, ts, event_id=f"e{ts}") for ts, item in enumerate(["7", "8", "9"])] == [True] * 3
    assert state.record("1", "9", 2, event_id="e2") is False and state.record("1", "8", 1, event_id="e1") is False  # retries
    assert list(state.applied_events) == ["e1", "e2"]  # e0 forgotten, the others the most recent
    assert state.record("1", "7", 0, event_id="e0") is True  # too old to be recognised: counted again
    assert list(state.applied_events) == ["e2", "e0"]
    assert state.popular(3) == [("7", 2), ("8", 1), ("9", 1)] and state.context("1").history == ["7", "7", "8", "9"]


def test_the_popular_items_stay_in_order_as_events_come_in(tmp_path):
    state = ServerState(StateConfig(), tmp_path / "items.jsonl")
    generator = np.random.default_rng(0)
    counts: Counter[str] = Counter()
    for step, item in enumerate(generator.zipf(1.3, size=3000) % 200):  # many ties, and new items throughout
        state.record(f"u{step % 7}", str(item), ts=step)
        counts[str(item)] += 1
        if step % 250 == 0 or step == 2999:  # the first read orders what was counted; later reads follow each count
            expected = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))
            assert state.popular(20) == expected[:20] and state.popular(10_000) == expected


class _Registry:
    """The UserStateStore's ``registered_since`` as a handle offers it (``.remote`` to await); ``answers=False``: a
    store that never answers, as one restarting."""

    def __init__(self, items: list[RegisteredItem], answers: bool = True):
        self.items, self.answers = items, answers
        self.registered_since = SimpleNamespace(remote=self._registered_since)

    async def _registered_since(self, version: int) -> list[RegisteredItem]:
        if not self.answers:
            await asyncio.Event().wait()
        return self.items[version:]


def test_a_version_is_given_the_registered_items_before_it_is_put_in_service_without_stopping_the_loop(tmp_path):
    path = str(build_random_artifact(tmp_path / "model", num_users=NUM_USERS))
    items = [RegisteredItem(1, "robot-opera", "Robot Opera", "Robots sing an opera.", 1), RegisteredItem(2, "50", "Star Wars", "A catalogue id.", 2)]
    config = ServeConfig(torch_threads=torch.get_num_threads())
    stage = RetrievalStage(config, _Registry(items))
    request = RetrievalRequest(model=path, user_id="3", history=["50"], history_ratings=[5.0], interests="robots", num_candidates=5, registry_version=0)

    async def swap_in() -> list:
        model = await stage._loaded(path)
        encode, started, release = model.encode_registered, threading.Event(), threading.Event()

        def slow_encode(batch):
            started.set()
            release.wait(30)
            return encode(batch)

        model.encode_registered = slow_encode
        reconfigure = asyncio.create_task(stage.reconfigure({"models": [path]}))
        await asyncio.to_thread(started.wait, 30)
        during = await stage.retrieve_batch([request])  # the event loop serves while the items are encoded
        assert model.registry_version == 0 and not reconfigure.done()
        release.set()
        await reconfigure
        return during

    [during] = asyncio.run(swap_in())
    assert "robot-opera" not in during.item_ids
    model = stage.models.loaded(path)
    assert model.registry_version == 2 and model.knows("robot-opera")
    assert model.describe_item("50")["registered"] is False  # a catalogue id keeps its catalogue entry
    expected = model.encode_texts(["Robots sing an opera."])[0].numpy()
    assert model.registered_vectors[0] == pytest.approx(expected, abs=1e-5)
    [found] = model.retrieve([replace(request, interests="Robots sing an opera.", history=[], history_ratings=[])], 50, 1.0)
    assert found.item_ids[0] == "robot-opera"  # the query is the item's own text: its vector is the nearest key

    # Items read twice (two requests syncing at once) are added once; a gap is an error, not a silent hole.
    model.add_registered(items, model.encode_registered(items))
    model.add_registered([], model.encode_registered([]))
    assert model.registered_ids == ["robot-opera", "50"]
    with pytest.raises(RuntimeError, match="skipped"):
        model.add_registered([RegisteredItem(4, "late", "", "text", 4)], model.encode_registered([items[0]]))

    # A store that does not answer does not hold up the swap: the version's first requests take the items.
    impatient = config.model_copy(update={"admission": config.admission.model_copy(update={"call_timeout_s": 0.2})})
    waiting = RetrievalStage(impatient, _Registry(items, answers=False))
    asyncio.run(waiting.reconfigure({"models": [path]}))
    assert waiting.models.loaded(path).registry_version == 0


def test_state_is_rebuilt_from_training_data_feedback_and_registered_items(tmp_path):
    data = build_training_data(tmp_path / "data", num_users=NUM_USERS)
    log = FeedbackLog(str(tmp_path / "feedback"), tmp_path / "wal", writer="w")
    clicks = [{"event_id": f"c{i}", "ts": 2_000_000_000_000 + i, "user_id": "1", "item_id": item, "event": "click"} for i, item in enumerate(["7", "8"])]
    rated = {"event_id": "r1", "ts": 2_000_000_000_003, "user_id": "1", "item_id": "8", "event": "rate", "value": 2.0}
    log.append(clicks + [rated] + impression_rows(request_id="r", user_id="1", items=[("9", 1.0)], model_version="v", ts=1))
    log.flush()
    log.append([{**clicks[0], "event_id": "c2", "ts": 2_000_000_000_005}])  # still in the WAL

    settings = StateConfig(history_length=5)
    state = ServerState.rebuild(settings, tmp_path / "state", training_data=data, feedback_log=str(tmp_path / "feedback"), wal_dir=tmp_path / "wal")
    frame = ratings()
    # Sequences list equal timestamps in item-number order; the state must keep that order.
    frame = frame.assign(number=frame["item"].astype(int)).sort_values(["ts", "number"], kind="stable")
    training = frame[frame["user"] == "1"]["item"].tolist()
    assert state.context("1").history == (training + ["7", "8", "8", "7"])[-5:]
    # Each item's raw rating: the training data's, a rate event's value, none for a click.
    expected_ratings = frame[frame["user"] == "1"]["rating"].astype(float).tolist()[-1:] + [np.nan, np.nan, 2.0, np.nan]
    np.testing.assert_array_equal(state.context("1").history_ratings, expected_ratings)
    assert set(state.context("1").seen) == set(training) | {"7", "8"}
    counts = Counter(frame["item"]) + Counter({"7": 2, "8": 2})
    assert state.popular(3) == sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:3]

    state.register("new-1", "New", "some text", ts=1)
    again = ServerState.rebuild(settings, tmp_path / "state", training_data=None, feedback_log=str(tmp_path / "feedback"), wal_dir=tmp_path / "wal")
    assert [(item.seq, item.item_id, item.text) for item in again.registered_since(0)] == [(1, "new-1", "some text")]
    assert again.context("1").registry_version == 1
    with pytest.raises(ItemExists):
        again.register("new-1", "", "other", ts=2)


class Doubler:
    """A replica's batched method that records its batches and runs each until ``release`` is set."""

    def __init__(self, max_batch_size: int, busy_batch_wait_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        set_batching(self.double, BatchingConfig(max_batch_size=max_batch_size, busy_batch_wait_s=busy_batch_wait_s))

    @batched
    async def double(self, numbers: list[int]) -> list[int]:
        self.batches.append(numbers)
        await self.release.wait()
        if -1 in numbers:
            raise ValueError("no negatives")
        return [2 * n for n in numbers]


def test_a_batch_is_what_arrived_while_the_previous_batch_ran():
    async def scenario() -> None:
        replica = Doubler(max_batch_size=3)
        replica.release.set()
        assert await replica.double(5) == 10  # alone: a batch of one, at once
        replica.release.clear()
        first = asyncio.create_task(replica.double(1))
        await asyncio.sleep(0)  # the first batch starts and waits for release
        waiting = [asyncio.create_task(replica.double(n)) for n in (2, 3, 4, 5, 6)]
        await asyncio.sleep(0)  # they are queued
        given_up = waiting.pop(1)
        given_up.cancel()  # a caller that gave up is left out of its batch
        replica.release.set()
        assert await asyncio.gather(first, *waiting) == [2, 4, 8, 10, 12]
        assert replica.batches == [[5], [1], [2, 4, 5], [6]]

        failing = [asyncio.create_task(replica.double(n)) for n in (7, -1)]
        for call in failing:
            with pytest.raises(ValueError, match="no negatives"):  # the batch's error is each of its callers'
                await call
        assert replica.batches[-1] == [7, -1]
        assert await replica.double(8) == 16  # and the queue goes on

    asyncio.run(scenario())


@pytest.mark.parametrize("busy_batch_wait_s", [0.0, 60.0])
def test_after_a_batch_with_company_the_next_waits_for_the_calls_on_their_way(busy_batch_wait_s):
    async def scenario() -> list[list[int]]:
        replica = Doubler(max_batch_size=3, busy_batch_wait_s=busy_batch_wait_s)
        replica.release.set()
        assert await replica.double(1) == 2  # alone: a batch of one at once, whatever the busy wait
        assert await asyncio.gather(replica.double(2), replica.double(3)) == [4, 6]  # a batch with company
        first = asyncio.create_task(replica.double(4))
        for _ in range(3):
            await asyncio.sleep(0)  # its batch forms: at once without the busy wait, else it waits for company
        assert await asyncio.gather(first, replica.double(5), replica.double(6)) == [8, 10, 12]
        return replica.batches

    # With the wait, the calls that came after the first fill its batch (full at 3: no 60 s pass).
    expected = [[1], [2, 3], [4, 5, 6]] if busy_batch_wait_s else [[1], [2, 3], [4], [5, 6]]
    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == expected


def test_mmr_trades_relevance_for_novelty_as_computed_by_hand():
    # a and b are identical, c is orthogonal; relevance 1, 0.9, 0.5 → min-max 1, 0.8, 0.
    keys = pd.DataFrame([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).to_numpy("float32")
    scores = pd.Series([3.0, 2.8, 2.0]).to_numpy("float32")
    # λ = 0.5: after a, b scores 0.5·0.8 − 0.5·1 = −0.1 and c scores 0.5·0 − 0.5·0 = 0 → c.
    assert [pick.tolist() for pick in maximal_marginal_relevance([scores], [keys], [3], 0.5)] == [[0, 2, 1]]
    # λ = 0.9: b scores 0.72 − 0.1 = 0.62 > c's 0 → b.
    assert [pick.tolist() for pick in maximal_marginal_relevance([scores], [keys], [2], 0.9)] == [[0, 1]]


def test_mmr_over_a_batch_picks_for_each_request_what_it_picks_alone():
    rng = np.random.default_rng(0)
    scores = [np.sort(rng.normal(size=count)).astype("float32")[::-1] for count in (30, 0, 7, 12)]
    keys = [rng.normal(size=(len(s), 4)).astype("float32") for s in scores]
    keys = [key / np.linalg.norm(key, axis=1, keepdims=True) for key in keys]
    ks = [10, 10, 10, 3]
    together = maximal_marginal_relevance(scores, keys, ks, 0.7)
    alone = [maximal_marginal_relevance([s], [key], [k], 0.7)[0] for s, key, k in zip(scores, keys, ks)]
    assert [pick.tolist() for pick in together] == [pick.tolist() for pick in alone]
    assert [len(pick) for pick in together] == [10, 0, 7, 3]
    assert all(len(set(pick.tolist())) == len(pick) for pick in together)
    assert together[0][0] == 0  # the most relevant first, with nothing to be redundant with


def test_genre_cap_passes_over_and_then_fills():
    groups = [[1], [1, 2], [1], [2], [3]]
    assert genre_capped([0, 1, 2, 3, 4], groups, 4, cap=2) == [0, 1, 3, 4]
    assert genre_capped([0, 1, 2, 3, 4], groups, 5, cap=1) == [0, 3, 4, 1, 2]


def test_rerank_drops_seen_excluded_blocked_and_duplicate_items():
    ranked = Ranked(
        model_version="v",
        mode="personal",
        item_ids=["a", "b", "c", "d", "b"],
        titles=[""] * 5,
        years=[None] * 5,
        genres=[[]] * 5,
        score=pd.Series([5.0, 4.0, 3.0, 2.0, 9.0]).to_numpy("float32"),
        p_like=None,
        rating=None,
        keys=pd.DataFrame([[1.0, 0.0]] * 5).to_numpy("float32"),
        groups=[[]] * 5,
        history_ids=[],
        history_titles=[],
        history_keys=np.zeros((0, 2), "float32"),
        contributions=np.zeros(0, "float32"),
    )
    [chosen] = rerank_batch([ranked], [10], [["a"]], ReRankConfig(diversity="none", blocked_items=["c"]))
    assert [ranked.item_ids[i] for i in chosen] == ["b", "d"]


def test_model_paths_cannot_leave_model_root(tmp_path):
    cache = ModelCache(capacity=1, model_root=str(tmp_path / "models"))
    assert cache.checked_path(str(tmp_path / "models" / "v1")) == str((tmp_path / "models" / "v1").resolve())
    for outside in (tmp_path / "elsewhere", tmp_path / "models" / ".." / "elsewhere"):
        with pytest.raises(InputError, match="outside model_root"):
            cache.checked_path(str(outside))


def test_a_deployment_named_in_the_config_keeps_the_defaults_of_the_settings_it_leaves_out():
    config = ServeConfig.model_validate({"deployments": {"Recommender": {"min_replicas": 2}}})
    default = ServeConfig().deployments["Recommender"]
    assert config.deployments["Recommender"] == default.model_copy(update={"min_replicas": 2})
    assert default.max_replicas >= 2 and default.num_cpus != DeploymentOptions().num_cpus  # what a partial override must keep
    assert config.deployments["Ingress"] == ServeConfig().deployments["Ingress"]


def test_config_rejects_a_scaled_out_state_store():
    with pytest.raises(InputError, match="UserStateStore.max_replicas"):
        ServeConfig.from_yaml(None, deployments={"UserStateStore": {"max_replicas": 2}})


def test_serve_config_file_is_the_defaults_with_the_split_graph_and_builds():
    document = yaml.safe_load(SERVE_CONFIG_FILE.read_text())
    ServeDeploySchema.model_validate(document)
    application = document["applications"][0]
    assert application["args"]["graph"] == "split" and ServeConfig().graph == "colocated"
    assert document == serve_config_document(ServeConfig(graph="split"), application["args"])
    assert [d["name"] for d in application["deployments"]] == ["Ingress", "UserStateStore", "Retriever", "Ranker", "ReRanker", "FeedbackLogger"]


def test_colocated_serve_config_lists_the_recommender_with_both_user_config_keys():
    config = ServeConfig(graph="colocated")
    document = serve_config_document(config, {"graph": "colocated"})
    ServeDeploySchema.model_validate(document)
    deployments = {d["name"]: d for d in document["applications"][0]["deployments"]}
    assert list(deployments) == ["Recommender", "UserStateStore", "FeedbackLogger"]
    assert deployments["Recommender"]["ray_actor_options"] == {"num_cpus": 1.0}  # the core its model work uses
    assert sum(d["ray_actor_options"]["num_cpus"] for d in deployments.values()) == pytest.approx(1.2)
    assert {d["graceful_shutdown_wait_loop_s"] for d in deployments.values()} == {STOP_POLL_S}  # not Serve's 2 s before an idle replica stops
    swap = application_config(config, models=["old", "new"], active="new")["deployments"]
    assert swap == [{"name": "Recommender", "user_config": {"models": ["old", "new"], "model": "new"}}]
    assert application_config(ServeConfig(graph="split"), models=["old", "new"], active="old")["deployments"] == [
        {"name": "Retriever", "user_config": {"models": ["old", "new"]}},
        {"name": "Ranker", "user_config": {"models": ["old", "new"]}},
        {"name": "Ingress", "user_config": {"model": "old"}},
    ]


def test_version_history_knows_the_live_version_and_rolls_back_to_the_one_that_served_before(tmp_path):
    def artifact(version: str) -> str:
        folder = tmp_path / version
        folder.mkdir()
        metadata = {"format_version": 1, "model_version": version, "model_config": {}, "num_users": 1, "num_items": 1, "num_attributes": 0, "rating_mean": 0.0}
        (folder / "artifact.json").write_text(json.dumps(metadata))
        return str(folder)

    history = VersionHistory(tmp_path / "state")
    v1, v2, v3, v4 = (artifact(f"v{i}") for i in range(1, 5))
    history.record_live(v1)
    history.record_live(v1)  # already live: nothing changes
    history.record_live(v2, gate={"promoted": True})
    history.record_rejected(v3, gate={"promoted": False})
    assert [(r.model_version, r.status) for r in history.records()] == [("v1", "retired"), ("v2", "live"), ("v3", "rejected")]
    assert history.live().gate == {"promoted": True}
    assert history.rollback_target().model == v1  # the rejected candidate never served
    history.record_rollback(history.rollback_target())
    assert history.live().model == v1
    with pytest.raises(InputError, match="no earlier model version"):
        history.rollback_target()
    history.record_live(v4)  # v4 went live while v1 served: a rollback returns to v1, not to the rolled-back v2
    assert history.rollback_target().model == v1
    assert [r.status for r in history.records()] == ["retired", "rolled_back", "rejected", "live"]


def test_the_live_state_is_the_state_rebuilt_from_its_log(tmp_path):
    """Events applied as they arrive (some reported late, some retried with the same id, histories longer than
    remembered) leave the store as a restart rebuilding it from the logged events does."""
    generator = np.random.default_rng(3)
    settings = StateConfig(history_length=4, max_seen_items=6)
    live = ServerState(settings, tmp_path / "live" / "items.jsonl")
    log = FeedbackLog(str(tmp_path / "feedback"), tmp_path / "wal", writer="w")
    sent = []
    for i in range(300):
        retry = sent and generator.random() < 0.15
        event = (
            dict(sent[int(generator.integers(len(sent)))])
            if retry
            else {
                "event_id": f"e{i}",
                "user_id": f"u{generator.integers(4)}",
                "item_id": str(generator.integers(30)),
                "event": "rate" if generator.random() < 0.5 else "click",
                "ts": 1_000_000 + i * 10 - int(generator.integers(0, 200)) * (generator.random() < 0.3),  # some late
            }
        )
        event["value"] = float(generator.integers(1, 6)) if event["event"] == "rate" else None
        sent.append(event)
        log.append([event])  # durable first, then applied, as the ingress does
        live.record(event["user_id"], event["item_id"], event["ts"], event["value"] if event["event"] == "rate" else None, event["event_id"])
    rebuilt = ServerState.rebuild(settings, tmp_path / "rebuilt", training_data=None, feedback_log=str(tmp_path / "feedback"), wal_dir=tmp_path / "wal")
    for user in (f"u{n}" for n in range(4)):
        ours, theirs = live.context(user), rebuilt.context(user)
        assert (ours.history, ours.seen) == (theirs.history, theirs.seen), user
        np.testing.assert_array_equal(ours.history_ratings, theirs.history_ratings)
    assert live.popular(100) == rebuilt.popular(100)
    assert sum(count for _, count in live.popular(100)) == len({event["event_id"] for event in sent})
