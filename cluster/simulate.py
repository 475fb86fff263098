"""Simulated users: replay real interactions through the recommendation service's HTTP API.

For each interaction, in time order, the user first asks for recommendations (was the item they really chose
among them?), then reports what they did as feedback (a rating at its original time). Feedback is sent in
batches; requests run on a few concurrent connections, bounded in count, to the local service only.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pyarrow as pa

FEEDBACK_BATCH = 200


def replay(url: str, interactions: pa.Table, *, k: int = 10, concurrency: int = 4, send_feedback: bool = True) -> dict[str, Any]:
    """Replay ``interactions`` (the canonical INTERACTIONS schema) against the service at ``url``."""
    rows = interactions.to_pylist()
    latencies: list[float] = []
    hits, errors = 0, 0
    versions: set[str] = set()

    with httpx.Client(base_url=url, timeout=60.0) as client:

        def recommend(row: dict[str, Any]) -> tuple[bool, float, str | None]:
            started = time.perf_counter()
            response = client.post("/v1/recommend", json={"user_id": row["user_id"], "k": k})
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                return False, elapsed, None
            body = response.json()
            return any(item["item_id"] == row["item_id"] for item in body["items"]), elapsed, body["model_version"]

        with ThreadPoolExecutor(concurrency) as pool:
            for hit, latency, version in pool.map(recommend, rows):
                latencies.append(latency)
                if version is None:
                    errors += 1
                else:
                    hits += hit
                    versions.add(version)

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
    }
