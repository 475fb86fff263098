"""Overload: /v1/recommend past its capacity, on a trained artifact with its users' real histories.

Serves the artifact (default: the main job's, ``runs/default/model/artifact``) with the histories of the data it
was trained on, finds the capacity (the concurrency where goodput stops growing), then drives 1× to 8× that
concurrency and reports, per level, goodput (200 answers per second), p50/p99 of the admitted requests, the share
refused with 503, and client timeouts (10 s, what clients commonly wait); then how long latency takes to return to
normal once the load stops. Writes an "Overload" section into bench/RESULTS.md.

    .venv/bin/python bench/overload.py [--model runs/default/model/artifact] [--graph colocated] [--seconds 20]

The load generator (aiohttp: at 64 connections httpx spent a whole core of its own) shares the 2 cores with the
service, as a sidecar would. Its clients honour
Retry-After, as the API asks; one more level at 4× has clients that retry at once, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pyarrow.parquet as pq
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, publish  # noqa: E402
from data import schema  # noqa: E402
from serve.config import SERVE_THROUGHPUT_ENV, FeedbackLogConfig, ServeConfig  # noqa: E402
from serve.runner import APP_NAME, deployed_config, run_service, use_throughput_env  # noqa: E402
from train.artifact import read_metadata  # noqa: E402

SECTION = "## Overload (bench/overload.py)"
CLIENT_TIMEOUT_S = 10.0
SWEEP = (1, 2, 4, 8, 12, 16, 24, 32)


@dataclass
class Level:
    concurrency: int
    seconds: float
    patient: bool
    admitted_ms: list[float] = field(default_factory=list)  # latency of 200 answers
    refused_ms: list[float] = field(default_factory=list)  # latency of 503 answers
    retry_after: set[str] = field(default_factory=set)
    timeouts: int = 0
    other: dict[int, int] = field(default_factory=dict)
    replicas: str = ""  # running replicas per deployment when the level ended

    @property
    def goodput(self) -> float:
        return len(self.admitted_ms) / self.seconds

    @property
    def answered(self) -> int:
        return len(self.admitted_ms) + len(self.refused_ms) + sum(self.other.values())

    def admitted(self, q: float) -> float:
        return float(np.percentile(self.admitted_ms, q)) if self.admitted_ms else float("nan")

    @property
    def refused_share(self) -> float:
        total = self.answered + self.timeouts
        return len(self.refused_ms) / total if total else 0.0


async def drive(url: str, bodies: list[dict], concurrency: int, seconds: float, patient: bool) -> Level:
    """``concurrency`` clients asking in a loop; ``patient`` ones wait a 503's Retry-After before asking again, as
    the API asks them to, impatient ones ask again at once."""
    level = Level(concurrency, seconds, patient)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as client:
        deadline = time.perf_counter() + seconds
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                begin = time.perf_counter()
                try:
                    async with client.post(url, json=body) as response:
                        await response.read()
                except TimeoutError:
                    level.timeouts += 1
                    continue
                elapsed = (time.perf_counter() - begin) * 1000
                if response.status == 200:
                    level.admitted_ms.append(elapsed)
                elif response.status == 503:
                    level.refused_ms.append(elapsed)
                    level.retry_after.add(response.headers.get("retry-after", "none"))
                    if patient:
                        await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                else:
                    level.other[response.status] = level.other.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.seconds = time.perf_counter() - started  # the last requests end after the deadline
    return level


def measure(url: str, bodies: list[dict], concurrency: int, seconds: float, patient: bool = True) -> Level:
    level = asyncio.run(drive(url, bodies, concurrency, seconds, patient))
    level.replicas = replicas()
    print(
        f"c={concurrency:<4d} {'patient' if patient else 'impatient'} goodput {level.goodput:7.1f}/s  admitted p50 {level.admitted(50):7.1f} ms "
        f"p99 {level.admitted(99):7.1f} ms  503 {level.refused_share:5.1%}  timeouts {level.timeouts}  other {level.other}  replicas {level.replicas}",
        flush=True,
    )
    return level


def replicas() -> str:
    deployments = serve.status().applications[APP_NAME].deployments
    return ", ".join(f"{name} {state.replica_states.get('RUNNING', 0)}" for name, state in deployments.items())


def recovery_seconds(url: str, bodies: list[dict], normal_p50_ms: float, limit_s: float = 60.0) -> float:
    """Seconds after the load stops until five requests in a row answer within 1.5× the unloaded p50."""
    started = time.perf_counter()
    in_a_row = 0
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        while time.perf_counter() - started < limit_s:
            begin = time.perf_counter()
            response = client.post(url, json=bodies[in_a_row % len(bodies)])
            fast = response.status_code == 200 and (time.perf_counter() - begin) * 1000 <= 1.5 * normal_p50_ms
            in_a_row = in_a_row + 1 if fast else 0
            if in_a_row == 5:
                return time.perf_counter() - started
            time.sleep(0.05)
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/model/artifact", help="a `polyrec train` artifact (default: the main job's)")
    parser.add_argument("--graph", default="colocated", choices=["colocated", "split"])
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1, 2, 4, 8], help="of the capacity concurrency")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()

    model = str(Path(args.model).resolve())
    metadata = read_metadata(model)
    users = pq.read_table(Path(metadata["training_data"]) / schema.USER_VOCAB_PATH, columns=["user_id"])["user_id"].to_pylist()
    bodies = [{"user_id": user, "k": 10} for user in np.random.default_rng(0).permutation(users)]
    with tempfile.TemporaryDirectory(prefix="overload-") as scratch:
        use_throughput_env()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            config = ServeConfig(graph=args.graph, model=model, state_dir=f"{scratch}/state", port=8123, feedback=FeedbackLogConfig(path=f"{scratch}/feedback"))
            service = run_service(config, blocking=False)
            url = f"{service.url}/v1/recommend"
            measure(url, bodies, 4, 10)  # warm-up
            sweep = [measure(url, bodies, concurrency, args.seconds / 2) for concurrency in SWEEP]
            peak = max(level.goodput for level in sweep)
            capacity = next(level for level in sweep if level.goodput >= 0.95 * peak)
            levels = [measure(url, bodies, max(1, round(multiplier * capacity.concurrency)), args.seconds) for multiplier in args.multipliers]
            levels.append(measure(url, bodies, 4 * capacity.concurrency, args.seconds, patient=False))
            recovery = recovery_seconds(url, bodies, sweep[0].admitted(50))
            print(f"recovered in {recovery:.1f} s", flush=True)
            section = report(args, metadata, deployed_config(), sweep, capacity, peak, levels, recovery)
        finally:
            serve.shutdown()
            ray.shutdown()
    publish(SECTION, section, write=not args.no_write)


def report(
    args: argparse.Namespace, metadata: dict, config: ServeConfig, sweep: list[Level], capacity: Level, peak: float, levels: list[Level], recovery: float
) -> str:
    ingress = config.deployments[config.ingress_deployment()]
    rows = [
        f"| {level.concurrency} ({level.concurrency / capacity.concurrency:g}×){'' if level.patient else ', impatient'} "
        f"| {level.goodput:.1f} | {level.goodput / peak:.0%} | "
        f"{level.admitted(50):.1f} | {level.admitted(99):.1f} | {level.refused_share:.1%} | {', '.join(sorted(level.retry_after)) or '–'} | "
        f"{level.timeouts} | {sum(level.other.values())} |"
        for level in levels
    ]
    at_four = min((level for level in levels if level.patient), key=lambda level: abs(level.concurrency / capacity.concurrency - 4))
    targets = [
        ("goodput at 4× ≥ 80% of peak", at_four.goodput / peak, at_four.goodput >= 0.8 * peak, f"{at_four.goodput / peak:.0%}"),
        (
            "admitted p99 at 4× ≤ 2× p99 at capacity",
            at_four.admitted(99) / capacity.admitted(99),
            at_four.admitted(99) <= 2 * capacity.admitted(99),
            f"{at_four.admitted(99) / capacity.admitted(99):.2f}×",
        ),
        (
            "0 client timeouts (10 s)",
            sum(level.timeouts for level in levels),
            all(level.timeouts == 0 for level in levels),
            str(sum(level.timeouts for level in levels)),
        ),
        ("recovery ≤ 10 s", recovery, recovery <= 10, f"{recovery:.1f} s"),
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray', 'torch', 'aiohttp')}. Run {date.today().isoformat()}, command "
            f"`.venv/bin/python bench/overload.py --model {args.model} --graph {args.graph} --seconds {args.seconds:g}`.",
            f"Model: `{metadata['model_version']}` (a `polyrec train` artifact), its users' histories from `{metadata['training_data']}`; "
            f'requests `{{"user_id": <known user>, "k": 10}}` over every user. {args.graph} graph; an ingress replica works on '
            f"{config.admission.max_in_progress} requests at once and answers more 503 at once (Serve's own bounds: "
            f"{ingress.max_ongoing_requests} ongoing, {ingress.max_queued_requests} queued); request deadline "
            f"{config.admission.request_timeout_s:g} s, calls between deployments {config.admission.call_timeout_s:g} s; Serve's "
            f"fast paths on ({', '.join(f'{name}={value}' for name, value in SERVE_THROUGHPUT_ENV.items())}).",
            "",
            "Capacity sweep (goodput per concurrency): "
            + ", ".join(f"c={level.concurrency}: {level.goodput:.0f}/s" for level in sweep)
            + f". Peak {peak:.0f}/s; capacity concurrency {capacity.concurrency} (the first within 5% of the peak), where admitted "
            f"p99 is {capacity.admitted(99):.0f} ms.",
            "",
            "Clients ask in a loop and, given a 503, wait its Retry-After before asking again, as the API asks them to; the last "
            "row's impatient clients ask again at once (a retry storm), for comparison.",
            "",
            "| concurrency | goodput /s | of peak | admitted p50 ms | admitted p99 ms | 503 | Retry-After | timeouts | other |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
            *rows,
            "",
            *[f"- {name}: {shown} ({'met' if met else 'missed'})" for name, _, met, shown in targets],
        ]
    )


if __name__ == "__main__":
    main()
