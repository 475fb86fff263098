"""The training windows, cut from the training sequences in Ray Data's workers.

pyarrow only: a Ray Data worker that runs ``training_windows`` imports this module, and one that imported torch with
the trainer would spend seconds on it for every training.
"""

from __future__ import annotations

import pyarrow as pa


def training_windows(rows: pa.Table, max_history: int, window_targets: int) -> pa.Table:
    """TRAIN_SEQUENCE rows → training windows of at most ``max_history + 1`` items, each training the
    next-item targets of its last ``window_targets`` (at most ``max_history``) positions, or of all its
    positions when it starts at the row's first item; ``context`` counts the leading positions whose
    targets another window trains.

    A row's ``history`` is context for its first items, so every item of ``items`` that has anything
    before it is a target exactly once, with at least ``max_history - window_targets + 1`` items before
    it (or all there are), as evaluation's targets have ``max_history``. Chunks alone would give the
    first targets of each chunk almost none."""
    step = min(window_targets, max_history)
    windows: dict[str, list] = {"user_idx": [], "items": [], "ratings": [], "likes": [], "context": []}
    columns = rows.select(["user_idx", "history", "history_ratings", "items", "ratings", "likes"]).to_pydict()
    for user, history, history_ratings, items, ratings, likes in zip(*columns.values()):
        sequence, sequence_ratings = history + items, history_ratings + ratings
        sequence_likes = [-1] * len(history) + likes
        first_target = max(len(history), 1)
        end = len(sequence)
        while end > first_target:
            begin = max(0, end - 1 - max_history)
            # A window from the row's start sees all the context there is: smaller ones would only repeat it.
            trained_from = first_target if begin == 0 else max(first_target, end - step)
            windows["user_idx"].append(user)
            windows["items"].append(sequence[begin:end])
            windows["ratings"].append(sequence_ratings[begin:end])
            windows["likes"].append(sequence_likes[begin:end])
            windows["context"].append(trained_from - 1 - begin)
            end = trained_from
    types = {"user_idx": pa.int32(), "items": pa.list_(pa.int32()), "ratings": pa.list_(pa.float32()), "likes": pa.list_(pa.int8()), "context": pa.int32()}
    return pa.table({name: pa.array(values, types[name]) for name, values in windows.items()})
