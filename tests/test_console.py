"""A quiet console: polyrec's lines on the console, Ray's and the libraries' logs and warnings in the run folder's
log file; ``--verbose`` leaves the libraries' consoles alone. The dashboard of the serving metrics shows every metric
the service exports."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ray import serve

from common.console import LOG_FILE, VERBOSE_ENV, console_session
from tests.tiny import tiny_preprocess_config

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "serve" / "grafana" / "polyrec-dashboard.json"


def test_a_quiet_session_sends_library_logs_and_warnings_to_the_log_file_only(tmp_path, capsys):
    library = logging.getLogger("somelibrary.internal")
    library.addHandler(logging.StreamHandler(sys.stderr))  # a library's console of its own
    library.propagate = False
    try:
        with console_session(tmp_path, verbose=False) as log_file:
            logging.getLogger("train.trainer").info("[polyrec train] epoch 1/2")
            library.warning("execution plan of dataset 7")
            logging.getLogger("ray.data").info("Starting execution of Dataset 8")
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
            assert os.environ[VERBOSE_ENV] == "0"
    finally:
        library.handlers.clear()
    console = capsys.readouterr().err
    assert console.splitlines() == ["[polyrec train] epoch 1/2"]
    assert log_file == tmp_path / "logs" / LOG_FILE
    logged = log_file.read_text()
    for line in ("[polyrec train] epoch 1/2", "execution plan of dataset 7", "Starting execution of Dataset 8", "a library's warning"):
        assert line in logged
    # After the session the root logger is as it was: nothing more is written to the file.
    logging.getLogger("train.trainer").warning("after the session")
    assert "after the session" not in log_file.read_text()


def test_a_verbose_session_leaves_every_console_as_it_is(tmp_path):
    handlers = {name: list(logging.getLogger(name).handlers) for name in ("", "ray", "ray.data")}
    before = os.environ.get(VERBOSE_ENV)
    with console_session(tmp_path, verbose=True) as log_file:
        assert log_file is None and os.environ[VERBOSE_ENV] == "1"
        assert {name: list(logging.getLogger(name).handlers) for name in handlers} == handlers
    assert not (tmp_path / "logs").exists()
    assert os.environ.get(VERBOSE_ENV) == before  # the Ray processes of a later command learn its own choice


def test_a_quiet_session_shows_the_stage_lines_of_ray_workers_and_logs_the_rest(tmp_path, capsys):
    """What Ray's processes print reaches the driver's console through Ray's log forwarding: a worker's polyrec line
    shows, bare (no process prefix); a library's build note or warning from a worker goes to the log file."""
    import ray

    @ray.remote(num_cpus=0)
    def worker_prints() -> None:
        print("[polyrec train] epoch 3/30 total=5.0", flush=True)
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", flush=True)

    with console_session(tmp_path, verbose=False) as log_file:
        ray.init(num_cpus=1, include_dashboard=False)
        try:
            ray.get(worker_prints.remote())
            deadline = time.monotonic() + 30
            while "built successfully" not in (log_file.read_text() if log_file.exists() else "") and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            ray.shutdown()
    console = capsys.readouterr()
    shown = [line for line in (console.out + console.err).splitlines() if "polyrec" in line or "DeepSpeed" in line]
    assert shown == ["[polyrec train] epoch 3/30 total=5.0"]
    logged = log_file.read_text()
    assert "worker_prints" in logged and "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in logged


def test_polyrec_preprocess_prints_its_report_and_nothing_of_rays(tmp_path):
    """The real command in a process of its own, as a user runs it: Ray Data's plans and progress lines and Ray's
    start-up lines are in the log file beside the output, not on the console."""
    config = tiny_preprocess_config(tmp_path)
    (tmp_path / "preprocess.yaml").write_text(config.to_yaml())
    env = {name: value for name, value in os.environ.items() if name not in (VERBOSE_ENV, "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "preprocess", "--config", str(tmp_path / "preprocess.yaml"), "--output", str(tmp_path / "run" / "data")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "interactions read" in done.stdout and "content hash:" in done.stdout
    console = done.stdout + done.stderr
    for noise in ("Execution plan", "streaming_executor", "Started a local Ray instance", "logging_progress", "Warning", "WARNING"):
        assert noise not in console, console
    # Ray's C++ core writes "[<time> <level> <pid> <tid>] <file>.cc:<line>: ..." straight to the process's stderr.
    assert not re.search(r"^\[[\d\- :,]+ [DIWEF] \d+ \d+\]", console, re.MULTILINE), console
    logged = (tmp_path / "run" / "logs" / LOG_FILE).read_text()
    assert "Execution plan" in logged and "Started a local Ray instance" in logged


def _panel_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _balanced(expr: str) -> bool:
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack


def test_the_dashboard_shows_every_metric_the_service_exports_beside_ray_serves():
    expressions = _panel_expressions()
    assert expressions and all(_balanced(expr) for expr in expressions), expressions
    used = {name for expr in expressions for name in re.findall(r"\b(ray_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b(?=[{\[(\s])", expr)}

    # Every metric polyrec's serving code defines (Ray exports it as ray_<name>) has a panel.
    defined = set()
    for path in (REPO / "serve").glob("*.py"):
        defined |= set(re.findall(r'\b(?:Counter|Histogram|Gauge)\(\s*"([a-z_]+)"', path.read_text()))
    assert defined and {f"ray_{name}" for name in defined} <= used

    # Ray Serve's metrics the panels use are ones this Ray defines (literally, or as serve_<...>_{protocol}_... for HTTP).
    serve_source = "\n".join(path.read_text() for path in Path(serve.__file__).parent.joinpath("_private").glob("*.py"))
    ray_serve_names = set(re.findall(r'"(serve_[a-z_]+)"', serve_source))
    ray_serve_names |= {name.replace("{protocol_name}", "http") for name in re.findall(r'f"(serve_[a-z_{}]+)"', serve_source)}
    used_ray_serve = {name.removeprefix("ray_") for name in used if name.startswith("ray_serve_")}
    assert used_ray_serve and used_ray_serve <= ray_serve_names, used_ray_serve - ray_serve_names
    # Every panel filters by the application variable, so another application's traffic is not mixed in.
    assert all('application="$application"' in expr for expr in expressions)
