"""Small random model artifacts with real tables, for the serving tests and benchmarks: a service to run
without a training run.

The tables come from the embedded MovieLens-100K (the first ``num_users`` users and the items they
rated, titles and genres as item text, token ids from the packaged MiniLM tokenizer); the model is
a randomly initialised ``PolyrecModel`` with a tiny BERT backbone, saved with ``save_artifact``. The
data folder has the preprocessing output layout that ``ServeConfig.training_data`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from data import schema
from data.config import DEFAULT_DATASET_DIR
from data.features import RatingNormalisation
from data.manifest import Manifest, SplitSize, TokenizerInfo
from train.artifact import save_artifact
from train.backbone import default_backbone_path
from train.config import ModelConfig
from train.model import CatalogFeatures, PolyrecModel

#: A 2-layer, 32-wide BERT with the MiniLM vocabulary, so the real tokenizer's ids fit.
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
MAX_TEXT_TOKENS = 24
GENRES = [line.split("|")[0] for line in (DEFAULT_DATASET_DIR / "u.genre").read_text().splitlines() if line.strip()]


def movielens_tables(num_users: int) -> tuple[pa.Table, pa.Table, pd.DataFrame]:
    """(items, users, ratings) of the first ``num_users`` MovieLens-100K users, with vocabulary indices."""
    ratings = pd.read_csv(DEFAULT_DATASET_DIR / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    ratings = ratings[ratings["user"] <= num_users].sort_values(["ts", "user", "item"], kind="stable")
    movies = pd.read_csv(DEFAULT_DATASET_DIR / "u.item", sep="|", encoding="latin-1", header=None)
    movies = movies[movies[0].isin(ratings["item"])].sort_values(0)
    item_idx = {item: idx for idx, item in enumerate(movies[0], start=1)}
    user_idx = {user: idx for idx, user in enumerate(sorted(ratings["user"].unique()), start=1)}
    ratings = ratings.assign(user_idx=ratings["user"].map(user_idx), item_idx=ratings["item"].map(item_idx))

    genre_flags = movies.iloc[:, 5:].to_numpy()
    titles = movies[1].tolist()
    genres = [[GENRES[g] for g in np.flatnonzero(flags)] for flags in genre_flags]
    texts = [f"{title}. Genres: {', '.join(names)}." for title, names in zip(titles, genres)]
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)
    input_ids = tokenizer(texts, max_length=MAX_TEXT_TOKENS, truncation=True)["input_ids"]
    items = pa.table(
        {
            "item_idx": pa.array(range(1, len(titles) + 1), pa.int32()),
            "item_id": pa.array([str(item) for item in movies[0]]),
            "title": pa.array(titles),
            "text": pa.array(texts),
            "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
            # attribute_idx = genre number + 1 (index 0 is unused)
            "attributes": pa.array([(np.flatnonzero(flags) + 1).tolist() for flags in genre_flags], pa.list_(pa.int32())),
            "is_cold": pa.array([False] * len(titles)),
        }
    )
    users = pa.table(
        {
            "user_id": pa.array([str(user) for user in user_idx]),
            "user_idx": pa.array(list(user_idx.values()), pa.int32()),
            "rating_offset": pa.array([0.0] * len(user_idx), pa.float32()),
        }
    )
    return items, users, ratings


def build_random_artifact(
    out_dir: str | Path, *, num_users: int = 40, seed: int = 0, model_version: str | None = None, rating: dict | None = None, reads_text: bool = True
) -> Path:
    """A saved artifact of a random model over the first ``num_users`` users' items; ``rating`` is the
    rating normalisation recorded in it (default: none); ``reads_text=False``: an id-only model, without a backbone."""
    items, users, ratings = movielens_tables(num_users)
    config = ModelConfig()
    config.backbone.random_init_config = TINY_BERT
    config.item_encoder.use_text = reads_text
    config.user_model.hidden_size = 32
    config.user_model.dropout = 0.0
    config.towers.expert_hidden = 32
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)
    catalog = CatalogFeatures.from_items_table(items, MAX_TEXT_TOKENS, tokenizer.pad_token_id, num_attributes=len(GENRES))
    torch.manual_seed(seed)
    model = PolyrecModel(
        config, num_users=users.num_rows, num_items=items.num_rows, num_attributes=len(GENRES), catalog=catalog, rating_mean=float(ratings["rating"].mean())
    )
    with torch.no_grad():  # zero at the start of training; random here, so that a history's ratings change the answers
        model.user_model.rating_direction.normal_(std=0.5)
        model.user_model.rated_embedding.normal_(std=0.5)
    if reads_text:
        model.tokenizer = tokenizer  # saved beside the backbone, so the artifact can encode new items
    return save_artifact(
        model,
        out_dir,
        items=items,
        users=users,
        model_version=model_version or f"random-{seed}",
        data_manifest_hash=f"movielens-100k-first-{num_users}-users",
        metrics={"validation": {"validation/NDCG@10": 0.0}, "test": {"NDCG@10": 0.0}},
        rating=rating or {"kind": "none", "shift": 0.0, "scale": 1.0},
    )


def build_training_data(out_dir: str | Path, *, num_users: int = 40) -> str:
    """The vocabularies, training sequences (every rating, time-ordered, raw: no normalisation) and users'
    histories in the preprocessing layout, with a manifest saying so."""
    out_dir = Path(out_dir)
    items, users, ratings = movielens_tables(num_users)
    (out_dir / "vocab").mkdir(parents=True, exist_ok=True)
    (out_dir / schema.SEQUENCES_DIR / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(users, out_dir / schema.USER_VOCAB_PATH)
    pq.write_table(items.select(["item_id", "item_idx"]), out_dir / schema.ITEM_VOCAB_PATH)
    grouped = ratings.groupby("user_idx", sort=True)
    sequences = pa.table(
        {
            "user_idx": pa.array(list(grouped.groups), pa.int32()),
            "items": pa.array([g["item_idx"].tolist() for _, g in grouped], pa.list_(pa.int32())),
            "ratings": pa.array([g["rating"].astype("float32").tolist() for _, g in grouped], pa.list_(pa.float32())),
            "likes": pa.array([(g["rating"] >= 4).astype("int8").tolist() for _, g in grouped], pa.list_(pa.int8())),
            "timestamps": pa.array([g["ts"].tolist() for _, g in grouped], pa.list_(pa.int64())),
            "history": pa.array([[]] * len(grouped), pa.list_(pa.int32())),  # one row per user: nothing before it
            "history_ratings": pa.array([[]] * len(grouped), pa.list_(pa.float32())),
        },
        schema=schema.TRAIN_SEQUENCE,
    )
    pq.write_table(sequences, out_dir / schema.SEQUENCES_DIR / "train" / "part-0.parquet")
    histories = pd.DataFrame(
        {"user_id": ratings["user"].astype(str), "item_id": ratings["item"].astype(str), "ts": ratings["ts"] * 1000, "rating": ratings["rating"].astype(float)}
    )
    (out_dir / schema.USER_HISTORIES_DIR).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(histories, schema=schema.USER_HISTORIES, preserve_index=False), out_dir / schema.USER_HISTORIES_DIR / "part-0.parquet")
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)
    manifest = Manifest(
        schema_version=schema.SCHEMA_VERSION,
        created_at=pd.Timestamp.now("UTC").isoformat(),
        config={},
        input_files=[],
        input_hash=f"movielens-100k-first-{num_users}-users",
        content_hash=f"movielens-100k-first-{num_users}-users",
        num_input_interactions=len(ratings),
        steps=[],
        kcore_iterations=0,
        kcore_converged=True,
        quarantine=[],
        num_interactions=len(ratings),
        num_users=users.num_rows,
        num_items=items.num_rows,
        num_attributes=len(GENRES),
        num_cold_items=0,
        cold_withheld_interactions=0,
        temporal_cutoffs=None,
        splits={"train": SplitSize(rows=sequences.num_rows, interactions=len(ratings))},
        rating=RatingNormalisation(kind="none"),
        tokenizer=TokenizerInfo(
            path=str(default_backbone_path()),
            class_name=type(tokenizer).__name__,
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_token_id,
            max_text_tokens=MAX_TEXT_TOKENS,
        ),
    )
    (out_dir / schema.MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return str(out_dir)
