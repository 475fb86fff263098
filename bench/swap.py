"""Hot swap under load with items registered at run time: the requests answered around the swap.

A swap puts a new model version in service without a restart (``serve.runner.swap_model``, as `polyrec retrain`
and `polyrec serve --model` do). Every item registered at run time (``POST /v1/items``) must be placed in the new
version's index by encoding its text with the new model. For each graph: the service runs a `polyrec train` artifact
with its users' histories, ``--registered`` items are registered, clients keep asking for recommendations, and the
artifact is swapped for ``--to``. Reported: how long the swap took, and the requests that started during the swap
and in the ten seconds after it: answered, failed (any status but 200), and their latency. Writes a "Hot swap with
registered items" section into bench/RESULTS.md.

    .venv/bin/python bench/swap.py --model runs/default/model/artifact --to runs/default/retrain/<run>/model/artifact
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.faults import Load, local_serve  # noqa: E402
from bench.report import machine, publish  # noqa: E402
from data import schema  # noqa: E402
from serve.config import GRAPH_DEPLOYMENTS, FeedbackLogConfig, ServeConfig  # noqa: E402
from serve.runner import APP_NAME, run_service, swap_model  # noqa: E402
from train.artifact import read_metadata  # noqa: E402

SECTION = "## Hot swap with registered items (bench/swap.py)"
#: The deployments of each graph that hold the model versions (and so load one and encode the registered items).
MODEL_DEPLOYMENTS = {"colocated": ["Recommender"], "split": ["Retriever", "Ranker"]}
READERS = 4
LOAD_BEFORE_SWAP_S = 5.0
AFTER_SWAP_S = 10.0
API_KEY = "bench-swap-key"
GENRES = ["comedy", "drama", "thriller", "documentary", "animation", "romance", "science fiction", "western"]


def register(url: str, count: int) -> None:
    """``count`` items known by their text alone, as a catalogue adds them (four clients at once)."""

    def add(numbers: range) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": API_KEY}) as client:
            for n in numbers:
                genre = GENRES[n % len(GENRES)]
                body = {"item_id": f"new-{n}", "title": f"New film {n}", "text": f"New film {n}, a {genre} released this week, episode {n}."}
                answer = client.post("/v1/items", json=body)
                answer.raise_for_status()

    threads = [threading.Thread(target=add, args=(range(i, count, 4),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def summary(load: Load, start: float, end: float) -> list[str]:
    """The requests that started in [start, end): how many, the failed ones by status, their latency."""
    window = [(seconds, status) for answered, _, status, seconds in list(load.answers) if start <= answered - seconds < end]
    failed = Counter(status for _, status in window if status != 200)
    latency_ms = np.array([seconds * 1000 for seconds, _ in window]) if window else np.zeros(1)
    return [
        f"{len(window):,}",
        ", ".join(f"{code or 'none'}: {n}" for code, n in sorted(failed.items())) or "0",
        f"{np.percentile(latency_ms, 50):.0f}",
        f"{np.percentile(latency_ms, 99):.0f}",
        f"{latency_ms.max():.0f}",
    ]


def run_graph(graph: str, model: str, target: str, registered: int, replicas: int, users: list[str], scratch: str) -> list[list[str]]:
    # A fixed number of replicas of each deployment that holds the model, sharing the CPUs one replica has by default.
    defaults = ServeConfig().deployments
    deployments = {
        name: {"min_replicas": replicas, "max_replicas": replicas, "num_cpus": defaults[name].num_cpus / replicas} for name in MODEL_DEPLOYMENTS[graph]
    }
    config = ServeConfig.model_validate(
        {
            "graph": graph,
            "model": model,
            "state_dir": f"{scratch}/{graph}/state",
            "port": 8125,
            "feedback": FeedbackLogConfig(path=f"{scratch}/{graph}/feedback"),
            "deployments": deployments,
        }
    )
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    service = run_service(config, blocking=False)
    started = time.monotonic()
    register(service.url, registered)
    print(f"{graph}: {registered} items registered in {time.monotonic() - started:.0f} s", flush=True)
    load = Load(service.url, users, [], readers=READERS, writers=0, timeout_s=30)
    load.start()
    try:
        time.sleep(LOAD_BEFORE_SWAP_S)
        swap_started = time.monotonic()
        swap_model(target)
        swapped = time.monotonic()
        time.sleep(AFTER_SWAP_S)
    finally:
        load.finish()
    rows = [
        [graph, str(replicas), f"{swapped - swap_started:.1f}", "during the swap", *summary(load, swap_started, swapped)],
        [graph, str(replicas), "", f"the {AFTER_SWAP_S:g} s after it", *summary(load, swapped, swapped + AFTER_SWAP_S)],
    ]
    for row in rows:
        print(" | ".join(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/model/artifact", help="the `polyrec train` artifact in service first")
    parser.add_argument("--to", required=True, help="the artifact swapped in (e.g. a retrained one)")
    parser.add_argument("--registered", type=int, default=2000, help="items registered before the swap")
    parser.add_argument("--graphs", nargs="+", default=["colocated", "split"], choices=list(GRAPH_DEPLOYMENTS))
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replicas of each deployment that holds the model, one run each")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()

    model, target = str(Path(args.model).resolve()), str(Path(args.to).resolve())
    metadata = read_metadata(model)
    users = pq.read_table(Path(metadata["training_data"]) / schema.USER_VOCAB_PATH, columns=["user_id"])["user_id"].to_pylist()
    users = [str(user) for user in np.random.default_rng(0).permutation(users)]
    rows = []
    os.environ["POLYREC_API_KEY"] = API_KEY  # the replicas inherit the environment of the Ray instance
    with local_serve("swap-") as scratch:
        for replicas in args.replicas:
            for graph in args.graphs:
                rows += run_graph(graph, model, target, args.registered, replicas, users, f"{scratch}/{replicas}")
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray', 'torch', 'httpx')}. Run {date.today().isoformat()}, command "
            f"`.venv/bin/python bench/swap.py --model {args.model} --to {args.to} --registered {args.registered} --graphs {' '.join(args.graphs)} "
            f"--replicas {' '.join(map(str, args.replicas))}`.",
            f"Model `{metadata['model_version']}` with its users' histories, swapped for `{read_metadata(target)['model_version']}` after "
            f"{args.registered:,} items were registered by their text (`POST /v1/items`) and while {READERS} clients asked for "
            "recommendations (known users, k = 10, a 30 s client timeout). Requests are counted by when they started.",
            "",
            "| graph | model replicas | swap took (s) | requests that started | requests | not answered 200 (status: count) | p50 (ms) | p99 (ms) | max (ms) |",
            "|---|---:|---:|---|---:|---|---:|---:|---:|",
            *[f"| {' | '.join(row)} |" for row in rows],
        ]
    )
    publish(SECTION, section, write=not args.no_write)


if __name__ == "__main__":
    main()
