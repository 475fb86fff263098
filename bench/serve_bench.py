"""Serving benchmark: /v1/recommend of a trained artifact against Serve's own no-op endpoint, stock and fast.

What Ray Serve itself costs here is measured first: a no-op deployment under stock settings, on its own local
Ray instance. Then, on a new instance with the settings `polyrec serve` uses (Serve's fast paths), the polyrec
application serves a `polyrec train` artifact (default: the main job's) with the histories of the data it was
trained on, beside the same no-op deployment ("fast no-op"); both graphs, requests `{"user_id": <known user>,
"k": 10}` over real users, the two targets measured in alternating turns. Then feedback ingestion, and the model's
own work per request without Serve. Writes a "Serving" section into bench/RESULTS.md.

    .venv/bin/python bench/serve_bench.py [--model runs/default/model/artifact] [--concurrency 1 8 32] [--max-seconds 15]

The load generator (aiohttp) shares the 2 cores with Serve, as a sidecar would; every target pays for it alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow.compute as pc
import ray
from ray import serve
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, publish  # noqa: E402
from data.user_histories import read_user_histories  # noqa: E402
from serve.config import GRAPH_DEPLOYMENTS, SERVE_THROUGHPUT_ENV, FeedbackLogConfig, ServeConfig  # noqa: E402
from serve.runner import APP_NAME, run_service, use_throughput_env  # noqa: E402
from train.artifact import read_metadata  # noqa: E402

SECTION = "## Serving (bench/serve_bench.py)"
API_KEY = "bench-key"


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=128)
class Constant:
    """The no-op baseline: one deployment, no model, the same HTTP path."""

    async def __call__(self, request: Request) -> dict:
        await request.body()
        return {"items": []}


@dataclass
class Level:
    graph: str  # the graph deployed while this level ran (bare levels too)
    target: str
    concurrency: int
    requests: int  # answered 200
    failures: int  # answered otherwise (503: shed by admission control)
    seconds: float
    latencies_ms: np.ndarray

    @property
    def shed_share(self) -> float:
        return self.failures / max(1, self.requests + self.failures)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


async def drive(
    url: str, bodies: list[dict], concurrency: int, max_requests: int, max_seconds: float, headers: dict | None = None
) -> tuple[int, int, float, list[float]]:
    """``concurrency`` workers post ``bodies`` round-robin until ``max_requests`` or ``max_seconds``; returns the 200
    answers, the other answers, the seconds, and the latencies of the 200 answers."""
    latencies: list[float] = []
    failures = 0
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            nonlocal sent, failures
            while sent < max_requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                begin = time.perf_counter()
                async with client.post(url, json=body) as response:
                    await response.read()
                if response.status == 200:
                    latencies.append((time.perf_counter() - begin) * 1000)
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies), failures, elapsed, latencies


def measure(
    graph: str, target: str, url: str, bodies: list[dict], concurrency: int, max_requests: int, max_seconds: float, headers: dict | None = None
) -> Level:
    count, failures, seconds, latencies = asyncio.run(drive(url, bodies, concurrency, max_requests, max_seconds, headers))
    return Level(graph, target, concurrency, count, failures, seconds, np.array(latencies))


def measure_alternating(
    graph: str, targets: dict[str, tuple[str, list[dict]]], concurrency: int, rounds: int, max_requests: int, max_seconds: float
) -> list[Level]:
    """One level per target, measured in ``rounds`` turns that alternate the targets, each turn with its
    share of the requests and seconds: a background load that comes and goes weighs on all alike."""
    turns: dict[str, list[Level]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (url, bodies) in targets.items():
            turns[name].append(measure(graph, name, url, bodies, concurrency, -(-max_requests // rounds), max_seconds / rounds))
    return [
        Level(
            graph,
            name,
            concurrency,
            sum(t.requests for t in parts),
            sum(t.failures for t in parts),
            sum(t.seconds for t in parts),
            np.concatenate([t.latencies_ms for t in parts]),
        )
        for name, parts in turns.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/model/artifact", help="a `polyrec train` artifact (default: the main job's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-requests", type=int, default=20_000, help="per target and concurrency level")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="per target and concurrency level")
    parser.add_argument("--rounds", type=int, default=3, help="turns per level, alternating the no-op and recommend")
    parser.add_argument("--feedback-events", type=int, default=20_000)
    parser.add_argument("--feedback-batch", type=int, default=200)
    parser.add_argument("--recommender-replicas", type=int, default=2, help="the colocated graph again with this many Recommender replicas (1: not)")
    parser.add_argument("--no-context-cache", action="store_true", help="every recommendation reads its user's context from the UserStateStore")
    parser.add_argument("--batch-wait-ms", type=float, help="override how long a batch of requests waits for company")
    parser.add_argument("--busy-wait-ms", type=float, help="override how long it waits under concurrent load (busy_batch_wait_s)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()

    training_data = read_metadata(args.model).get("training_data")
    known_users = pc.unique(read_user_histories(training_data)["user_id"]).to_pylist()
    rng = random.Random(0)
    bodies = [{"user_id": user, "k": 10} for user in rng.sample(known_users, min(500, len(known_users)))]
    os.environ["POLYREC_API_KEY"] = API_KEY
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    for flag in SERVE_THROUGHPUT_ENV:  # Serve as it comes
        os.environ.pop(flag, None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Constant.bind(), name="bare", route_prefix="/bare")
        url = f"http://127.0.0.1:{port}/bare"
        measure("stock", "bare", url, [{}], 4, 200, 30)  # warm-up
        stock = {c: measure("stock", "bare", url, [{}], c, args.max_requests, args.max_seconds) for c in args.concurrency}
    finally:
        serve.shutdown()
        ray.shutdown()

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        root = Path(scratch)
        config = ServeConfig(
            model=str(Path(args.model).resolve()),
            state_dir=str(root / "state"),
            feedback=FeedbackLogConfig(path=str(root / "feedback")),
            port=port,
        )
        config.state.cache.enabled = not args.no_context_cache
        if args.batch_wait_ms is not None:
            config.request_batching.batch_wait_timeout_s = args.batch_wait_ms / 1000
        if args.busy_wait_ms is not None:
            config.request_batching.busy_batch_wait_s = args.busy_wait_ms / 1000
        use_throughput_env()  # as `polyrec serve` starts its local instance: the no-op gets the same settings
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(Constant.bind(), name="bare", route_prefix="/bare")
            section = benchmark(config, args, bodies, stock, training_data)
        finally:
            serve.shutdown()
            ray.shutdown()
        section += "\n" + model_work(config, training_data, [body["user_id"] for body in bodies[:200]])
    publish(SECTION, section, write=not args.no_write)


def model_work(config: ServeConfig, training_data: str, users: list[str]) -> str:
    """The model stages' own work per request, in this process without Serve: what the graphs add
    beyond it is transport between Serve processes."""
    from serve.messages import RetrievalRequest
    from serve.model_runtime import ServingModel, limit_threads
    from serve.rerank import final_items_of_batch
    from serve.state import ServerState

    limit_threads(config.torch_threads)
    model = ServingModel(config.model)
    state = ServerState.rebuild(
        config.state,
        Path(config.state_dir) / "bench",
        training_data=training_data,
        feedback_log=config.feedback.path,
        wal_dir=Path(config.state_dir) / "bench-wal",
    )
    contexts = [state.context(user) for user in users]
    lines = []
    for batch in (1, 8):
        started = time.perf_counter()
        for start in range(0, len(contexts), batch):
            requests = [
                RetrievalRequest(
                    model=config.model,
                    user_id=c.user_id,
                    history=c.history,
                    history_ratings=c.history_ratings,
                    interests=None,
                    num_candidates=config.retrieval.num_candidates + 10,
                    registry_version=0,
                    exclude=c.seen,
                )
                for c in contexts[start : start + batch]
            ]
            ranked = model.rank(model.retrieve(requests, config.state.history_length, 0.5), config.ranking.weights)
            final_items_of_batch(ranked, [10] * len(ranked), [request.exclude for request in requests], config.rerank)
        per_request = (time.perf_counter() - started) / len(contexts) * 1000
        lines.append(f"{per_request:.1f} ms per request in batches of {batch}")
    return (
        f"- model work alone (retrieve + rank + re-rank + explain, in-process, 1 thread): {'; '.join(lines)}. "
        "The rest is Serve transport: the bare endpoint is one call from the proxy; a split recommendation four "
        "(proxy → Ingress, then one per batch of requests to each of Retriever, Ranker, ReRanker) and a fifth to the "
        "UserStateStore for the users of a batch that are not in the Ingress's cache; a colocated one the proxy's call "
        "to the Recommender, and the same lookup for the users not in its cache."
    )


def replicas() -> str:
    """Running replicas per deployment of the polyrec application (autoscaling may have added some)."""
    deployments = serve.status().applications[APP_NAME].deployments
    return ", ".join(f"{name} {deployments[name].replica_states.get('RUNNING', 0)}" for name in deployments)


def layouts(config: ServeConfig, recommenders: int) -> dict[str, ServeConfig]:
    """Each graph with its default deployments, and the colocated graph with ``recommenders`` Recommender replicas
    sharing the machine (``num_cpus`` so that they fit beside the other replicas)."""
    found = {graph: config.model_copy(update={"graph": graph}, deep=True) for graph in GRAPH_DEPLOYMENTS}
    if recommenders > 1:
        scaled = config.model_copy(update={"graph": "colocated"}, deep=True)
        share = round(min(1.0, 1.6 / recommenders), 2)
        scaled.deployments["Recommender"] = scaled.deployments["Recommender"].model_copy(update={"min_replicas": recommenders, "num_cpus": share})
        found[f"colocated ×{recommenders}"] = scaled
    return found


def benchmark(config: ServeConfig, args: argparse.Namespace, bodies: list[dict], stock: dict[int, Level], training_data: str) -> str:
    levels: list[Level] = []
    notes: list[str] = []
    graphs = layouts(config, args.recommender_replicas)
    for graph, graph_config in graphs.items():
        if APP_NAME in serve.status().applications:  # a running application would only get its model swapped
            serve.delete(APP_NAME)
        service = run_service(graph_config, blocking=False)
        targets = {"bare": (f"{service.url}/bare", [{}]), "recommend": (f"{service.url}/v1/recommend", bodies)}
        for name, (url, target_bodies) in targets.items():  # warm-up: connections, lazy imports, first batches
            measure(graph, name, url, target_bodies, 4, 200, 30)
        for concurrency in args.concurrency:
            for level in measure_alternating(graph, targets, concurrency, args.rounds, args.max_requests, args.max_seconds):
                levels.append(level)
                print(
                    f"{graph:14s} {level.target:9s} c={concurrency:<3d} {level.rps:8.1f} req/s  p50 {level.percentile(50):7.1f} ms  "
                    f"p99 {level.percentile(99):7.1f} ms  failures {level.failures}",
                    flush=True,
                )
        notes.append(f"{graph}: replicas at the end {replicas()}")

    batch = args.feedback_batch
    rng = random.Random(1)
    users = [body["user_id"] for body in bodies]
    feedback_bodies = [
        {"events": [{"user_id": rng.choice(users), "item_id": str(rng.randint(1, 1682)), "event": "click"} for _ in range(batch)]} for _ in range(50)
    ]
    feedback = measure(
        service.config.graph, "feedback", f"{service.url}/v1/feedback", feedback_bodies, 8, args.feedback_events // batch, 120, {"X-API-Key": API_KEY}
    )
    events_per_s = feedback.requests * batch / feedback.seconds
    print(f"feedback {events_per_s:,.0f} events/s, failures {feedback.failures}", flush=True)

    rows = []
    verdicts = []
    for graph in graphs:
        for concurrency in args.concurrency:
            fast, ours = (
                next(level for level in levels if (level.graph, level.target, level.concurrency) == (graph, target, concurrency))
                for target in ("bare", "recommend")
            )
            base = stock[concurrency]
            rows.append(
                f"| {graph} | {concurrency} | {ours.rps:,.1f} | {ours.percentile(50):.1f} | {ours.percentile(99):.1f} | {ours.shed_share:.0%} | "
                f"{base.rps:,.1f} | {base.percentile(50):.1f} | {base.percentile(99):.1f} | **{ours.rps / base.rps:.2f}×** | "
                f"{fast.rps:,.1f} | {fast.percentile(50):.2f} | {ours.rps / fast.rps:.0%} |"
            )
            if concurrency == 1:
                ratio = ours.percentile(50) / base.percentile(50)
                verdicts.append(f"{graph}, c=1: p50 {ratio:.2f}× the stock no-op's (target ≤ 1.0×: {'met' if ratio <= 1.0 else 'missed'})")
            else:
                ratio = ours.rps / base.rps
                verdicts.append(f"{graph}, c={concurrency}: {ratio:.2f}× the stock no-op's req/s (target ≥ 2.0×: {'met' if ratio >= 2.0 else 'missed'})")
            if concurrency == max(args.concurrency):
                tail = ours.percentile(99) / base.percentile(99)
                verdicts.append(f"{graph}, c={concurrency}: p99 {tail:.2f}× the stock no-op's (target ≤ 1.0×: {'met' if tail <= 1.0 else 'missed'})")
    metadata = read_metadata(config.model)
    scaled = [
        f"{name}: {graph_config.deployments['Recommender'].min_replicas} Recommender replicas at num_cpus "
        f"{graph_config.deployments['Recommender'].num_cpus:g} each"
        for name, graph_config in graphs.items()
        if name not in GRAPH_DEPLOYMENTS
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray', 'torch', 'aiohttp')}. Run {date.today().isoformat()}, command "
            f"`.venv/bin/python bench/serve_bench.py --model {args.model} --max-seconds {args.max_seconds:g} --rounds {args.rounds}"
            f"{' --no-context-cache' if not config.state.cache.enabled else ''}"
            f"{f' --batch-wait-ms {args.batch_wait_ms:g}' if args.batch_wait_ms is not None else ''}"
            f"{f' --busy-wait-ms {args.busy_wait_ms:g}' if args.busy_wait_ms is not None else ''}`.",
            f"Model: `{metadata.get('model_version')}` (a `polyrec train` artifact), its users' histories from `{training_data}`; "
            f'requests `{{"user_id": <known user>, "k": 10}}` over {len(bodies)} real users; `ServeConfig` '
            f"({config.retrieval.num_candidates} candidates, {config.rerank.diversity}, batches of up to "
            f"{config.request_batching.max_batch_size} requests whose first waits "
            f"{config.request_batching.batch_wait_timeout_s * 1000:g} ms for company, or {config.request_batching.busy_batch_wait_s * 1000:g} ms "
            "after a batch with company, user contexts cached in the ingress replicas "
            f"{'on' if config.state.cache.enabled else 'off'}, default autoscaling{''.join('; ' + line for line in scaled)}). "
            "Stock no-op: one deployment returning a constant, Serve's stock settings, on its own Ray instance, measured first. "
            "Fast no-op: the same deployment beside polyrec with polyrec's settings "
            f"({', '.join(f'{k}={v}' for k, v in SERVE_THROUGHPUT_ENV.items())}), in alternating turns with recommend "
            f"({args.rounds} per level, {args.max_seconds:g} s per target and level in all).",
            "",
            "| graph | c | recommend req/s (200) | p50 ms | p99 ms | shed (503) | stock no-op req/s | p50 ms | p99 ms | ÷ stock req/s "
            "| fast no-op req/s | p50 ms | share of fast |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *[f"- {line}" for line in verdicts],
            *[f"- {line}" for line in notes],
            f"- feedback ingestion ({service.config.graph} graph): {events_per_s:,.0f} events/s in batches of {batch} at concurrency 8 "
            f"({feedback.requests * batch:,} events, {feedback.failures} failed requests); each request is acknowledged after its WAL fsync.",
        ]
    )


if __name__ == "__main__":
    main()
