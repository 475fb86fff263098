"""Serving benchmark: /v1/recommend of both graphs against a bare one-deployment Serve endpoint, and
feedback ingestion.

Starts one local Ray instance, a bare deployment that returns a constant and the polyrec application
(a random tiny-BERT artifact over all of MovieLens-100K, its training sequences as server-side
histories), first as the split graph, then redeployed in place as the colocated one. A Python load
generator (httpx + asyncio, 127.0.0.1 only, bounded in requests and seconds per level) measures
requests/s and p50/p99 latency at each concurrency, alternating bare and recommend so that each
graph is compared with the bare endpoint measured beside it, then feedback events/s through the
batch endpoint. Writes a "Serving" section into bench/RESULTS.md.

    .venv/bin/python bench/serve_bench.py [--concurrency 1 8 32] [--max-requests 2000] [--max-seconds 20]

The load generator shares the machine with Serve, as a sidecar would; both targets pay for it alike.
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

import httpx
import numpy as np
import ray
from ray import serve
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, publish  # noqa: E402
from serve.config import GRAPH_DEPLOYMENTS, FeedbackLogConfig, ServeConfig  # noqa: E402
from serve.runner import APP_NAME, run_service, use_throughput_env  # noqa: E402
from tests.serving_fixtures import build_random_artifact, build_training_data  # noqa: E402

SECTION = "## Serving (bench/serve_bench.py)"
NUM_USERS = 943  # all of MovieLens-100K
API_KEY = "bench-key"


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=128)
class Constant:
    """The bare baseline: one deployment, no model, the same HTTP proxy path."""

    async def __call__(self, request: Request) -> dict:
        await request.body()
        return {"items": []}


@dataclass
class Level:
    graph: str  # the graph deployed while this level ran (bare levels too)
    target: str
    concurrency: int
    requests: int
    failures: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


async def drive(
    url: str, bodies: list[dict], concurrency: int, max_requests: int, max_seconds: float, headers: dict | None = None
) -> tuple[int, int, float, list[float]]:
    """``concurrency`` workers post ``bodies`` round-robin until ``max_requests`` or ``max_seconds``."""
    latencies: list[float] = []
    failures = 0
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            nonlocal sent, failures
            while sent < max_requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                begin = time.perf_counter()
                response = await client.post(url, json=body)
                latencies.append((time.perf_counter() - begin) * 1000)
                failures += response.status_code != 200

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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-requests", type=int, default=2000, help="per target and concurrency level")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per target and concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="turns per level, alternating bare and recommend")
    parser.add_argument("--feedback-events", type=int, default=20_000)
    parser.add_argument("--feedback-batch", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()

    os.environ["POLYREC_API_KEY"] = API_KEY
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        root = Path(scratch)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = ServeConfig(
            model=str(build_random_artifact(root / "model", num_users=NUM_USERS, model_version="bench")),
            training_data=build_training_data(root / "data", num_users=NUM_USERS),
            state_dir=str(root / "state"),
            feedback=FeedbackLogConfig(path=str(root / "feedback")),
            port=port,
        )
        use_throughput_env()  # as `polyrec serve` starts its local instance: the bare endpoint gets the same flags
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(Constant.bind(), name="bare", route_prefix="/bare")
            section = benchmark(config, args)
        finally:
            serve.shutdown()
            ray.shutdown()
        section += "\n" + model_work(config)
    publish(SECTION, section, write=not args.no_write)


def model_work(config: ServeConfig) -> str:
    """The model stages' own work per request, in this process without Serve: what the graphs add
    beyond it is transport between Serve processes."""
    from serve.messages import RetrievalRequest
    from serve.model_runtime import ServingModel, limit_threads
    from serve.rerank import explain, rerank
    from serve.state import ServerState

    limit_threads(config.torch_threads)
    model = ServingModel(config.model)
    state = ServerState.rebuild(
        config.state,
        Path(config.state_dir) / "bench",
        training_data=config.training_data,
        feedback_log=config.feedback.path,
        wal_dir=Path(config.state_dir) / "bench-wal",
    )
    contexts = [state.context(str(user)) for user in range(1, 201)]
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
            for ranked, context in zip(model.rank(model.retrieve(requests, config.state.history_length, 0.5), config.ranking.weights), contexts[start:]):
                explain(ranked, rerank(ranked, 10, context.seen, config.rerank), config.rerank.because_size)
        per_request = (time.perf_counter() - started) / len(contexts) * 1000
        lines.append(f"{per_request:.1f} ms per request in batches of {batch}")
    return (
        f"- model work alone (retrieve + rank + re-rank + explain, in-process, 1 thread): {'; '.join(lines)}. "
        "The rest is Serve transport: the bare endpoint is one call from the proxy; a split recommendation five "
        "(proxy → Ingress → UserStateStore, Retriever, Ranker, ReRanker); a colocated one the proxy's call to the "
        "Recommender, plus its user lookups in the UserStateStore, one call per batch of concurrent requests."
    )


def replicas() -> str:
    """Running replicas per deployment of the polyrec application (autoscaling may have added some)."""
    deployments = serve.status().applications[APP_NAME].deployments
    return ", ".join(f"{name} {deployments[name].replica_states.get('RUNNING', 0)}" for name in deployments)


def benchmark(config: ServeConfig, args: argparse.Namespace) -> str:
    load_before = os.getloadavg()[0]
    rng = random.Random(0)
    users = [str(rng.randint(1, NUM_USERS)) for _ in range(500)] + [f"new-{i}" for i in range(20)]
    rng.shuffle(users)
    recommend_bodies = [{"user_id": user, "k": 10} for user in users]
    levels: list[Level] = []
    notes: list[str] = []
    for graph in GRAPH_DEPLOYMENTS:
        loads = [os.getloadavg()[0]]
        service = run_service(config.model_copy(update={"graph": graph}), blocking=False)  # in place of the graph before
        targets = {"bare": (f"{service.url}/bare", [{}]), "recommend": (f"{service.url}/v1/recommend", recommend_bodies)}
        for name, (url, bodies) in targets.items():  # warm-up: connections, lazy imports, first batches
            measure(graph, name, url, bodies, 4, 100, 30)
        for concurrency in args.concurrency:
            for level in measure_alternating(graph, targets, concurrency, args.rounds, args.max_requests, args.max_seconds):
                levels.append(level)
                print(
                    f"{graph:9s} {level.target:9s} c={concurrency:<3d} {level.rps:8.1f} req/s  p50 {level.percentile(50):7.1f} ms  "
                    f"p99 {level.percentile(99):7.1f} ms  failures {level.failures}",
                    flush=True,
                )
            loads.append(os.getloadavg()[0])
        notes.append(
            f"{graph}: replicas at the end {replicas()}; 1-minute load average {' → '.join(f'{load:.1f}' for load in loads)} "
            "(at the start and after each concurrency level)"
        )

    batch = args.feedback_batch
    feedback_bodies = [
        {"events": [{"user_id": str(rng.randint(1, NUM_USERS)), "item_id": str(rng.randint(1, 1682)), "event": "click"} for _ in range(batch)]}
        for _ in range(50)
    ]
    feedback = measure(
        service.config.graph, "feedback", f"{service.url}/v1/feedback", feedback_bodies, 8, args.feedback_events // batch, 120, {"X-API-Key": API_KEY}
    )
    events_per_s = feedback.requests * batch / feedback.seconds
    print(f"feedback {events_per_s:,.0f} events/s, failures {feedback.failures}", flush=True)

    defaults = ServeConfig()
    rows = []
    verdicts = []
    for graph in GRAPH_DEPLOYMENTS:
        for concurrency in args.concurrency:
            bare, ours = (
                next(level for level in levels if (level.graph, level.target, level.concurrency) == (graph, target, concurrency))
                for target in ("bare", "recommend")
            )
            share, tail = ours.rps / bare.rps, ours.percentile(99) / bare.percentile(99)
            rows.append(
                f"| {graph} | {concurrency} | {ours.requests:,} | {ours.failures} | {ours.rps:,.1f} | {ours.percentile(50):.1f} | "
                f"{ours.percentile(99):.1f} | {bare.rps:,.1f} | {bare.percentile(99):.1f} | {share:.0%} | {tail:.1f}× |"
            )
            if concurrency > 1:
                verdicts.append(
                    f"{graph}, c={concurrency}: {share:.0%} of bare rps (target ≥ 50%: {'met' if share >= 0.5 else 'missed'}), "
                    f"p99 {tail:.1f}× bare (target ≤ 2.5×: {'met' if tail <= 2.5 else 'missed'})"
                )
    return "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray', 'torch', 'httpx')}. Run {date.today().isoformat()}; 1-minute load average {load_before:.1f} before and "
            f"{os.getloadavg()[0]:.1f} after (other jobs shared the machine when it was above ~2).",
            f"Model: random tiny-BERT artifact (`tests.serving_fixtures`, width 32) over MovieLens-100K ({NUM_USERS} users, 1,682 items), "
            f"training sequences as server-side histories; default `ServeConfig` ({defaults.retrieval.num_candidates} candidates, "
            f"{defaults.rerank.diversity}, batching {defaults.retrieval.batching.max_batch_size} / "
            f"{defaults.retrieval.batching.batch_wait_timeout_s * 1000:g} ms, colocated user lookups "
            f"{defaults.state.lookup_batching.max_batch_size} / {defaults.state.lookup_batching.batch_wait_timeout_s * 1000:g} ms, "
            "default autoscaling), as the split graph, then redeployed as the colocated graph (`ServeConfig`'s default). "
            "Bare: one deployment returning a constant, same proxy. Each level: at most "
            f"{args.max_requests:,} requests or {args.max_seconds:.0f} s per target, in {args.rounds} turns alternating bare and "
            "recommend; the load generator runs on the same 2 cores.",
            "",
            "| graph | concurrency | requests | failures | req/s | p50 ms | p99 ms | bare req/s | bare p99 ms | share of bare req/s | p99 ÷ bare p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *[f"- {line}" for line in verdicts],
            *[f"- {line}" for line in notes],
            f"- feedback ingestion ({service.config.graph} graph): {events_per_s:,.0f} events/s in batches of {batch} at concurrency 8 "
            f"({feedback.requests * batch:,} events, {feedback.failures} failed requests; target ≥ 2,000: "
            f"{'met' if events_per_s >= 2000 else 'missed'}); each request is acknowledged after its WAL fsync.",
        ]
    )


if __name__ == "__main__":
    main()
