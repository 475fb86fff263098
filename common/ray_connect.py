"""The one way a stage joins Ray: the configured cluster, or a local instance it starts itself."""

from __future__ import annotations

import os
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
    else:
        ray.init(num_cpus=config.num_cpus, **local_options)
    _sigterm_to_python()
    return not config.address


def _sigterm_to_python() -> None:
    """``ray.init`` puts Ray's C++ crash handler in front of the Python SIGTERM handler it set, and that handler prints a
    stack dump of the driver before passing the signal on; but a SIGTERM (``kill``, a supervisor, a pod's stop) is a
    request to stop, not a crash. Setting the Python handler again gives SIGTERM back to it alone; the crash signals
    keep Ray's handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))


def find_cluster(address: str | None) -> bool:
    """Join a running cluster (``address``, else the local one); False when none runs."""
    if ray.is_initialized():
        return True
    try:
        ray.init(address=address or "auto", logging_level="WARNING")
    except ConnectionError:
        return False
    _sigterm_to_python()
    return True


@contextmanager
def ray_train_fit() -> Iterator[None]:
    """Around a Ray Train ``fit`` in this driver.

    Unless set, Ray Train's controller (which takes the driver's ``RAY_TRAIN_*`` variables) looks at its workers every
    0.5 s: at its default 2 s a finished training waits about 4 s for it to notice, on every run.

    A Ctrl-C is a KeyboardInterrupt before, during and after the fit. During it, Ray Train's own handler aborts the
    run and ends it with ``sys.exit(1)``, which would end the command in silence with status 1; and it leaves that
    handler installed, so that after the training a Ctrl-C would ask the finished run's controller, gone by then, to
    abort, and raise Ray's "Can't find actor" instead."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signal handlers
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as aborted:
        raise KeyboardInterrupt from aborted
    finally:
        signal.signal(signal.SIGINT, previous)
