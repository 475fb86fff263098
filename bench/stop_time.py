"""How long Ctrl-C takes to stop `polyrec serve`: from SIGINT, once the command says it serves, until it exits.

Runs `polyrec serve --model MODEL` as a user does, in alternating turns with the ingress replicas' drain window as
polyrec sets it on a local instance (``serve.config.LOCAL_SERVE_ENV``) and as Ray sets it by default (30 s, for load
balancers in front of a cluster; an environment variable set by the user wins over polyrec's). Each turn starts a
fresh Ray instance. Its section goes into bench/RESULTS.md.

    .venv/bin/python bench/stop_time.py --model runs/default/model/artifact
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import machine, publish  # noqa: E402
from serve.config import LOCAL_SERVE_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLYREC = str(REPO / ".venv" / "bin" / "polyrec")
SECTION = "## Stopping the service (bench/stop_time.py)"
RAYS_DEFAULT_S = "30"


def stop_time(model: str, port: int, drain_env: dict[str, str], folder: Path) -> float:
    """Seconds from SIGINT to exit of a `polyrec serve` that said "Ctrl-C stops" and answers GET /v1/model."""
    config = folder / "serve.yaml"
    config.write_text(f"state_dir: {folder / 'state'}\nfeedback:\n  path: {folder / 'feedback'}\n")
    command = [POLYREC, "serve", "--config", str(config), "--model", model, "--port", str(port)]
    with open(folder / "serve.log", "w") as log:
        service = subprocess.Popen(command, cwd=REPO, env={**os.environ, **drain_env}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:  # a user presses Ctrl-C once the command says so (before that, the start is still under way)
            if "Ctrl-C stops" in (folder / "serve.log").read_text() and httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).status_code == 200:
                break
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"polyrec serve did not come up; see {folder / 'serve.log'}")
            time.sleep(0.5)
        started = time.perf_counter()
        service.send_signal(signal.SIGINT)
        service.wait(timeout=300)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a `polyrec train` artifact")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the section without writing RESULTS.md")
    args = parser.parse_args()

    ((name, polyrecs),) = LOCAL_SERVE_ENV.items()
    settings = {f"{polyrecs} s (polyrec's, local instance)": {}, f"{RAYS_DEFAULT_S} s (Ray's default)": {name: RAYS_DEFAULT_S}}
    times: dict[str, list[float]] = {label: [] for label in settings}
    with tempfile.TemporaryDirectory() as work:
        for turn in range(args.rounds):
            for label, env in settings.items():
                folder = Path(work) / f"{turn}-{len(times[label])}-{env.get(name, polyrecs)}"
                folder.mkdir()
                times[label].append(stop_time(args.model, args.port, env, folder))
                print(f"{label}: {times[label][-1]:.1f} s", flush=True)

    rows = [f"| {label} | {' / '.join(f'{t:.1f}' for t in runs)} | {statistics.median(runs):.1f} |" for label, runs in times.items()]
    text = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine('ray')}. Run {time.strftime('%Y-%m-%d', time.gmtime())}, alone on the machine.",
            f"`.venv/bin/python bench/stop_time.py --model {args.model} --rounds {args.rounds}`: `polyrec serve` (the colocated",
            'graph, HAProxy in front), SIGINT once it prints "Ctrl-C stops" and GET /v1/model answers, seconds until the command exits; turns alternate',
            f"the ingress replicas' drain window (`{name}`).",
            "",
            "| drain window | stop times (s) | median (s) |",
            "|---|---:|---:|",
            *rows,
            "",
        ]
    )
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
