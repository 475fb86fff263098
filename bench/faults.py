"""Faults: kill -9 of each replica of the service under load, on a trained artifact with its users' histories.

For each graph, the service runs while recommendation clients and feedback writers (each event with its own id,
retried with the same id on a 503, as the API asks) keep it busy; one replica of each deployment in turn is killed
with SIGKILL. Per kill: the requests that failed until the deployment had a new replica and answered again, and the
seconds that took. At the end: events acknowledged against events in the log (none may be missing), and whether the
store's histories hold every acknowledged event (a restarted UserStateStore rebuilds them). Writes a "Faults"
section into bench/RESULTS.md.

    .venv/bin/python bench/faults.py [--model runs/default/model/artifact] [--graphs colocated split]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, publish  # noqa: E402
from data import schema  # noqa: E402
from data.feedback_log import read_feedback_log  # noqa: E402
from serve.config import GRAPH_DEPLOYMENTS, FeedbackLogConfig, ServeConfig  # noqa: E402
from serve.runner import APP_NAME, RunningApplication, call_deployment, run_service, use_throughput_env  # noqa: E402
from train.artifact import read_metadata  # noqa: E402

SECTION = "## Faults (bench/faults.py)"
WRITERS = 8
READERS = 4
LOAD_BEFORE_KILL_S = 5.0
HEAL_LIMIT_S = 180.0


@dataclass
class Load:
    """Clients that run until stopped, recording every answer with its time."""

    url: str
    users: list[str]
    items: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    readers: int = READERS
    writers: int = WRITERS
    timeout_s: float = 10.0
    answers: list[tuple[float, str, int, float]] = field(default_factory=list)  # (time answered, route, status, seconds taken)
    acknowledged: dict[str, tuple[str, str]] = field(default_factory=dict)  # event_id -> (user, item)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._read, args=(i,)) for i in range(self.readers)]
        self.threads += [threading.Thread(target=self._write, args=(i,)) for i in range(self.writers)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _read(self, number: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            for step in range(10**9):
                if self.stop.is_set():
                    return
                user = self.users[(number * 7919 + step) % len(self.users)]
                self._ask(client, "recommend", "/v1/recommend", {"user_id": user, "k": 10})

    def _write(self, number: int) -> None:
        user = f"fault-writer-{number}"
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            for step in range(10**9):
                if self.stop.is_set():
                    return
                event = {"event_id": f"{user}-{step}", "user_id": user, "item_id": self.items[step % len(self.items)], "event": "click"}
                while not self.stop.is_set():  # a 503 is retried with the same id, as the API asks
                    status = self._ask(client, "feedback", "/v1/feedback", event)
                    if status == 200:
                        self.acknowledged[event["event_id"]] = (user, event["item_id"])
                        break
                    time.sleep(0.2)

    def _ask(self, client: httpx.Client, route: str, path: str, body: dict) -> int:
        started = time.monotonic()
        try:
            status = client.post(path, json=body).status_code
        except httpx.HTTPError:
            status = 0  # no answer: a timeout or a dropped connection
        answered = time.monotonic()
        self.answers.append((answered, route, status, answered - started))
        return status


@contextlib.contextmanager
def local_serve(prefix: str) -> Iterator[str]:
    """A local Ray instance on this machine's 2 cores with the settings `polyrec serve` uses, and a scratch folder;
    both gone after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        use_throughput_env()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            yield scratch
        finally:
            serve.shutdown()
            ray.shutdown()


def replica_names(deployment: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f":{APP_NAME}#{deployment}#" in a["name"]}


