"""The one way a stage joins Ray: the configured cluster, or a local instance it starts itself."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from common.config import RayConfig


def connect(config: RayConfig, **local_options: Any) -> bool:
    """Join ``config.address``, or start a local instance with ``local_options`` (``ray.init`` keywords); a driver
    already connected is used as is. Returns whether this call started Ray, so the caller knows to shut it down."""
    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, logging_level="WARNING")
        return False
    ray.init(num_cpus=config.num_cpus, **local_options)
    return True


def find_cluster(address: str | None) -> bool:
    """Join a running cluster (``address``, else the local one); False when none runs."""
    if ray.is_initialized():
        return True
    try:
        ray.init(address=address or "auto", logging_level="WARNING")
    except ConnectionError:
        return False
    return True


@contextmanager
def sigint_handler_kept() -> Iterator[None]:
    """Restores this process's SIGINT handler on exit. Ray Train's ``fit`` installs its own ("abort the run") and leaves
    it there: after the training, a Ctrl-C would ask the finished run's controller, gone by then, to abort, and raise
    Ray's "Can't find actor" instead of KeyboardInterrupt (the main job then stopped with that error, its service
    killed rather than stopped)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signal handlers
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
