"""Batching of concurrent calls of a replica's method: a forward pass, a store lookup, an fsync for many callers.

``@serve.batch`` forms a batch as soon as its first call arrives (plus its wait), even while the previous
batch is still running, so with no wait a busy replica runs batches of one, each queued behind the last.
``batched`` forms the next batch when the previous one ends, from every call that arrived meanwhile (up to
``max_batch_size``): a lone request pays no batching delay, and the busier the replica, the larger its
batches, which is where the model's work per request falls (3× cheaper in batches of 8 than alone).
``batch_wait_timeout_s`` can still make a batch's first call wait for company (an fsync is worth it), and
``busy_batch_wait_s`` makes it wait only under concurrent load (the previous batch had company): many of the
concurrent calls are still on their way when a batch ends (an HTTP request is parsed and validated before it is a
call), and without the wait they come to batches of one or two.

A method is decorated with ``batched``, written over a list of calls' arguments and returning a list of
answers in the same order; each caller passes one argument and gets its answer. Its replica gives it the
configured ``serve.config.BatchingConfig`` with ``set_batching`` in its constructor. An exception raised by
the method is every caller's of that batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from serve.config import BatchingConfig

T = TypeVar("T")
R = TypeVar("R")


class _Calls(Generic[T, R]):
    """One replica's queue of calls of one batched method, and the task that runs its batches one at a time."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self.run = run
        self.settings = BatchingConfig()
        self.queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.had_company = False  # the previous batch had more than one call

    async def submit(self, argument: T) -> R:
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((argument, answer))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await answer

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            await self._gather(batch)
            batch = [(argument, answer) for argument, answer in batch if not answer.done()]  # callers that gave up are left out
            self.had_company = len(batch) > 1
            if batch:
                await self._run(batch)

    async def _gather(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Add the calls waiting now, then those arriving within the wait, up to the batch size; calls whose
        callers gave up meanwhile take no place."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        deadline = loop.time() + max(settings.batch_wait_timeout_s, settings.busy_batch_wait_s if self.had_company else 0.0)
        while len(batch) < settings.max_batch_size:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                try:
                    call = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    return
            else:
                call = self.queue.get_nowait()
            if not call[1].done():
                batch.append(call)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            answers = await self.run([argument for argument, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"a batched method answered {len(answers)} of {len(batch)} calls")
        except Exception as error:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(error)
            return
        for (_, answer), value in zip(batch, answers):
            if not answer.done():
                answer.set_result(value)


class batched(Generic[T, R]):  # noqa: N801 - used as a decorator, like ``serve.batch``
    """Decorates ``async def method(self, arguments: list[T]) -> list[R]``; an instance's ``method(argument)``
    then answers one call, batched with the concurrent ones."""

    def __init__(self, method: Callable[[Any, list[T]], Awaitable[list[R]]]) -> None:
        self.method = method
        self.__doc__ = method.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.calls_attribute = f"_{name}_calls"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        calls = instance.__dict__.get(self.calls_attribute)
        if calls is None:
            calls = instance.__dict__[self.calls_attribute] = _Calls(self.method.__get__(instance, owner))
        return calls.submit  # a bound coroutine function, which Serve calls as any other method


def set_batching(method: Any, settings: BatchingConfig) -> None:
    """Give a ``batched`` method (as an instance has it) the configured batch size and wait."""
    method.__self__.settings = settings
