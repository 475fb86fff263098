"""The preprocessing stage's typed configuration (YAML → pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.config import RayConfig, StageConfig

DEFAULT_DATASET_DIR = Path(__file__).resolve().parent / "datasets" / "ml-100k"


SourceFormat = Literal["movielens-100k", "movielens-1m", "movielens-csv", "amazon", "table", "feedback"]


class ColumnMapping(StageConfig):
    """For the generic ``table`` format: which source column fills each canonical field."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    event: str | None = None  # None: every row gets ``SourceConfig.default_event``
    value: str | None = "rating"
    # canonical item field -> column of the items file (title, genres, description, ...)
    item_fields: dict[str, str] = Field(default_factory=lambda: {"title": "title"})
    list_separator: str = Field("|", min_length=1)  # for list fields (genres, tags, category) stored as one string


class SourceConfig(StageConfig):
    format: SourceFormat = "movielens-100k"
    #: A folder (MovieLens), the interactions file (amazon, table), or the feedback log's folder or
    #: Parquet file (feedback; a path or a URI such as s3://). None: the embedded MovieLens-100K.
    path: str | None = None
    #: amazon: the metadata file; table: the items file; feedback (optional): the service's registry of
    #: items registered at run time, ``<serve state_dir>/items.jsonl`` (path or URI; no file yet: none
    #: registered), so that feedback on them is kept and their registered text is what the item encoder reads.
    items_path: str | None = None
    users_path: str | None = None
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    timestamp_unit: Literal["s", "ms", "us", "iso"] = "s"
    default_event: str = "rate"
    #: Only events of these types are read from a feedback log (impressions are not interactions).
    feedback_events: list[str] = Field(default_factory=lambda: ["click", "like", "rate", "purchase"])


class CleanConfig(StageConfig):
    min_value: float | None = 1.0  # rating range; None turns the check off
    max_value: float | None = 5.0
    min_timestamp: int | None = 0  # seconds since the epoch
    max_timestamp: int | None = 4_102_444_800  # 2100-01-01
    require_item_metadata: bool = True
    drop_exact_duplicates: bool = True
    min_user_interactions: int = Field(3, ge=1)  # k-core, applied iteratively with the item bound
    min_item_interactions: int = Field(1, ge=1)
    max_kcore_iterations: int = Field(50, ge=1)
    max_events_per_user_per_day: int | None = Field(None, ge=1)  # bot filter; None turns it off

    @model_validator(mode="after")
    def _ranges_not_empty(self) -> CleanConfig:
        for low, high in (("min_value", "max_value"), ("min_timestamp", "max_timestamp")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ValueError(f"{low} ({low_value}) is above {high} ({high_value})")
        return self


class FeatureConfig(StageConfig):
    #: A Hugging Face folder with a tokenizer; None: the packaged all-MiniLM-L6-v2.
    tokenizer: str | None = None
    text_template: str = "{title}. Year: {year}. Genres: {genres}. Tags: {tags}. {description}"
    max_text_tokens: int = Field(64, ge=4)
    max_history: int = Field(50, ge=1)
    rating_normalisation: Literal["none", "minmax", "user_center"] = "none"
    like_threshold: float = 4.0  # value >= threshold is a like, for events that carry a value
    like_events: list[str] = Field(default_factory=lambda: ["like", "click", "purchase"])
    dislike_events: list[str] = Field(default_factory=lambda: ["dislike", "skip"])


class SplitConfig(StageConfig):
    strategy: Literal["leave_one_out", "temporal"] = "leave_one_out"
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)  # temporal: share of time-ordered events
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    cold_item_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)


class RayDataConfig(RayConfig):
    num_partitions: int | None = Field(None, ge=1)  # hash partitions by user; None: from cluster CPUs


class PreprocessConfig(StageConfig):
    source: SourceConfig = Field(default_factory=SourceConfig)
    #: Further sources appended to the first, e.g. the feedback log when retraining.
    extra_sources: list[SourceConfig] = Field(default_factory=list)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    ray: RayDataConfig = Field(default_factory=RayDataConfig)
    output: str = "runs/default/data"  # local path or pyarrow filesystem URI

    @model_validator(mode="after")
    def _minmax_has_a_scale(self) -> PreprocessConfig:
        low, high = self.clean.min_value, self.clean.max_value
        if self.features.rating_normalisation == "minmax" and (low is None or high is None or low >= high):
            raise ValueError(f"features.rating_normalisation: minmax needs clean.min_value < clean.max_value (here {low}, {high})")
        return self
