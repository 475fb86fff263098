"""Full-ranking evaluation of a scorer on ``data.schema.EVAL_SEQUENCE`` rows, in process or through Ray Data.

A *scorer* is anything with ``full_sort_predict(batch) -> [B, N+1]`` scores (column 0 is the padding)
and, optionally, ``predict(batch) -> {"rating": [B], "like": [B]}`` (normalised rating, like
probability; either key may be absent). Batches are built by :func:`collate_eval_rows` on the CPU and
moved to a torch scorer's device (:func:`scorer_device`) for scoring.

Both evaluation paths first turn each batch into *per-row values* (the target's rank, the row's top
items, the like / rating predictions) with :func:`score_rows`, then :func:`summarise` aggregates them
on the driver, so the two paths give the same numbers on the same rows. Ranking follows the protocol
of :mod:`train.metrics` (seen items masked, pessimistic ranks on ties).

A model is reported beside the popularity baseline on the same rows (:func:`evaluate_with_popularity`): on the
test split after training (``train.trainer``) and for any artifact on any split (:func:`evaluate_artifact`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from matplotlib.figure import Figure
from torch import Tensor

from common import storage
from common.console import progress
from common.errors import InputError
from data.features import RatingDenormaliser
from data.manifest import load_manifest
from data.schema import PAD_INDEX, SEQUENCES_DIR, USER_VOCAB_PATH
from train.artifact import read_metadata
from train.batching import left_pad
from train.metrics import (
    binary_classification_metrics,
    coverage_at_k,
    hit_rate_at_k,
    mae,
    mrr_at_k,
    ndcg_at_k,
    ranks_and_top_k,
    rmse,
)
from train.transfer import RatingScales, reindex_artifact


class Scorer(Protocol):
    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor: ...


#: The ``EVAL_SEQUENCE`` columns evaluation reads.
EVAL_COLUMNS = (
    "user_idx",
    "history",
    "history_ratings",
    "seen_items",
    "target_item",
    "target_rating",
    "target_rating_raw",
    "target_like",
    "is_cold_target",
)

#: What :func:`score_rows` returns for each evaluation row. NaN predictions: the scorer has no such head.
PER_ROW_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int64()),
        pa.field("target_item", pa.int64()),
        pa.field("is_cold", pa.bool_()),
        pa.field("rank", pa.int64()),
        pa.field("top_items", pa.list_(pa.int64())),
        pa.field("like_label", pa.int64()),  # -1: unknown
        pa.field("like_probability", pa.float64()),
        pa.field("rating", pa.float64()),  # normalised; NaN: none
        pa.field("rating_raw", pa.float64()),
        pa.field("rating_prediction", pa.float64()),  # normalised
    ]
)


# --- Batches --------------------------------------------------------------------------------


def _float_column(column: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(column, np.nan).to_numpy().astype(np.float32)


def _long_tensor(column: pa.ChunkedArray) -> torch.LongTensor:
    return torch.from_numpy(column.to_numpy().astype(np.int64))


def collate_eval_rows(rows: pa.Table, max_history: int) -> tuple[dict[str, Tensor], list[list[int]], np.ndarray]:
    """One eval batch from ``EVAL_SEQUENCE`` rows: the model's input, each row's seen items, its cold flag."""
    batch = {
        "input_items": left_pad(rows["history"].to_pylist(), max_history),
        "input_ratings": left_pad(rows["history_ratings"].to_pylist(), max_history, pad_value=float("nan"), dtype=torch.float32),
        "user_idx": _long_tensor(rows["user_idx"]),
        "target_items": _long_tensor(rows["target_item"]),
        "target_ratings": torch.from_numpy(_float_column(rows["target_rating"])),
        "target_likes": _long_tensor(rows["target_like"]),
    }
    return batch, rows["seen_items"].to_pylist(), rows["is_cold_target"].to_numpy()


#: Score cells ([rows, items]) a batch of ``score_rows`` may hold: ranking a row costs some 30 bytes per catalogue item
#: (scores, masks, the sort's indices), so large catalogues are ranked a few rows at a time in about 0.5 GB.
SCORE_CELLS_PER_BATCH = 1 << 24


def rows_per_batch(batch_size: int, num_items: int) -> int:
    """``batch_size``, lowered so that a batch's ``[rows, num_items + 1]`` scores stay within ``SCORE_CELLS_PER_BATCH``."""
    return max(1, min(batch_size, SCORE_CELLS_PER_BATCH // (num_items + 1)))


def _row_slices(table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    for offset in range(0, table.num_rows, batch_size):
        yield table.slice(offset, batch_size)


def eval_batches(table: pa.Table, max_history: int, batch_size: int) -> Iterator[tuple[dict[str, Tensor], list[list[int]], np.ndarray]]:
    """:func:`collate_eval_rows` over consecutive slices of ``batch_size`` rows of ``table``."""
    _check_columns(table.column_names, "evaluation table")
    for rows in _row_slices(table, batch_size):
        yield collate_eval_rows(rows, max_history)


def _check_columns(names: Sequence[str], where: str) -> None:
    missing = [name for name in EVAL_COLUMNS if name not in names]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)} (expected data.schema.EVAL_SEQUENCE)")


# --- Per-row values and their aggregation ---------------------------------------------------


@contextmanager
def _inference(scorer: Scorer) -> Iterator[None]:
    """No autograd, and a torch module in eval mode (dropout off) for the duration, then as it was."""
    module = scorer if isinstance(scorer, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if module is not None:
            module.train(was_training)


def _prediction(predictions: Mapping[str, Tensor], key: str, num_rows: int) -> np.ndarray:
    if key not in predictions:
        return np.full(num_rows, np.nan)
    return predictions[key].detach().float().cpu().numpy().astype(np.float64)


def scorer_device(scorer: Scorer) -> torch.device:
    """Where a scorer's inputs must be: a torch module's own device (an accelerator when the trainer or a replica
    placed it there), the CPU for anything else."""
    if isinstance(scorer, torch.nn.Module):
        for tensor in (*scorer.parameters(), *scorer.buffers()):
            return tensor.device
    return torch.device("cpu")


def score_rows(scorer: Scorer, rows: pa.Table, *, num_items: int, max_history: int, coverage_k: int) -> pa.Table:
    """The per-row values (``PER_ROW_SCHEMA``) of one batch of ``EVAL_SEQUENCE`` rows."""
    if rows.num_rows == 0:
        return PER_ROW_SCHEMA.empty_table()
    batch, seen_items, is_cold = collate_eval_rows(rows, max_history)
    device = scorer_device(scorer)
    model_batch = {name: tensor.to(device) for name, tensor in batch.items()}
    scores = scorer.full_sort_predict(model_batch).detach().cpu()
    if tuple(scores.shape) != (rows.num_rows, num_items + 1):
        raise ValueError(
            f"full_sort_predict returned scores of shape {tuple(scores.shape)}, expected [batch, num_items + 1] = [{rows.num_rows}, {num_items + 1}]"
        )
    predictions = scorer.predict(model_batch) if hasattr(scorer, "predict") else {}
    targets = batch["target_items"]
    ranks, top_items = ranks_and_top_k(scores, targets, seen_items, coverage_k)
    return pa.table(
        {
            "user_idx": batch["user_idx"].numpy(),
            "target_item": targets.numpy(),
            "is_cold": is_cold,
            "rank": ranks,
            "top_items": pa.array(top_items, type=pa.list_(pa.int64())),
            "like_label": batch["target_likes"].numpy(),
            "like_probability": _prediction(predictions, "like", rows.num_rows),
            "rating": batch["target_ratings"].numpy(),
            "rating_raw": _float_column(rows["target_rating_raw"]),
            "rating_prediction": _prediction(predictions, "rating", rows.num_rows),
        },
        schema=PER_ROW_SCHEMA,
    )


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """HR, NDCG and MRR at each of ``ks`` from the targets' ranks (``train.metrics``' protocol)."""
    metrics = {}
    for k in ks:
        metrics[f"HR@{k}"] = hit_rate_at_k(ranks, k)
        metrics[f"NDCG@{k}"] = ndcg_at_k(ranks, k)
        metrics[f"MRR@{k}"] = mrr_at_k(ranks, k)
    return metrics


def summarise(
    per_row: pa.Table,
    *,
    ks: Sequence[int],
    num_items: int,
    coverage_k: int,
    rating_denormalise: RatingDenormaliser | None = None,
) -> dict[str, float]:
    """The metrics of a table of per-row values (``PER_ROW_SCHEMA``); see :func:`evaluate` for the keys."""
    if per_row.num_rows == 0:
        raise InputError("evaluation table: no rows to evaluate")
    # Floating-point sums depend on the order of their terms; a canonical row order makes the
    # metrics independent of the order in which (Ray) batches come back.
    per_row = per_row.sort_by([(name, "ascending") for name in PER_ROW_SCHEMA.names if name != "top_items"])
    column = {name: per_row[name].to_numpy() for name in PER_ROW_SCHEMA.names if name != "top_items"}
    ranks = column["rank"]
    metrics: dict[str, float] = {"num_rows": per_row.num_rows, **ranking_metrics(ranks, ks)}
    metrics[f"coverage@{coverage_k}"] = coverage_at_k(per_row["top_items"].to_numpy(), num_items)

    cold = column["is_cold"]
    if cold.any():
        metrics["cold/num_rows"] = int(cold.sum())
        metrics |= {f"cold/{name}": value for name, value in ranking_metrics(ranks[cold], ks).items()}

    liked = (column["like_label"] >= 0) & ~np.isnan(column["like_probability"])
    if liked.any():
        like_metrics = binary_classification_metrics(column["like_probability"][liked], column["like_label"][liked])
        metrics["like/num_rows"] = int(liked.sum())
        metrics |= {f"like/{name}": value for name, value in like_metrics.items()}

    rated = ~np.isnan(column["rating"]) & ~np.isnan(column["rating_prediction"])
    if rated.any():
        predictions, targets = column["rating_prediction"][rated], column["rating"][rated]
        if rating_denormalise is not None:
            predictions = rating_denormalise(predictions, column["user_idx"][rated])
            targets = column["rating_raw"][rated]
        metrics["rating/num_rows"] = int(rated.sum())
        metrics["rating/rmse"] = rmse(predictions, targets)
        metrics["rating/mae"] = mae(predictions, targets)
    return metrics


# --- Evaluation, in this process or on Ray Data actors ----------------------------------------


@dataclass(frozen=True)
class ActorPool:
    """Scoring on a pool of Ray Data actors (large user sets): each actor builds the scorer once."""

    size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def evaluate(
    scorer: Scorer | Callable[[], Scorer],
    rows: pa.Table | str | ray.data.Dataset,
    *,
    ks: Sequence[int] = (10, 20),
    num_items: int,
    max_history: int,
    batch_size: int,
    rating_denormalise: RatingDenormaliser | None = None,
    coverage_k: int = 10,
    actors: ActorPool | None = None,
    progress_label: str | None = None,
) -> dict[str, float]:
    """Evaluate a scorer on ``EVAL_SEQUENCE`` rows: in this process (``rows`` a table), or with ``actors`` on a pool
    of Ray Data actors (``scorer`` then a picklable factory with no arguments, ``rows`` a table, a Parquet folder / URI
    or a Ray Dataset). Only per-row values travel back from the actors, never the ``[B, N+1]`` scores, so both ways
    give the same metrics on the same rows.

    Keys: ``num_rows``; ``HR@K``, ``NDCG@K``, ``MRR@K`` for each K; ``coverage@{coverage_k}``;
    ``cold/...`` (row count and ranking metrics) when some target is a cold item; ``like/...``
    (AUC, log loss, accuracy, precision, recall, F1) on rows with a known like, when the scorer
    predicts likes; ``rating/rmse`` and ``rating/mae`` on rows with a rating, when the scorer
    predicts ratings: on the raw scale when ``rating_denormalise`` is given, else normalised.
    ``progress_label``: a command's console shows a bar over the batches under this label (in this process only).
    """
    shape = {"num_items": num_items, "max_history": max_history, "coverage_k": coverage_k}
    batch_size = rows_per_batch(batch_size, num_items)
    if actors is None:
        _check_columns(rows.column_names, "evaluation table")
        parts = _row_slices(rows, batch_size)
        if progress_label is not None:
            parts = progress(parts, desc=progress_label, total=-(-rows.num_rows // batch_size), unit="batch")
        with _inference(scorer):
            per_row = [score_rows(scorer, part, **shape) for part in parts]
    else:
        per_row = _score_on_actors(scorer, rows, shape, batch_size, actors)
    return summarise(
        pa.concat_tables([PER_ROW_SCHEMA.empty_table(), *per_row]),
        ks=ks,
        num_items=num_items,
        coverage_k=coverage_k,
        rating_denormalise=rating_denormalise,
    )


class _RowScorer:
    """Ray Data callable class: builds the scorer once per actor, maps eval rows to per-row values."""

    def __init__(self, scorer_factory: Callable[[], Scorer], shape: dict[str, int]):
        self.scorer = scorer_factory()
        self.shape = shape

    def __call__(self, rows: pa.Table) -> pa.Table:
        with _inference(self.scorer):
            return score_rows(self.scorer, rows, **self.shape)


def _score_on_actors(
    scorer_factory: Callable[[], Scorer], rows: pa.Table | str | ray.data.Dataset, shape: dict[str, int], batch_size: int, actors: ActorPool
) -> Iterator[pa.Table]:
    where = rows if isinstance(rows, str) else "evaluation dataset"
    if isinstance(rows, str):
        dataset = ray.data.read_parquet(rows)
    else:
        dataset = ray.data.from_arrow(rows) if isinstance(rows, pa.Table) else rows
    schema = dataset.schema()
    if schema is None:
        raise InputError(f"{where}: no rows to evaluate")
    _check_columns(schema.names, str(where))
    per_row = dataset.select_columns(list(EVAL_COLUMNS)).map_batches(
        _RowScorer,
        fn_constructor_kwargs={"scorer_factory": scorer_factory, "shape": shape},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors.size),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
    )
    return per_row.iter_batches(batch_size=None, batch_format="pyarrow")


# --- Popularity baseline --------------------------------------------------------------------

#: Pseudo-observations of the global mean added to each item's mean rating / like rate, so that an
#: item seen once does not get a certain like or an extreme rating.
PRIOR_WEIGHT = 1.0


class PopularityScorer:
    """Baseline scorer: ranks items by their number of interactions in the training sequences.

    Its ``predict`` gives the item's mean normalised rating and its like rate, each shrunk towards
    the global value by ``PRIOR_WEIGHT`` (NaN when the training data has no ratings / likes at all).
    """

    def __init__(self, train_table: pa.Table, num_items: int):
        items = pc.list_flatten(train_table["items"]).to_numpy().astype(np.int64)
        if items.size and (items.min() <= PAD_INDEX or items.max() > num_items):
            raise InputError(f"training sequences: field items holds item_idx outside 1..{num_items}")
        ratings = pc.list_flatten(train_table["ratings"]).to_numpy().astype(np.float64)
        likes = pc.list_flatten(train_table["likes"]).to_numpy().astype(np.float64)
        self.counts = torch.from_numpy(np.bincount(items, minlength=num_items + 1).astype(np.float32))
        self.mean_rating = self._shrunk_item_means(items, ratings, valid=~np.isnan(ratings), num_items=num_items)
        self.like_rate = self._shrunk_item_means(items, likes, valid=likes >= 0, num_items=num_items)

    @staticmethod
    def _shrunk_item_means(items: np.ndarray, values: np.ndarray, *, valid: np.ndarray, num_items: int) -> Tensor:
        items, values = items[valid], values[valid]
        global_mean = values.mean() if values.size else np.nan
        sums = np.bincount(items, weights=values, minlength=num_items + 1)
        counts = np.bincount(items, minlength=num_items + 1)
        return torch.from_numpy((sums + PRIOR_WEIGHT * global_mean) / (counts + PRIOR_WEIGHT))

    def full_sort_predict(self, batch: dict[str, Tensor]) -> Tensor:
        return self.counts.expand(len(batch["target_items"]), -1)

    def predict(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        targets = batch["target_items"]
        return {"rating": self.mean_rating[targets], "like": self.like_rate[targets]}


def evaluate_with_popularity(
    scorer: Scorer,
    popularity: PopularityScorer,
    table: pa.Table,
    *,
    ks: Sequence[int],
    num_items: int,
    max_history: int,
    batch_size: int,
    data_ratings: RatingDenormaliser,
    scorer_ratings: RatingDenormaliser | None = None,
    scorer_rows: str | ray.data.Dataset | None = None,
    actors: ActorPool | None = None,
) -> dict[str, dict[str, float]]:
    """``{"polyrec": ..., "popularity": ...}``: ``scorer`` and the popularity baseline of the same preprocessing output
    on the same ``EVAL_SEQUENCE`` rows, by :func:`evaluate`. Rating errors are on the raw scale: the baseline predicts
    ratings normalised the output's way, which ``data_ratings`` undoes, and so does the scorer unless it normalises
    them its own way (``scorer_ratings``: an artifact scored on another output's split). With ``actors`` the scorer
    (a factory) scores on a Ray Data actor pool, reading the same rows as ``scorer_rows`` when given."""
    options = dict(ks=ks, num_items=num_items, max_history=max_history, batch_size=batch_size)
    return {
        "polyrec": evaluate(
            scorer,
            table if scorer_rows is None else scorer_rows,
            **options,
            rating_denormalise=scorer_ratings or data_ratings,
            actors=actors,
            progress_label="evaluate polyrec",
        ),
        "popularity": evaluate(popularity, table, **options, rating_denormalise=data_ratings, progress_label="evaluate popularity"),
    }


# --- Report ---------------------------------------------------------------------------------

_CHARTED_METRIC = re.compile(r"(HR|NDCG)@(\d+)")


def _format(value: float | int | None) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _markdown_table(metrics_by_model: Mapping[str, Mapping[str, float]]) -> str:
    columns = list(dict.fromkeys(name for metrics in metrics_by_model.values() for name in metrics))
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
        *(f"| {model} | " + " | ".join(_format(metrics.get(name)) for name in columns) + " |" for model, metrics in metrics_by_model.items()),
    ]
    return "\n".join(lines) + "\n"


def _bar_chart(metrics_by_model: Mapping[str, Mapping[str, float]]) -> bytes:
    charted = {name for metrics in metrics_by_model.values() for name in metrics if _CHARTED_METRIC.fullmatch(name)}
    # HR before NDCG, then by K.
    names = sorted(charted, key=lambda name: (name.split("@")[0], int(name.split("@")[1])))
    figure = Figure(figsize=(max(6.0, 1.5 * len(names)), 4.0))
    axes = figure.subplots()
    width = 0.8 / max(len(metrics_by_model), 1)
    positions = np.arange(len(names))
    for index, (model, metrics) in enumerate(metrics_by_model.items()):
        heights = [metrics.get(name, 0.0) for name in names]
        axes.bar(positions + (index - (len(metrics_by_model) - 1) / 2) * width, heights, width, label=model)
    axes.set_xticks(positions, names)
    axes.set_ylabel("score")
    axes.set_title("Full-ranking metrics")
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_report(metrics_by_model: Mapping[str, Mapping[str, float]], out_dir: str | Path) -> None:
    """Write ``metrics.json``, ``metrics.md`` (one row per model) and ``metrics.png`` (HR/NDCG@K bars).

    ``out_dir`` is a local folder or a pyarrow filesystem URI (``s3://...``, ``gs://...``).
    """
    location = storage.resolve(str(out_dir))
    location.filesystem.create_dir(location.path, recursive=True)
    storage.write_text(location, "metrics.json", json.dumps(metrics_by_model, indent=2))
    storage.write_text(location, "metrics.md", _markdown_table(metrics_by_model))
    with location.filesystem.open_output_stream(location.join("metrics.png")) as stream:
        stream.write(_bar_chart(metrics_by_model))


# --- The evaluation stage: a model artifact against the baselines on a split ----------------


class ArtifactScorer:
    """Picklable factory for Ray Data actors: each re-indexes the artifact's model to the data once."""

    def __init__(self, artifact_path: str, data_uri: str):
        self.artifact_path = artifact_path
        self.data_uri = data_uri

    def __call__(self) -> Scorer:
        return reindex_artifact(self.artifact_path, self.data_uri)


def evaluate_on(artifact_path: str, data_uri: str, split: str = "validation", *, ks: Sequence[int] = (10, 20), batch_size: int = 256) -> dict[str, float]:
    """The artifact's metrics (:func:`evaluate`'s keys) on ``split`` of any preprocessing output: its model re-indexed
    to that output's vocabularies by id (``train.transfer.reindex_artifact``), its rating predictions de-normalised
    its own way and compared with the raw ratings. So versions trained on different data are measured on the same
    rows (the retrain's promotion gate); on the artifact's own data the re-indexing is the identity."""
    manifest = load_manifest(data_uri)
    rows = storage.read_table(storage.resolve(data_uri), f"{SEQUENCES_DIR}/{split}")
    scorer = reindex_artifact(artifact_path, data_uri)
    return evaluate(
        scorer,
        rows,
        ks=ks,
        num_items=manifest.num_items,
        max_history=manifest.config["features"]["max_history"],
        batch_size=batch_size,
        rating_denormalise=scorer.ratings.denormalise,
    )


def evaluate_artifact(
    artifact_path: str,
    data_uri: str,
    *,
    split: str = "test",
    output: str | None = None,
    use_ray_data: bool = False,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """The artifact and the popularity baseline on ``split`` of a preprocessing output (any: the artifact is scored as
    :func:`evaluate_on` scores it), by :func:`evaluate_with_popularity`; with ``use_ray_data`` the artifact's rows are
    scored on a pool of Ray Data actors instead (:func:`evaluate` with an ``ActorPool``, the same metrics). Writes
    ``metrics.json``, ``metrics.md`` and ``metrics.png`` to ``output`` when given."""
    read_metadata(artifact_path)  # a wrong artifact is refused before any data is read or Ray starts
    manifest = load_manifest(data_uri)
    location = storage.resolve(data_uri)
    rows = storage.read_table(location, f"{SEQUENCES_DIR}/{split}")
    options = dict(ks=ks, num_items=manifest.num_items, max_history=manifest.config["features"]["max_history"], batch_size=batch_size)
    popularity = PopularityScorer(storage.read_table(location, f"{SEQUENCES_DIR}/train"), manifest.num_items)
    data_ratings = manifest.rating.denormaliser(storage.read_table(location, USER_VOCAB_PATH))
    if use_ray_data:
        dataset = ray.data.read_parquet(location.join(f"{SEQUENCES_DIR}/{split}"), filesystem=location.filesystem)
        scorer, scorer_ratings, actors = ArtifactScorer(artifact_path, data_uri), RatingScales.between(artifact_path, data_uri).denormalise, ActorPool()
    else:
        dataset, actors = rows, None
        scorer = reindex_artifact(artifact_path, data_uri)
        scorer_ratings = scorer.ratings.denormalise
    results = evaluate_with_popularity(
        scorer, popularity, rows, **options, data_ratings=data_ratings, scorer_ratings=scorer_ratings, scorer_rows=dataset, actors=actors
    )
    if output is not None:
        write_report(results, output)
    return results
