"""``@serve.batch`` with one source for its numbers: ``serve.config.BatchingConfig``.

Serve's decorator takes its batch size and wait when the class is defined, while a deployment's come
from its ``ServeConfig``. So a method is decorated with ``batched`` (``BatchingConfig``'s defaults, never
other numbers) and its replica applies the configured values with ``set_batching`` in its constructor,
before the first call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import serve

from serve.config import BatchingConfig

_DEFAULTS = BatchingConfig()


def batched(method: Callable[..., Any]) -> Callable[..., Any]:
    """``@serve.batch`` at ``BatchingConfig``'s defaults, until the replica calls ``set_batching``."""
    return serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)(method)


def set_batching(method: Any, settings: BatchingConfig) -> None:
    """Give a ``batched`` method the configured batch size and wait."""
    method.set_max_batch_size(settings.max_batch_size)
    method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
