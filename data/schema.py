"""The canonical data contracts of polyrec, defined once.

Every reader produces the *canonical* tables below; every later stage reads the
*output* tables written by ``data.pipeline``; the serving stage writes the
*feedback log*. Other stages import these names, never redefine them.
"""

from __future__ import annotations

import pyarrow as pa

#: The layout of a preprocessing output; ``data.manifest.load_manifest`` refuses an output of another version.
SCHEMA_VERSION = 5

# --- What readers produce -------------------------------------------------------------------

#: One row per interaction, in the order the source gave them.
INTERACTIONS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since the epoch
        pa.field("event", pa.string(), nullable=False),  # rate, click, like, purchase, view, ...
        pa.field("value", pa.float64()),  # rating or weight; null when the event has none
        pa.field("source", pa.string(), nullable=False),  # "<file>:<line>" of the source row
    ]
)

#: Item text fields a reader may fill; any subset is allowed, ``item_id`` is required. ``full_text``, when set,
#: is the item's whole text, encoded as it is instead of the text template's rendering of the others.
ITEM_TEXT_FIELDS = ("title", "year", "genres", "tags", "description", "brand", "category", "full_text")

#: Fields that become the multi-label ``attributes`` task (list<string> columns).
ITEM_ATTRIBUTE_FIELDS = ("genres", "category")

#: One row per item; a reader leaves null what its source lacks.
ITEMS_BASE = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("year", pa.int32()),
        pa.field("genres", pa.list_(pa.string())),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("description", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("category", pa.list_(pa.string())),
        # The item's whole text as its source wrote it, tokenised as is instead of features.text_template's
        # rendering: an item registered through the service keeps the text the service encoded.
        pa.field("full_text", pa.string()),
    ]
)

#: Users: ``user_id`` plus whatever attributes the source has (all strings).
USER_ID_FIELD = pa.field("user_id", pa.string(), nullable=False)

#: Every dropped row, with why and where it came from.
QUARANTINE = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),  # read, clean:<step>, ...
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "<file>:<line>" or "<file>:row <n>"
        pa.field("record", pa.string()),  # the raw line or a JSON rendering of the row
    ]
)

# --- The feedback log, written by serve/ and read back by data/ for retraining ---------------

FEEDBACK_LOG = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),  # milliseconds since the epoch
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),  # impression, click, like, rate, ...
        pa.field("value", pa.float64()),  # rating, or the ranking score of an impression
        pa.field("request_id", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("position", pa.int32()),  # rank of the item in an impression, else null
    ]
)

# --- What data.pipeline writes --------------------------------------------------------------

#: vocab/users.parquet and vocab/items.parquet: index 0 is reserved for padding.
PAD_INDEX = 0
USER_VOCAB = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("user_idx", pa.int32(), nullable=False),
        # Per-user part of the rating normalisation (0 unless per-user centring):
        # normalised = (raw - manifest.rating.shift - rating_offset) / manifest.rating.scale
        pa.field("rating_offset", pa.float32(), nullable=False),
    ]
)
ITEM_VOCAB = pa.schema([pa.field("item_id", pa.string(), nullable=False), pa.field("item_idx", pa.int32(), nullable=False)])
ATTRIBUTE_VOCAB = pa.schema([pa.field("attribute", pa.string(), nullable=False), pa.field("attribute_idx", pa.int32(), nullable=False)])

#: items/*.parquet: one row per vocabulary item (ITEMS_BASE fields are kept beside these).
ITEM_FEATURES = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # full_text when the item has one, else the template rendered
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # unpadded token ids
        pa.field("attributes", pa.list_(pa.int32()), nullable=False),  # attribute_idx values
        pa.field("is_cold", pa.bool_(), nullable=False),  # withheld from training
    ]
)

#: items/*.parquet as written: ITEM_FEATURES with the item's ITEMS_BASE fields beside them.
ITEMS_OUTPUT = pa.schema([*ITEM_FEATURES, *(f for f in ITEMS_BASE if f.name != "item_id")])

#: cold_items.parquet: the items withheld from training (``SplitConfig.cold_item_fraction``).
COLD_ITEMS = pa.schema([pa.field("item_id", pa.string(), nullable=False), pa.field("item_idx", pa.int32(), nullable=False)])

#: sequences/train/*.parquet: a user's training interactions, time-ordered, in consecutive rows of
#: ``max_history`` next-item targets (a user can have several; each interaction is in the ``items`` of
#: one row; the user's oldest row holds fewer, plus the first item, which is nobody's target).
#: ``history`` holds the user's training items just before the row's first (at most ``max_history``;
#: they are the ``items`` of earlier rows), the context that predicts the row's first item.
TRAIN_SEQUENCE = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("items", pa.list_(pa.int32()), nullable=False),
        pa.field("ratings", pa.list_(pa.float32()), nullable=False),  # normalised; NaN if none
        pa.field("likes", pa.list_(pa.int8()), nullable=False),  # 1, 0, or -1 when unknown
        pa.field("timestamps", pa.list_(pa.int64()), nullable=False),
        pa.field("history", pa.list_(pa.int32()), nullable=False),  # earlier training items, oldest first
        pa.field("history_ratings", pa.list_(pa.float32()), nullable=False),  # theirs, normalised; NaN if none
    ]
)

#: sequences/{validation,test}/*.parquet: one row per target interaction.
EVAL_SEQUENCE = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("history", pa.list_(pa.int32()), nullable=False),  # last max_history items
        pa.field("history_ratings", pa.list_(pa.float32()), nullable=False),  # theirs, normalised; NaN if none
        pa.field("seen_items", pa.list_(pa.int32()), nullable=False),  # every earlier item
        pa.field("target_item", pa.int32(), nullable=False),
        pa.field("target_rating", pa.float32()),  # normalised; NaN if none
        pa.field("target_rating_raw", pa.float32()),
        pa.field("target_like", pa.int8(), nullable=False),
        pa.field("target_timestamp", pa.int64(), nullable=False),
        pa.field("is_cold_target", pa.bool_(), nullable=False),
    ]
)

#: user_histories/*.parquet: the users' known recent histories, what serving starts from: each user's training
#: interactions (those of cold items withheld, as in TRAIN_SEQUENCE) and validation and test targets, by id, with
#: the source's raw value, so that a reader needs neither the vocabularies nor the rating normalisation. Each
#: file holds whole users, each user's rows in time order (ties in source order).
USER_HISTORIES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),  # milliseconds since the epoch, as in FEEDBACK_LOG
        pa.field("rating", pa.float64()),  # the interaction's raw value (INTERACTIONS.value); null when none
    ]
)

#: Paths inside a preprocessing output, relative to its root.
MANIFEST_FILE = "manifest.json"
USER_VOCAB_PATH = "vocab/users.parquet"
ITEM_VOCAB_PATH = "vocab/items.parquet"
ATTRIBUTE_VOCAB_PATH = "vocab/attributes.parquet"
ITEMS_DIR = "items"
SEQUENCES_DIR = "sequences"  # + /train, /validation, /test
USER_HISTORIES_DIR = "user_histories"
QUARANTINE_DIR = "quarantine"
COLD_ITEMS_PATH = "cold_items.parquet"
SPLITS = ("train", "validation", "test")
