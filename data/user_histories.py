"""The users' known histories, the part of a preprocessing output that serving starts from
(``data.schema.USER_HISTORIES`` under ``USER_HISTORIES_DIR``).

``data.splits`` builds the rows per partition with ``user_histories``, ``data.pipeline`` writes them, and
the service reads them back with ``read_user_histories``: ids, times in milliseconds and raw values, so
that serving never undoes vocabularies, sequences or the rating normalisation.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import storage
from data.manifest import load_manifest
from data.schema import USER_HISTORIES, USER_HISTORIES_DIR


def user_histories(rows: pa.Table, withheld: np.ndarray) -> pa.Table:
    """USER_HISTORIES of a partition's kept interactions in history order (``user_id``, ``item_id``,
    ``timestamp``, ``value``), less the rows ``withheld`` marks (training interactions of cold items)."""
    known = rows.filter(pa.array(~withheld))
    columns = {"user_id": known["user_id"], "item_id": known["item_id"], "ts": pc.multiply(known["timestamp"], 1000), "rating": known["value"]}
    return pa.table(columns, schema=USER_HISTORIES)


def read_user_histories(data_dir: str) -> pa.Table:
    """USER_HISTORIES of the preprocessing output at ``data_dir`` (a path or URI), each user's rows in time order;
    ``InputError`` when the folder is no preprocessing output of this schema version."""
    load_manifest(data_dir)
    return storage.read_table(storage.resolve(data_dir), USER_HISTORIES_DIR)
