"""Simulated users: replay real interactions through the recommendation service's HTTP API.

For each interaction, in time order, the user first asks for recommendations (was the item they really chose
among them?), then reports what they did as feedback (a rating at its original time). Feedback is sent in
batches; requests run on a few concurrent connections, bounded in count, to the local service only.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pyarrow as pa

from common.console import progress

FEEDBACK_BATCH = 200


def replay(
    url: str,
    interactions: pa.Table,
    *,
    k: int = 10,
    concurrency: int = 4,
    send_feedback: bool = True,
    known_users: Collection[str] = (),
    progress_label: str = "simulated users",
) -> dict[str, Any]:
    """Replay ``interactions`` (the canonical INTERACTIONS schema) against the service at ``url``.
    ``explained_share``: of the answers to ``known_users`` (users with a server-side history), the share
    with a non-empty ``because`` on some item: a personal answer, not the popularity fallback."""
    rows = interactions.to_pylist()
    latencies: list[float] = []
    hits, errors, known, explained = 0, 0, 0, 0
    versions: set[str] = set()
    known_users = set(known_users)

    with httpx.Client(base_url=url, timeout=60.0) as client:

        def recommend(row: dict[str, Any]) -> tuple[float, dict | None]:
            started = time.perf_counter()
            response = client.post("/v1/recommend", json={"user_id": row["user_id"], "k": k})
            elapsed = (time.perf_counter() - started) * 1000
            return elapsed, response.json() if response.status_code == 200 else None

        with ThreadPoolExecutor(concurrency) as pool:
            answers = progress(pool.map(recommend, rows), desc=progress_label, total=len(rows), unit="request")
            for row, (latency, body) in zip(rows, answers):
                latencies.append(latency)
                if body is None:
                    errors += 1
                    continue
                hits += any(item["item_id"] == row["item_id"] for item in body["items"])
                versions.add(body["model_version"])
                if row["user_id"] in known_users:
                    known += 1
                    explained += any(item["because"] for item in body["items"])

        logged = 0
        if send_feedback:
            for start in range(0, len(rows), FEEDBACK_BATCH):
                events = [
                    {
                        "user_id": row["user_id"],
                        "item_id": row["item_id"],
                        "event": row["event"],
                        "value": row["value"],
                        "ts": int(row["timestamp"]) * 1000,
                    }
                    for row in rows[start : start + FEEDBACK_BATCH]
                ]
                response = client.post("/v1/feedback", json={"events": events})
                if response.status_code >= 300:
                    errors += 1
                else:
                    logged += len(events)

    served = len(rows) - errors if rows else 0
    return {
        "requests": len(rows),
        "errors": errors,
        "hit_rate": hits / served if served else 0.0,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else 0.0,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else 0.0,
        "feedback_events": logged,
        "model_versions": sorted(versions),
        "explained_share": explained / known if known else float("nan"),
    }
