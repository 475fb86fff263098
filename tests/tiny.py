"""Small, fast inputs shared by the training and serving tests: a slice of the embedded MovieLens-100K run
through the real preprocessing stage, and a tiny randomly initialised BERT backbone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.config import DEFAULT_DATASET_DIR, ColumnMapping, PreprocessConfig, SourceConfig
from serve.testing import TINY_BERT  # noqa: F401  (re-exported for the training tests)

def tiny_dataset(folder: Path, num_users: int = 40, max_history: int = 20) -> str:
    """Preprocess the first ``num_users`` users of ml-100k (about 4,000 interactions) into ``folder/out``."""
    ratings = pd.read_csv(DEFAULT_DATASET_DIR / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    ratings = ratings[ratings["user"] <= num_users]
    items = pd.read_csv(DEFAULT_DATASET_DIR / "u.item", sep="|", encoding="latin-1", header=None)
    genre_names = pd.read_csv(DEFAULT_DATASET_DIR / "u.genre", sep="|", header=None)[0].tolist()
    flags = items.iloc[:, 5:24].to_numpy().astype(bool)
    items = pd.DataFrame({
        "item": items[0],
        "title": items[1],
        "genres": ["|".join(g for g, on in zip(genre_names, row) if on) for row in flags],
    })
    items = items[items["item"].isin(ratings["item"])]
    ratings.to_csv(folder / "ratings.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    config = PreprocessConfig(
        source=SourceConfig(
            format="table",
            path=str(folder / "ratings.csv"),
            items_path=str(folder / "items.csv"),
            columns=ColumnMapping(user_id="user", item_id="item", timestamp="ts", value="rating",
                                  item_fields={"title": "title", "genres": "genres"}),
        ),
        output=str(folder / "out"),
    )
    config.features.max_history = max_history
    config.features.max_text_tokens = 16
    from data.pipeline import run_preprocess

    run_preprocess(config)
    return config.output
