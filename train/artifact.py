"""The model artifact handed to serving: safetensors, JSON and Parquet only (no pickle).

Layout of an artifact folder::

    artifact.json              format_version, model_version, model_config, num_users/items/attributes,
                               rating_mean, rating (normalisation), data_manifest_hash, training_data (the
                               preprocessing output it was trained on), backbone_pretraining (polyrec pretrain's
                               provenance, when the backbone came from it), metrics ({"validation": ..., "test": ...}),
                               created_at
    model.safetensors          the state dict; in frozen mode without the backbone (its pooled catalogue
                               text is there, as the ``text_embeddings`` buffer)
    item_vectors.safetensors   "item_vectors": the item table [N+1, d]
    backbone/                  the backbone (LoRA merged) and tokenizer, save_pretrained, so new items
                               can be encoded; absent when the model does not use text
    items.parquet              item_idx, item_id, title, text, attributes, year, genres (null where the data has none)
    users.parquet              user_id, user_idx, rating_offset

``load_artifact`` needs only torch, transformers and safetensors. An artifact may also live at a pyarrow filesystem
URI (``s3://``, ``gs://``): it is read from a local copy (``local_artifact``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from common import storage
from common.config import validation_problems
from common.errors import InputError
from data.features import RatingNormalisation
from train.backbone import pretraining_provenance, save_backbone
from train.config import ModelConfig
from train.model import CatalogFeatures, PolyrecModel

FORMAT_VERSION = 1
METADATA_FILE = "artifact.json"
MODEL_FILE = "model.safetensors"
ITEM_VECTORS_FILE = "item_vectors.safetensors"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
BACKBONE_DIR = "backbone"
ARTIFACT_FILES = (METADATA_FILE, MODEL_FILE, ITEM_VECTORS_FILE, ITEMS_FILE, USERS_FILE)
#: Where in a training's output folder its artifact is (``polyrec train --output DIR`` writes ``DIR/artifact``).
TRAINED_ARTIFACT_DIR = "artifact"
#: What save_pretrained writes for a model and its tokenizer, all plain data (vocabularies and
#: chat templates are text).
BACKBONE_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja")
ITEM_COLUMNS = ("item_idx", "item_id", "title", "text", "attributes")
#: What people are shown of an item beside its title, kept when the data has it: serving reads it from the artifact, so
#: an artifact copied without its training data still shows it. Older artifacts lack these columns.
ITEM_DISPLAY_FIELDS = {"year": pa.int32(), "genres": pa.list_(pa.string())}
USER_COLUMNS = ("user_id", "user_idx", "rating_offset")
BACKBONE_PREFIX = "item_encoder.backbone."
#: Local copies of artifacts read from URIs, one folder per URI and content of its artifact.json.
ARTIFACT_CACHE = Path.home() / ".cache" / "polyrec" / "artifacts"


@dataclass
class LoadedArtifact:
    path: Path
    model: PolyrecModel  # in eval mode, item table cached from item_vectors.safetensors
    config: ModelConfig
    items: pa.Table
    users: pa.Table
    item_vectors: Tensor  # [N+1, d]
    metadata: dict[str, Any]  # artifact.json

    @property
    def model_version(self) -> str:
        return self.metadata["model_version"]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.model.tokenizer


def _backbone_saved_in_state(config: ModelConfig) -> bool:
    return config.backbone.mode != "frozen"


def refuse_existing_artifact(out_dir: Path) -> None:
    """An artifact is never overwritten: raise if ``out_dir`` holds anything."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: an artifact is already there (the folder is not empty) and is never overwritten; choose another output")


