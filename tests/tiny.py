"""Small, fast inputs shared by the training and serving tests: a slice of the embedded MovieLens-100K run
through the real preprocessing stage, and a tiny randomly initialised BERT backbone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.config import DEFAULT_DATASET_DIR, ColumnMapping, PreprocessConfig, SourceConfig
from tests.serving_fixtures import TINY_BERT
from train.config import TrainConfig


def tiny_preprocess_config(folder: Path, num_users: int = 40, max_history: int = 20) -> PreprocessConfig:
    """The first ``num_users`` users of ml-100k (about 4,000 interactions) as a ``table`` source written to
    ``folder``, preprocessed into ``folder/out``."""
    ratings = pd.read_csv(DEFAULT_DATASET_DIR / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    ratings = ratings[ratings["user"] <= num_users]
    items = pd.read_csv(DEFAULT_DATASET_DIR / "u.item", sep="|", encoding="latin-1", header=None)
    genre_names = pd.read_csv(DEFAULT_DATASET_DIR / "u.genre", sep="|", header=None)[0].tolist()
    flags = items.iloc[:, 5:24].to_numpy().astype(bool)
    items = pd.DataFrame(
        {
            "item": items[0],
            "title": items[1],
            "genres": ["|".join(g for g, on in zip(genre_names, row) if on) for row in flags],
        }
    )
    items = items[items["item"].isin(ratings["item"])]
    ratings.to_csv(folder / "ratings.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    config = PreprocessConfig(
        source=SourceConfig(
            format="table",
            path=str(folder / "ratings.csv"),
            items_path=str(folder / "items.csv"),
            columns=ColumnMapping(user_id="user", item_id="item", timestamp="ts", value="rating", item_fields={"title": "title", "genres": "genres"}),
        ),
        output=str(folder / "out"),
    )
    config.features.max_history = max_history
    config.features.max_text_tokens = 16
    return config


def tiny_dataset(folder: Path, num_users: int = 40, max_history: int = 20) -> str:
    """``tiny_preprocess_config`` run; returns the output folder."""
    from data.pipeline import run_preprocess

    config = tiny_preprocess_config(folder, num_users, max_history)
    run_preprocess(config)
    return config.output


def tiny_config(data_dir: str, output, **overrides) -> TrainConfig:
    """A training config for a 32-wide model over a tiny random BERT; ``section__field=value`` overrides."""
    config = TrainConfig(data=data_dir, output=str(output), epochs=4, batch_size=16, early_stopping_patience=100, checkpoints_to_keep=5)
    config.model.backbone.random_init_config = TINY_BERT
    config.model.user_model.hidden_size = 32
    config.model.towers.expert_hidden = 32
    config.optimizer.warmup_steps = 1
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        setattr(getattr(config, section), field, value) if field else setattr(config, key, value)
    return config
