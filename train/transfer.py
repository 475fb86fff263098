"""A model artifact carried over to another preprocessing output's vocabularies, by id.

Every preprocessing run numbers its vocabularies afresh (ids in sorted order), so when data is added an item's or
a user's index changes while its id stays. Two things carry a model over by id, through the same functions here:
the retrain's warm start (``train.trainer.warm_start``: a new model initialised from the served one) and
evaluation on another output's split (``reindex_artifact``, behind ``train.evaluate.evaluate_on``: the served
model itself scored on the candidate's split, so that the promotion gate compares both versions on the same rows).

What the artifact never saw, it knows nothing about: the ``VocabularyTable`` row of an id it never saw is zero, as
a row that never trained is (no id embedding, no biases, no user embedding). An item it never saw is a cold item
to it, represented by its text alone, which the artifact's own tokenizer and backbone read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from common.errors import InputError
from common.storage import Location, read_table, resolve
from data import schema
from data.features import RatingNormalisation, rating_offsets_by_index
from data.manifest import load_manifest
from train.artifact import ITEMS_FILE, USERS_FILE, LoadedArtifact, artifact_rating, load_artifact, local_artifact, read_metadata
from train.model import CatalogFeatures, PolyrecModel
from train.tasks import VocabularyTable


def rows_by_id(artifact_path: str | Path, data: Location) -> dict[str, np.ndarray]:
    """For the item and the user vocabulary of ``data``: the row each index had in the artifact's model
    (-1 for an id it did not know; row 0, padding and unknown users, maps to itself)."""
    rows = {}
    for vocabulary, path, table_file in (("item", schema.ITEM_VOCAB_PATH, ITEMS_FILE), ("user", schema.USER_VOCAB_PATH, USERS_FILE)):
        id_column, idx_column = f"{vocabulary}_id", f"{vocabulary}_idx"
        old = pq.read_table(local_artifact(artifact_path) / table_file, columns=[id_column, idx_column])
        old_row = dict(zip(old[id_column].to_pylist(), old[idx_column].to_pylist()))
        new = read_table(data, path)
        mapping = np.full(int(pc.max(new[idx_column]).as_py() or 0) + 1, -1, dtype=np.int64)
        mapping[0] = 0
        mapping[new[idx_column].to_numpy()] = [old_row.get(item_or_user, -1) for item_or_user in new[id_column].to_pylist()]
        rows[vocabulary] = mapping
    return rows


def carry_rows_by_id(initial: Tensor, source: Tensor, rows: np.ndarray) -> Tensor:
    """``initial`` (a table over the new vocabulary) with row i taken from ``source`` (the artifact's table) wherever
    ``rows[i]`` (from ``rows_by_id``) is a row the source has; the rows of ids it never saw stay as they are."""
    old_rows = torch.as_tensor(np.array(rows[: len(initial)]))  # a copy: the rows arrive read-only from the object store
    known = (old_rows >= 0) & (old_rows < len(source))
    carried = initial.clone()
    carried[known] = source[old_rows[known]].to(carried.dtype)
    return carried


def load_state_by_id(model: nn.Module, source: Mapping[str, Tensor], rows: Mapping[str, np.ndarray]) -> list[str]:
    """Load ``source``, the state dict of a model over other vocabularies, into ``model``: each ``VocabularyTable``
    row by id (``rows`` by vocabulary, from ``rows_by_id``; ids new to ``model`` keep their zero rows), every other
    parameter where its shape is unchanged. Buffers are left alone: they describe the catalogue ``model`` was built
    on. Returns the names loaded."""
    target = model.state_dict()
    tables = {f"{name}.weight": module.vocabulary for name, module in model.named_modules() if isinstance(module, VocabularyTable)}
    buffers = {name for name, _ in model.named_buffers()}
    carried = {}
    for name, tensor in source.items():
        if name not in target or name in buffers:
            continue
        if name in tables:
            carried[name] = carry_rows_by_id(target[name], tensor, rows[tables[name]])
        elif target[name].shape == tensor.shape:
            carried[name] = tensor
    model.load_state_dict(carried, strict=False)
    return list(carried)


@dataclass(frozen=True)
class RatingScales:
    """How an artifact and a preprocessing output normalise ratings, per user of the output (matched by id).

    Both follow ``data.features.RatingNormalisation`` (``normalised = (raw - shift - offset[user]) / scale``), each
    with its own settings and per-user offsets, which move whenever a user's training ratings do: the artifact's
    model reads and predicts ratings normalised its way, the output holds them normalised its own way. A user the
    artifact never saw gets the mean of its users' offsets (0 unless it centres ratings per user)."""

    artifact: RatingNormalisation
    data: RatingNormalisation
    artifact_offsets: np.ndarray  # [U+1] by the output's user_idx
    data_offsets: np.ndarray  # [U+1]

    @classmethod
    def between(cls, artifact_path: str | Path, data_uri: str) -> RatingScales:
        """From the artifact's ``artifact.json`` and users table and the output's manifest and user vocabulary."""
        data = resolve(data_uri)
        artifact_users = pq.read_table(local_artifact(artifact_path) / USERS_FILE, columns=["user_idx", "rating_offset"])
        own_offsets = torch.from_numpy(rating_offsets_by_index(artifact_users))
        unknown_user_offset = float(own_offsets[1:].mean()) if len(own_offsets) > 1 else 0.0
        user_rows = rows_by_id(artifact_path, data)["user"]
        artifact_offsets = carry_rows_by_id(torch.full((len(user_rows),), unknown_user_offset, dtype=torch.float64), own_offsets, user_rows)
        return cls(
            artifact=artifact_rating(read_metadata(artifact_path)),
            data=load_manifest(data_uri).rating,
            artifact_offsets=artifact_offsets.numpy(),
            data_offsets=rating_offsets_by_index(read_table(data, schema.USER_VOCAB_PATH)),
        )

    def to_artifact(self, normalised: Tensor, user_idx: Tensor) -> Tensor:
        """Ratings [B, L] of users ``user_idx`` [B], normalised the output's way → the artifact's way (NaN stays NaN).
        One affine map per user, so it is exactly the identity when both ways agree."""
        scale = self.data.scale / self.artifact.scale
        shift = (self.data.shift - self.artifact.shift + self.data_offsets - self.artifact_offsets) / self.artifact.scale
        return normalised * scale + torch.from_numpy(shift).to(normalised)[user_idx].unsqueeze(-1)

    def denormalise(self, normalised: np.ndarray, user_idx: np.ndarray) -> np.ndarray:
        """The artifact's rating predictions → the raw scale (a ``data.features.RatingDenormaliser``)."""
        return self.artifact.invert(normalised, self.artifact_offsets[user_idx])


class ReindexedArtifact(nn.Module):
    """An artifact's model re-indexed to a preprocessing output's vocabularies, as a scorer (``train.evaluate``) of
    that output's batches: their ratings are put on the model's own normalisation before it reads them, and its
    rating predictions stay on that normalisation (``ratings.denormalise`` takes them to the raw scale)."""

    def __init__(self, model: PolyrecModel, ratings: RatingScales):
        super().__init__()
        self.model = model
        self.ratings = ratings

    def _on_model_scale(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if batch.get("input_ratings") is None:
            return dict(batch)
        return {**batch, "input_ratings": self.ratings.to_artifact(batch["input_ratings"], batch["user_idx"])}

    def full_sort_predict(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.model.full_sort_predict(self._on_model_scale(batch))

    def predict(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.model.predict(self._on_model_scale(batch))


def reindex_artifact(artifact_path: str | Path, data_uri: str) -> ReindexedArtifact:
    """The artifact's model over the vocabularies of the preprocessing output ``data_uri``, in eval mode: every
    weight is the artifact's, its per-item and per-user rows moved to the output's indices by id; the items and
    users it never saw are what the module docstring says. Identical to the artifact's model on its own data."""
    artifact = load_artifact(artifact_path)
    data = resolve(data_uri)
    manifest = load_manifest(data_uri)
    rows = rows_by_id(artifact.path, data)
    items = read_table(data, schema.ITEMS_DIR).sort_by("item_idx")
    model = PolyrecModel(
        artifact.model.config,  # its backbone is the artifact's backbone/ folder
        num_users=manifest.num_users,
        num_items=manifest.num_items,
        num_attributes=artifact.model.num_attributes,
        catalog=_catalog(artifact, items, rows["item"]),
        rating_mean=artifact.model.rating_mean,
    )
    source = artifact.model.state_dict()
    loaded = set(load_state_by_id(model, source, rows))
    buffers = {name for name, _ in model.named_buffers()}
    left_out = [name for name in source if name not in loaded and name not in buffers]
    if left_out:  # a per-item or per-user tensor that is not a VocabularyTable would be left random
        raise RuntimeError(f"{artifact.path}: {left_out[:5]} could not be carried over to the vocabularies of {data_uri}")
    model.eval()
    if hasattr(model.item_encoder, "text_embeddings"):
        _pool_catalogue_text(model, artifact.model.item_encoder.text_embeddings, rows["item"])
    return ReindexedArtifact(model, RatingScales.between(artifact.path, data_uri)).eval()


def _catalog(artifact: LoadedArtifact, items: pa.Table, item_rows: np.ndarray) -> CatalogFeatures:
    """The output's catalogue as the artifact sees it: for the items it knows, by id, its own token ids and
    attributes; for the others, the output's text through its tokenizer, and no attributes (the artifact's
    attribute vocabulary is not the output's, and it is not recorded)."""
    own = artifact.model
    new_items = torch.from_numpy(np.flatnonzero(item_rows < 0))
    is_cold = torch.zeros(len(item_rows), dtype=torch.bool)
    is_cold[1:] = torch.from_numpy(items["is_cold"].to_numpy(zero_copy_only=False))
    is_cold[new_items] = True  # never trained, as far as the artifact goes

    own_attributes = own.tasks["attributes"].item_attributes if "attributes" in own.tasks else None
    attributes = torch.zeros(len(item_rows), own.num_attributes + 1)
    if own_attributes is not None:
        attributes = carry_rows_by_id(attributes, own_attributes, item_rows)

    if own.item_encoder.backbone is None:  # no text: the token ids are never read
        placeholder = torch.zeros((len(item_rows), 1), dtype=torch.long)
        return CatalogFeatures(placeholder, placeholder, attributes, is_cold)
    own_ids, own_mask = own.item_encoder.input_ids, own.item_encoder.attention_mask
    input_ids = carry_rows_by_id(own_ids.new_zeros((len(item_rows), own_ids.shape[1])), own_ids, item_rows)
    attention_mask = carry_rows_by_id(own_mask.new_zeros((len(item_rows), own_mask.shape[1])), own_mask, item_rows)
    if len(new_items):
        texts = items["text"].take(pa.array(new_items.numpy() - 1)).to_pylist()
        input_ids[new_items], attention_mask[new_items] = _tokenise(artifact, texts, width=own_ids.shape[1])
    return CatalogFeatures(input_ids, attention_mask, attributes, is_cold)


def _tokenise(artifact: LoadedArtifact, texts: list[str], width: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids and mask [n, width]: at most as many tokens as the artifact kept for its own items,
    as serving encodes new items."""
    tokenizer = artifact.tokenizer
    if tokenizer is None:
        raise InputError(f"{artifact.path}: the artifact has no tokenizer, so it cannot encode the text of the {len(texts)} items it never saw")
    tokenizer.padding_side = "right"
    tokens = tokenizer(texts, max_length=width, truncation=True, padding="max_length", return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def _pool_catalogue_text(model: PolyrecModel, own_pooled: Tensor, item_rows: np.ndarray) -> None:
    """Frozen mode: the artifact's pooled text of the items it knows, by id; the backbone runs for the others only."""
    encoder = model.item_encoder
    pooled = carry_rows_by_id(torch.zeros_like(encoder.text_embeddings), own_pooled, item_rows)
    new_items = torch.from_numpy(np.flatnonzero(item_rows < 0))
    if len(new_items):
        with torch.no_grad():
            pooled[new_items] = encoder.pooled_text(encoder.input_ids[new_items], encoder.attention_mask[new_items])
    encoder.text_embeddings.copy_(pooled)
    encoder.text_cache_ready = True