def save_artifact(
    model: PolyrecModel,
    out_dir: str | Path,
    *,
    items: pa.Table,
    users: pa.Table,
    model_version: str,
    data_manifest_hash: str,
    metrics: Mapping[str, Mapping[str, float]],
    rating: Mapping[str, Any],
    training_data: str | None = None,
) -> Path:
    """Write the artifact to ``out_dir`` (new or empty), atomically: a partial folder never appears
    under that name. ``items`` is the data output's items table, ``users`` its user vocabulary,
    ``metrics`` the figures by split (``{"validation": {...}, "test": {...}}``), ``rating`` the
    manifest's rating normalisation, ``training_data`` the preprocessing output (path or URI) the
    model was trained on, whose histories serving loads by default."""
    out_dir = Path(out_dir)
    refuse_existing_artifact(out_dir)
    item_table = _select(items, ITEM_COLUMNS + tuple(ITEM_DISPLAY_FIELDS), "items", optional={"title": pa.string(), **ITEM_DISPLAY_FIELDS})
    item_table = item_table.sort_by("item_idx")
    user_table = _select(users, USER_COLUMNS, "users")

    model.eval()
    item_vectors = model.refresh_item_cache()
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if _backbone_saved_in_state(model.config) or not name.startswith(BACKBONE_PREFIX)
    }
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "model_config": model.config.model_dump(mode="json"),
        "num_users": model.num_users,
        "num_items": model.num_items,
        "num_attributes": model.num_attributes,
        "rating_mean": model.rating_mean,
        "rating": dict(rating),
        "data_manifest_hash": data_manifest_hash,
        "training_data": training_data,
        # polyrec_pretrain.json of a backbone `polyrec pretrain` made (source, data, objective, steps, loss); else None
        "backbone_pretraining": pretraining_provenance(model.config.backbone) if model.item_encoder.backbone is not None else None,
        "metrics": json.loads(json.dumps(metrics, default=float)),  # numpy / torch scalars → floats
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }

    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        save_file(state, staging / MODEL_FILE, metadata={"format": "pt"})
        save_file({"item_vectors": item_vectors.detach().cpu().contiguous()}, staging / ITEM_VECTORS_FILE, metadata={"format": "pt"})
        if model.item_encoder.backbone is not None:
            save_backbone(model.item_encoder.backbone, model.tokenizer, staging / BACKBONE_DIR)
        pq.write_table(item_table, staging / ITEMS_FILE)
        pq.write_table(user_table, staging / USERS_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _select(table: pa.Table, columns: tuple[str, ...], what: str, optional: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    selected = {}
    for name in columns:
        if name in table.column_names:
            selected[name] = table.column(name)
        elif name in (optional or {}):
            selected[name] = pa.nulls(len(table), optional[name])
        else:
            raise InputError(f"{what} table: missing field '{name}'")
    return pa.table(selected)


def local_artifact(path: str | Path) -> Path:
    """The artifact folder ``path`` on local disk: a local path as it is; a URI is copied once into ``ARTIFACT_CACHE``.

    The copy is keyed by the URI and its ``artifact.json`` (an artifact is never overwritten, and its metadata
    carries its version and creation time), and it appears by a rename once complete, so concurrent readers
    (serving replicas, training workers) share it and never see half of it."""
    if "://" not in str(path):
        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder (a model artifact was expected)")
        if not (folder / METADATA_FILE).is_file():
            trained = folder / TRAINED_ARTIFACT_DIR
            hint = f"; it is a training's output, whose artifact is {trained}" if (trained / METADATA_FILE).is_file() else ""
            raise InputError(f"{folder}: not a model artifact ({METADATA_FILE} not found){hint}")
        return folder
    location, metadata = _remote_metadata(path)
    copy = ARTIFACT_CACHE / hashlib.sha256(f"{path}\n{metadata}".encode()).hexdigest()[:24]
    if not (copy / METADATA_FILE).is_file():
        partial = copy.with_name(f"{copy.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            storage.download_folder(location, partial)
            os.replace(partial, copy)
        except OSError:
            if not (copy / METADATA_FILE).is_file():  # else another process put its copy there first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return copy


def _remote_metadata(uri: str | Path) -> tuple[storage.Location, str]:
    """The artifact folder at ``uri`` and its ``artifact.json``'s text, unchecked."""
    location = storage.resolve(str(uri), "model")
    try:
        return location, storage.read_text(location, METADATA_FILE)
    except InputError:
        trained = f"{str(uri).rstrip('/')}/{TRAINED_ARTIFACT_DIR}"
        hint = f"; it is a training's output, whose artifact is {trained}" if storage.exists(location, f"{TRAINED_ARTIFACT_DIR}/{METADATA_FILE}") else ""
        raise InputError(f"{uri}: no model artifact there ({METADATA_FILE} not found){hint}") from None


def load_artifact(path: str | Path) -> LoadedArtifact:
    """The model (eval mode) and tables of an artifact folder (a local path or a URI)."""
    path = local_artifact(path)
    _check_listing(path)
    metadata = read_metadata(path)
    config = _model_config(path / METADATA_FILE, metadata)

    state = _read_safetensors(path / MODEL_FILE)
    item_vectors = _read_safetensors(path / ITEM_VECTORS_FILE).get("item_vectors")
    if item_vectors is None:
        raise InputError(f"{path / ITEM_VECTORS_FILE}: no 'item_vectors' tensor")

    num_items, num_attributes = metadata["num_items"], metadata["num_attributes"]
    token_ids = state.get("item_encoder.input_ids")
    catalog = CatalogFeatures.placeholder(num_items, num_attributes, token_ids.shape[1] if token_ids is not None else 1)
    backbone = config.backbone.model_copy(update={"name_or_path": str(path / BACKBONE_DIR), "random_init_config": None})
    model = PolyrecModel(
        config.model_copy(update={"backbone": backbone}),
        num_users=metadata["num_users"],
        num_items=num_items,
        num_attributes=num_attributes,
        catalog=catalog,
        rating_mean=metadata["rating_mean"],
    )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputError(f"{path / MODEL_FILE}: does not fit the model in {METADATA_FILE}: {err}") from None
    if not _backbone_saved_in_state(config):
        missing = [name for name in missing if not name.startswith(BACKBONE_PREFIX)]
    if missing or unexpected:
        raise InputError(f"{path / MODEL_FILE}: does not fit the model in {METADATA_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    expected_shape = (num_items + 1, config.user_model.hidden_size)
    if tuple(item_vectors.shape) != expected_shape:
        raise InputError(f"{path / ITEM_VECTORS_FILE}: item_vectors has shape {tuple(item_vectors.shape)}, expected {expected_shape}")
    model.eval()
    model.item_cache = item_vectors

    return LoadedArtifact(
        path=path,
        model=model,
        config=config,
        items=_read_parquet(path / ITEMS_FILE, ITEM_COLUMNS),
        users=_read_parquet(path / USERS_FILE, USER_COLUMNS),
        item_vectors=item_vectors,
        metadata=metadata,
    )


def _check_listing(path: Path) -> None:
    for entry in sorted(path.iterdir()):
        if entry.name == BACKBONE_DIR and entry.is_dir():
            for file in sorted(entry.iterdir()):
                if not file.is_file() or file.suffix not in BACKBONE_SUFFIXES:
                    raise InputError(f"{file}: not allowed in a model artifact's backbone (only {', '.join(BACKBONE_SUFFIXES)} files)")
        elif entry.name not in ARTIFACT_FILES or not entry.is_file():
            raise InputError(f"{entry}: not part of a model artifact (expected {', '.join(ARTIFACT_FILES)} and {BACKBONE_DIR}/)")
    for name in ARTIFACT_FILES:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: missing from the model artifact")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``artifact.json`` of the artifact folder ``path``, checked (format version, required fields),
    without loading the model (nor, for a URI, copying it): the one reader of that file."""
    remote = "://" in str(path)
    file = f"{str(path).rstrip('/')}/{METADATA_FILE}" if remote else local_artifact(path) / METADATA_FILE
    try:
        metadata = json.loads(_remote_metadata(path)[1] if remote else file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{file}: not valid JSON: {err}") from None
    if not isinstance(metadata, dict):
        raise InputError(f"{file}: the top level must be an object")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{file}: format_version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    for field in ("model_version", "model_config", "num_users", "num_items", "num_attributes", "rating_mean"):
        if field not in metadata:
            raise InputError(f"{file}: missing field '{field}'")
    if not isinstance(metadata["model_version"], str) or not metadata["model_version"]:
        raise InputError(f"{file}: field 'model_version' must be a non-empty string")
    for field in ("num_users", "num_items", "num_attributes"):
        if not isinstance(metadata[field], int) or metadata[field] < 0:
            raise InputError(f"{file}: field '{field}' must be a non-negative integer")
    metrics = metadata.get("metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(split, dict) for split in metrics.values()):
        raise InputError(f"{file}: field 'metrics' must map each split to its figures")
    for field, read in (("model_config", artifact_model_config), ("rating", artifact_rating)):
        try:
            read(metadata)
        except ValidationError as err:
            raise InputError(f"{file}: field '{field}': {validation_problems(err)}") from None
    return metadata


def artifact_rating(metadata: Mapping[str, Any]) -> RatingNormalisation:
    """How the artifact's rating predictions map back to the raw ratings, and the scale they are clipped to (``rating`` in
    ``artifact.json``; without it predictions are raw ratings on an open scale)."""
    return RatingNormalisation.model_validate(metadata.get("rating") or {"kind": "none"})


def artifact_model_config(metadata: Mapping[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` the artifact was trained with (``model_config`` in ``artifact.json``)."""
    return ModelConfig.model_validate(metadata["model_config"])


def _model_config(file: Path, metadata: dict[str, Any]) -> ModelConfig:
    config = artifact_model_config(metadata)
    if config.item_encoder.use_text and not (file.parent / BACKBONE_DIR / "config.json").is_file():
        raise InputError(f"{file.parent / BACKBONE_DIR / 'config.json'}: missing from the model artifact")
    return config


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise InputError(f"{file}: not a readable safetensors file: {err}") from None


def _read_parquet(file: Path, columns: tuple[str, ...]) -> pa.Table:
    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{file}: not a readable Parquet file: {err}") from None
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise InputError(f"{file}: missing field(s) {', '.join(missing)}")
    return table
