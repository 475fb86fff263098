"""Ports for the servers the tests start (Serve's HTTP port, Ray's head, Prometheus).

A port found by binding to 0 and then released is taken from the kernel's ephemeral range (32768 up on Linux), the
range it also hands every outgoing connection and every other bind to 0 on the machine: between the probe and the
server's own bind, another process can get it (a test cluster's head did, in CI). Ray's workers bind theirs in
10002–19999, and Serve gives its ingress replicas HTTP ports from 30000 up. So the ports here come from 20000–29999,
are checked free by a bind, and are never handed out twice by one session."""

from __future__ import annotations

import random
import socket

FIRST = 20_000  # above Ray's worker ports (`ray start --max-worker-port`, 19999 by default)
LAST = 29_999  # below Serve's direct-ingress ports (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, 30000 by default)
_handed_out: set[int] = set()
_pick = random.Random()


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that nothing listens on, none handed out before."""
    ports: list[int] = []
    for _ in range(1_000):
        port = _pick.randint(FIRST, LAST)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports between {FIRST} and {LAST}")


def free_port() -> int:
    return free_ports(1)[0]
