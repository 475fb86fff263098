"""The fingerprint of a leave-one-out split: what the peers train and are tested on, and nothing else.

A preprocessing output's ``content_hash`` also changes when its format does (a new column, a schema
version), which does not change what a peer saw. The peers' results stay valid exactly as long as this
fingerprint does: every user's training items in order (however they are cut into rows), and the
validation and test rows' user, earlier items and target. Imported by ``peers.py`` (its own virtual
environment) and ``run.py``; needs pyarrow only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq


def split_hash(data_dir: Path) -> str:
    digest = hashlib.sha256()
    train = pq.read_table(data_dir / "sequences" / "train", columns=["user_idx", "timestamps", "items"]).to_pydict()
    rows = sorted((user, times[0], times[-1], items) for user, times, items in zip(*train.values()))
    by_user: dict[int, list[int]] = {}
    for user, _, _, items in rows:  # a user's rows in time order
        by_user.setdefault(user, []).extend(items)
    digest.update(json.dumps(sorted(by_user.items())).encode())
    for split in ("validation", "test"):
        rows = pq.read_table(data_dir / "sequences" / split, columns=["user_idx", "seen_items", "target_item"]).to_pydict()
        digest.update(json.dumps(sorted(zip(rows["user_idx"], rows["seen_items"], rows["target_item"]))).encode())
    return digest.hexdigest()
