"""The ingress's queue for rows another deployment must get (impressions for the log, feedback for the user state):
what a failed call held is sent again, in order, bounded, and a shutdown makes one last attempt, not a loop."""

from __future__ import annotations

import asyncio
from collections import Counter

from serve.resend import DROPPED, RETRIED, SENT, ResendQueue


class Deployment:
    """A deployment that fails its first ``failures`` calls (a replica restarting), then takes every call."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.received = failures, 0, []

    async def send(self, rows: list[int]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("replica restarting")
        self.received.append(list(rows))


def queue_for(deployment: Deployment, outcomes: Counter, max_pending: int = 100) -> ResendQueue:
    return ResendQueue(deployment.send, what="rows", interval_s=0.01, max_pending=max_pending, count=lambda outcome, rows: outcomes.update({outcome: rows}))


def test_rows_a_failed_call_held_are_sent_again_before_the_newer_ones():
    async def scenario() -> tuple[Deployment, Counter]:
        deployment, outcomes = Deployment(failures=2), Counter()
        queue = queue_for(deployment, outcomes)
        queue.add([1, 2])
        await asyncio.sleep(0.015)  # the first call has failed
        queue.add([3])
        while len(queue) or not deployment.received:
            await asyncio.sleep(0.01)
        return deployment, outcomes

    deployment, outcomes = asyncio.run(scenario())
    assert deployment.calls == 3
    assert deployment.received == [[1, 2, 3]]
    assert outcomes == Counter({RETRIED: 2 + 3, SENT: 3})


def test_past_max_pending_the_oldest_rows_are_dropped_and_counted():
    async def scenario() -> tuple[Deployment, Counter]:
        deployment, outcomes = Deployment(failures=1), Counter()
        queue = queue_for(deployment, outcomes, max_pending=3)
        queue.add([1, 2, 3, 4, 5])
        while not deployment.received:
            await asyncio.sleep(0.01)
        return deployment, outcomes

    deployment, outcomes = asyncio.run(scenario())
    assert deployment.received == [[3, 4, 5]]
    assert outcomes == Counter({RETRIED: 5, DROPPED: 2, SENT: 3})


def test_close_makes_one_last_attempt_and_drops_what_it_cannot_send():
    async def scenario(failures: int) -> tuple[Deployment, Counter]:
        deployment, outcomes = Deployment(failures), Counter()
        queue = queue_for(deployment, outcomes)
        queue.interval_s = 3600  # nothing is sent before the shutdown
        queue.add([1, 2])
        await asyncio.wait_for(queue.close(), timeout=5)  # a deployment that is gone does not keep it spinning
        return deployment, outcomes

    deployment, outcomes = asyncio.run(scenario(failures=0))
    assert (deployment.calls, deployment.received, outcomes) == (1, [[1, 2]], Counter({SENT: 2}))
    deployment, outcomes = asyncio.run(scenario(failures=10**6))
    assert (deployment.calls, deployment.received, outcomes) == (1, [], Counter({RETRIED: 2, DROPPED: 2}))