def kill_one(deployment: str) -> tuple[float, set[str]]:
    """SIGKILL one replica process of ``deployment``; the time of the kill and the replicas before it."""
    before = replica_names(deployment)
    victim = sorted(before)[0]
    pid = ray.get(ray.get_actor(victim, namespace="serve").__ray_call__.remote(lambda _: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    return time.monotonic(), before


def healed_after(load: Load, deployment: str, killed_at: float, before: set[str]) -> float:
    """Seconds until a new replica runs and both routes answered 200 after it did."""
    while time.monotonic() - killed_at < HEAL_LIMIT_S:
        replaced = replica_names(deployment) - before
        status = serve.status().applications[APP_NAME].deployments[deployment].status
        if replaced and status == "HEALTHY":
            ready = time.monotonic()
            while time.monotonic() - ready < 30:
                recent = {route for at, route, code, _ in list(load.answers) if at > ready and code == 200}
                if recent >= {"recommend", "feedback"}:
                    return time.monotonic() - killed_at
                time.sleep(0.1)
        time.sleep(0.1)
    return float("inf")


def run_graph(graph: str, model: str, users: list[str], items: list[str], scratch: str) -> tuple[list[list[str]], list[str]]:
    config = ServeConfig(
        graph=graph, model=model, state_dir=f"{scratch}/{graph}/state", port=8124, feedback=FeedbackLogConfig(path=f"{scratch}/{graph}/feedback")
    )
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    service = run_service(config, blocking=False)
    load = Load(service.url, users, items)
    load.start()
    rows = []
    try:
        for deployment in GRAPH_DEPLOYMENTS[graph]:
            time.sleep(LOAD_BEFORE_KILL_S)
            killed_at, before = kill_one(deployment)
            heal_s = healed_after(load, deployment, killed_at, before)
            window = [(route, code) for at, route, code, _ in list(load.answers) if killed_at <= at <= killed_at + heal_s]
            failed = Counter(route for route, code in window if code != 200)
            statuses = Counter(code for _, code in window if code != 200)
            answered = Counter(route for route, _ in window)
            rows.append(
                [
                    graph,
                    deployment,
                    f"{heal_s:.1f}",
                    f"{failed['recommend']} / {answered['recommend']}",
                    f"{failed['feedback']} / {answered['feedback']}",
                    ", ".join(f"{code or 'none'}: {n}" for code, n in sorted(statuses.items())) or "–",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        time.sleep(LOAD_BEFORE_KILL_S)
    finally:
        load.finish()
    RunningApplication.find().flush_feedback()
    logged = set(read_feedback_log(service.config.feedback.path)["event_id"].to_pylist())
    missing_from_log = sorted(set(load.acknowledged) - logged)
    clicked: dict[str, set[str]] = {}
    for user, item in load.acknowledged.values():
        clicked.setdefault(user, set()).add(item)
    missing_from_store = sum(len(items_ - set(call_deployment("UserStateStore", "context", user).seen)) for user, items_ in clicked.items())
    totals = [
        graph,
        f"{len(load.acknowledged):,}",
        f"{len(logged & set(load.acknowledged)):,}",
        str(len(missing_from_log)),
        f"{missing_from_store} of {sum(len(items_) for items_ in clicked.values()):,}",
    ]
    return rows, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/model/artifact", help="a `polyrec train` artifact (default: the main job's)")
    parser.add_argument("--graphs", nargs="+", default=["colocated", "split"], choices=list(GRAPH_DEPLOYMENTS))
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()

    model = str(Path(args.model).resolve())
    metadata = read_metadata(model)
    data = Path(metadata["training_data"])
    users = pq.read_table(data / schema.USER_VOCAB_PATH, columns=["user_id"])["user_id"].to_pylist()
    items = pq.read_table(data / schema.ITEM_VOCAB_PATH, columns=["item_id"])["item_id"].to_pylist()
    users = [str(user) for user in np.random.default_rng(0).permutation(users)]
    kills, totals = [], []
    with local_serve("faults-") as scratch:
        for graph in args.graphs:
            rows, summary = run_graph(graph, model, users, items, scratch)
            kills += rows
            totals.append(summary)
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray', 'torch', 'httpx')}. Run {date.today().isoformat()}, command "
            f"`.venv/bin/python bench/faults.py --model {args.model} --graphs {' '.join(args.graphs)}`.",
            f"Model `{metadata['model_version']}` with its users' histories. Load: {READERS} clients asking for recommendations "
            f"(known users, k = 10) and {WRITERS} feedback writers (one click a request, each with its own event id, a 503 retried "
            f"with the same id), all with a 10 s timeout; after {LOAD_BEFORE_KILL_S:g} s of load one replica of each deployment in "
            "turn is killed with SIGKILL. Failed requests count answers other than 200 from the kill until the deployment had a new "
            "replica and both routes answered 200 again (the seconds to heal); 0 in the status column is a request that got no answer.",
            "",
            "| graph | killed | seconds to heal | failed recommend / answered | failed feedback / answered | statuses of the failures |",
            "|---|---|---:|---:|---:|---|",
            *[f"| {' | '.join(row)} |" for row in kills],
            "",
            "| graph | events acknowledged | of them in the log | acknowledged but missing from the log "
            "| (writer, item) clicks missing from the store's histories |",
            "|---|---:|---:|---:|---:|",
            *[f"| {' | '.join(row)} |" for row in totals],
        ]
    )
    publish(SECTION, section, write=not args.no_write)


if __name__ == "__main__":
    main()
