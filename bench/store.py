"""The UserStateStore's cold-start answer against the size of the catalogue.

A user the model knows nothing about is answered from the ``state.popular_items`` most popular items, which the
single UserStateStore replica computes for every batch of such requests, between the feedback it applies. This
measures, in one process and side by side on the same counts, ``ServerState.popular`` (items kept in order as they
are counted) against sorting the whole popularity counter per answer (what it did before), and what keeping the
order adds to each event the store applies.

The counts: ``--events`` feedback events per item over N Zipf-popular items (so every item is counted, with many
ties), recorded through ``ServerState.record`` as the store's rebuild does. Then ``--rounds`` times: one more event
(an item drawn the same way) and one cold-start answer, each timed; the medians are reported.

    .venv/bin/python bench/store.py --items 10000 100000 1000000 --write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import machine, publish  # noqa: E402
from serve.config import StateConfig  # noqa: E402
from serve.state import ServerState  # noqa: E402

SECTION = "## Store: cold-start answers against the catalogue (bench/store.py)"


def measure(num_items: int, events_per_item: int, rounds: int, answer: int) -> dict:
    generator = np.random.default_rng(0)
    draws = lambda count: (generator.zipf(1.2, size=count) - 1) % num_items  # noqa: E731
    state, unordered = (ServerState(StateConfig(), Path("/nonexistent/items.jsonl")) for _ in range(2))
    items = np.concatenate([np.arange(num_items), draws(num_items * (events_per_item - 1))])
    started = time.perf_counter()
    for ts, item in enumerate(items.tolist()):
        state.record(f"u{ts % 1000}", str(item), ts)
    rebuild_s = time.perf_counter() - started
    for ts, item in enumerate(items.tolist()):
        unordered.record(f"u{ts % 1000}", str(item), ts)
    started = time.perf_counter()
    state.popular(answer)  # the first answer puts every counted item in order
    first_s = time.perf_counter() - started

    record_ms, unordered_record_ms, kept_ms, sorted_ms = [], [], [], []
    for step, item in enumerate(draws(rounds).tolist()):
        started = time.perf_counter()
        state.record(f"u{step % 1000}", str(item), len(items) + step)
        record_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        unordered.record(f"u{step % 1000}", str(item), len(items) + step)  # a store that never answered: no order kept
        unordered_record_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        kept = state.popular(answer)
        kept_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        full = sorted(state.popularity.items(), key=lambda pair: (-pair[1], pair[0]))[:answer]
        sorted_ms.append(1000 * (time.perf_counter() - started))
        assert kept == full, "the kept order differs from a sort of the counts"
    return {
        "items": num_items,
        "events": len(items) + rounds,
        "rebuild_s": rebuild_s,
        "first_answer_ms": 1000 * first_s,
        "record_ms": statistics.median(record_ms),
        "unordered_record_ms": statistics.median(unordered_record_ms),
        "answer_ms": statistics.median(kept_ms),
        "sorted_answer_ms": statistics.median(sorted_ms),
    }


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        SECTION,
        "",
        f"Machine: {machine('numpy', 'sortedcontainers')}. Command: `.venv/bin/python bench/store.py --items "
        f"{' '.join(str(row['items']) for row in rows)} --events-per-item {args.events_per_item} --rounds {args.rounds} --write`.",
        "",
        f"A cold-start answer is the {args.answer} most popular items (`state.popular_items`); medians of {args.rounds} rounds of one",
        "event then one answer, both ways on the same counts in one process (every answer checked equal to the sort's).",
        "",
        "| items | events counted | rebuild's counting (s) | first answer (ms) | answer, kept in order (ms) | answer, sorting the counts (ms) "
        "| ratio | one event, order kept (ms) | one event, no order (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['items']:,} | {row['events']:,} | {row['rebuild_s']:.1f} | {row['first_answer_ms']:.0f} | {row['answer_ms']:.3f} | "
            f"{row['sorted_answer_ms']:.1f} | {row['sorted_answer_ms'] / row['answer_ms']:,.0f}x | {row['record_ms']:.4f} | {row['unordered_record_ms']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--events-per-item", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--answer", type=int, default=StateConfig().popular_items)
    parser.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md")
    args = parser.parse_args()
    rows = [measure(items, args.events_per_item, args.rounds, args.answer) for items in args.items]
    publish(SECTION, report(rows, args), write=args.write)


if __name__ == "__main__":
    main()
