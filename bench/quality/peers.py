"""Peer baselines of the quality benchmark, trained on exactly polyrec's split of any dataset.

Runs in its own virtual environment (bench/.venv-peers, made by setup_peers.sh: RecBole 1.2.1 needs numpy < 2)
and imports nothing from polyrec. It reads polyrec's preprocessing output and trains:

- RecBole's SASRec, GRU4Rec and BERT4Rec (cross-entropy loss, the split's ``features.max_history`` as max length,
  early stopping on validation NDCG@10), fed through RecBole benchmark files so that RecBole sees polyrec's
  leave-one-out split: train = every prefix of a user's training history (last max_history items) -> next item, valid = training history -> validation
  target, test = training history + validation target -> test target;
- popularity (training interaction counts);
- Surprise's SVD++ (on a split with ratings; its scale is the split's ``clean.min_value``..``max_value``) on the
  raw training ratings and each user's validation rating (every rating known before the
  test target, as the sequential models read the validation item in the test-time history), predicting each test
  target's rating.

RecBole ranks sequential models without masking the user's history, so test ranks are computed here, for every
model alike: full ranking over all items 1..num_items, every item the user interacted with before the target
masked, ties pessimistic (rank = 1 + number of unmasked other items scoring >= the target).

Writes to --out, each model's files as soon as that model is done: ranks-<Model>.parquet (user_idx, target_item,
rank), svdpp-predictions.parquet and peers.json (per model: timings, epochs, stop reason, metrics, versions,
command, data content hash, hyperparameters, checkpoint).

A RecBole model that --out holds as stopped at its time cap, with the same split and hyperparameters, continues from
the state it stopped in (model, optimizer, best score, epochs without improvement: kept beside RecBole's best-epoch
checkpoint when the cap is reached) instead of starting again, so raising --max-minutes-per-model buys only the
epochs it lacked; the cap and the wall time count both runs. The continued run differs from one uninterrupted run
only in the order its batches are drawn (the data loader's random state starts afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from split_hash import split_hash  # bench/quality/split_hash.py, beside this script

RECBOLE_MODELS = ("SASRec", "GRU4Rec", "BERT4Rec")
ALL_MODELS = ("Pop", "SVDpp", *RECBOLE_MODELS)
STOPPING_STEP = 5
DATASET_NAME = "polyrec"
CUTOFFS = (10, 20)


@dataclass
class Split:
    """polyrec's leave-one-out split, one entry per user, in the order of the test table."""

    content_hash: str
    num_items: int
    max_history: int  # items of history a sequential model reads, as polyrec's evaluation does
    rating_scale: tuple[float, float]
    users: np.ndarray  # user_idx
    train_histories: list[list[int]]  # every training item, time-ordered
    validation_targets: np.ndarray
    test_targets: np.ndarray
    test_seen: list[list[int]]  # every item before the test target (to mask)
    test_ratings: np.ndarray  # raw scale
    test_likes: np.ndarray
    train_ratings: pa.Table  # user_idx, item_idx, rating (raw scale), one row per training interaction
    validation_ratings: pa.Table  # the same columns, one row per validation target with a rating


def load_split(data_dir: Path) -> Split:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    normalisation = manifest["config"]["features"]["rating_normalisation"]
    if normalisation != "none":
        sys.exit(f"{data_dir / 'manifest.json'}: config.features.rating_normalisation is {normalisation!r}; the peers need raw ratings ('none')")
    validation = pq.read_table(data_dir / "sequences" / "validation").to_pydict()
    test = pq.read_table(data_dir / "sequences" / "test").to_pydict()
    train = pq.read_table(data_dir / "sequences" / "train", columns=["user_idx", "items", "ratings"])

    validation_by_user = {user: i for i, user in enumerate(validation["user_idx"])}
    order = [validation_by_user[user] for user in test["user_idx"]]
    train_histories = [validation["seen_items"][i] for i in order]
    for user, history, seen, target in zip(test["user_idx"], train_histories, test["seen_items"], (validation["target_item"][i] for i in order)):
        if seen != history + [target]:
            sys.exit(f"user {user}: test seen_items is not validation seen_items + validation target")

    rows_per_chunk = np.array([len(items) for items in train["items"].to_pylist()])
    train_ratings = pa.table(
        {
            "user_idx": np.repeat(train["user_idx"].to_numpy(), rows_per_chunk),
            "item_idx": train["items"].combine_chunks().flatten(),
            "rating": train["ratings"].combine_chunks().flatten(),
        }
    )
    return Split(
        content_hash=manifest["content_hash"],
        num_items=int(manifest["num_items"]),
        max_history=int(manifest["config"]["features"]["max_history"]),
        rating_scale=(manifest["config"]["clean"]["min_value"], manifest["config"]["clean"]["max_value"]),
        users=np.asarray(test["user_idx"], dtype=np.int32),
        train_histories=train_histories,
        validation_targets=np.asarray([validation["target_item"][i] for i in order], dtype=np.int32),
        test_targets=np.asarray(test["target_item"], dtype=np.int32),
        test_seen=test["seen_items"],
        test_ratings=np.asarray(test["target_rating_raw"], dtype=np.float32),
        test_likes=np.asarray(test["target_like"], dtype=np.int8),
        train_ratings=train_ratings,
        validation_ratings=pa.table(
            {
                "user_idx": pa.array(validation["user_idx"], pa.int32()),
                "item_idx": pa.array(validation["target_item"], pa.int32()),
                "rating": pa.array(validation["target_rating_raw"], pa.float32()),
            }
        ).filter(pc.is_finite(pa.array(validation["target_rating_raw"], pa.float32()))),
    )


def pessimistic_ranks(scores: np.ndarray, targets: np.ndarray, seen: list[list[int]]) -> np.ndarray:
    """Ranks of targets; scores is (users, num_items + 1) indexed by item_idx, column 0 (padding) ignored."""
    scores = scores.astype(np.float64, copy=True)
    scores[:, 0] = -np.inf
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets]
    for row, items in enumerate(seen):
        scores[row, items] = -np.inf
    scores[rows, targets] = -np.inf
    better_or_equal = (scores >= target_scores[:, None]) & np.isfinite(scores)
    return 1 + better_or_equal.sum(axis=1)


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    metrics = {}
    for k in CUTOFFS:
        hit = ranks <= k
        metrics[f"HR@{k}"] = float(hit.mean())
        metrics[f"NDCG@{k}"] = float(np.where(hit, 1 / np.log2(ranks + 1), 0).mean())
        metrics[f"MRR@{k}"] = float(np.where(hit, 1 / ranks, 0).mean())
    return metrics


def write_ranks(out: Path, model: str, split: Split, ranks: np.ndarray) -> dict[str, float]:
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array(split.users, pa.int32()),
                "target_item": pa.array(split.test_targets, pa.int32()),
                "rank": pa.array(ranks, pa.int32()),
            }
        ),
        out / f"ranks-{model}.parquet",
    )
    return ranking_metrics(ranks)


def record(out: Path, model: str, entry: dict) -> None:
    """Adds one model's entry to peers.json, keeping the other models' entries from earlier runs."""
    path = out / "peers.json"
    results = json.loads(path.read_text()) if path.exists() else {"models": {}}
    results["models"][model] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")


def run_popularity(split: Split, out: Path) -> dict:
    started = time.perf_counter()
    counts = np.bincount(split.train_ratings["item_idx"].to_numpy(), minlength=split.num_items + 1)
    scores = np.broadcast_to(counts.astype(np.float64), (len(split.users), split.num_items + 1))
    ranks = pessimistic_ranks(scores, split.test_targets, split.test_seen)
    return {
        "train_wall_seconds": time.perf_counter() - started,
        "test_metrics": write_ranks(out, "Pop", split, ranks),
        "hyperparameters": {"score": "number of training interactions of the item"},
    }


def run_svdpp(split: Split, out: Path, seed: int) -> dict:
    import pandas as pd
    from surprise import Dataset, Reader, SVDpp

    # Every rating known before the test targets, as the sequential models and polyrec read each user's
    # validation item (and polyrec its rating) in the test-time history.
    ratings = pa.concat_tables([split.train_ratings.cast(split.validation_ratings.schema), split.validation_ratings]).to_pandas().dropna()
    if ratings.empty or None in split.rating_scale:
        return {"train_wall_seconds": 0.0, "skipped": "the split has no ratings, or no rating range (clean.min_value, clean.max_value)"}
    trainset = Dataset.load_from_df(ratings[["user_idx", "item_idx", "rating"]], Reader(rating_scale=split.rating_scale)).build_full_trainset()
    algorithm = SVDpp(random_state=seed, verbose=True)
    started = time.perf_counter()
    algorithm.fit(trainset)
    train_seconds = time.perf_counter() - started
    predictions = [algorithm.predict(int(user), int(item)) for user, item in zip(split.users, split.test_targets)]
    table = pd.DataFrame(
        {
            "user_idx": split.users,
            "target_item": split.test_targets,
            "target_rating_raw": split.test_ratings,
            "target_like": split.test_likes,
            "prediction": np.array([p.est for p in predictions], dtype=np.float32),
        }
    )
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out / "svdpp-predictions.parquet")
    errors = table["prediction"] - table["target_rating_raw"]
    return {
        "train_wall_seconds": train_seconds,
        "train_ratings": len(ratings),
        "test_rmse": float(np.sqrt((errors**2).mean())),
        "test_predictions_impossible": sum(p.details.get("was_impossible", False) for p in predictions),
        "hyperparameters": {
            key: getattr(algorithm, key)
            for key in (
                "n_factors",
                "n_epochs",
                "init_mean",
                "init_std_dev",
                "lr_bu",
                "lr_bi",
                "lr_pu",
                "lr_qi",
                "lr_yj",
                "reg_bu",
                "reg_bi",
                "reg_pu",
                "reg_qi",
                "reg_yj",
            )
        }
        | {"rating_scale": list(split.rating_scale), "clip": True},
    }


def write_benchmark_files(split: Split, dataset_dir: Path) -> None:
    """RecBole atomic benchmark files holding exactly polyrec's split (see the module docstring)."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"

    def line(user: int, history: list[int], target: int) -> str:
        return f"{user}\t{' '.join(map(str, history[-split.max_history :]))}\t{target}\n"

    files = {kind: [header] for kind in ("train", "valid", "test")}
    for user, history, validation_target, test_target in zip(split.users, split.train_histories, split.validation_targets, split.test_targets):
        files["train"] += [line(user, history[:t], history[t]) for t in range(1, len(history))]
        files["valid"].append(line(user, history, validation_target))
        files["test"].append(line(user, history + [validation_target], test_target))
    for kind, lines in files.items():
        (dataset_dir / f"{DATASET_NAME}.{kind}.inter").write_text("".join(lines))


class TimeCapReached(Exception):
    """Raised after the first validated epoch that ends past --max-minutes-per-model."""


def capped_run_to_continue(kept: dict | None, split_fingerprint: str, hyperparameters: dict) -> tuple[Path, Path] | None:
    """(the state to resume from, the best epoch's checkpoint) of a kept run that stopped at its time cap, on this split
    and with these hyperparameters (the cap aside); None when training must start afresh."""
    if not kept or kept.get("stop_reason") != "time_capped" or kept.get("split_hash") != split_fingerprint or "last_state" not in kept:
        return None
    if {k: v for k, v in kept["hyperparameters"].items() if k != "max_minutes_per_model"} != json.loads(json.dumps(hyperparameters)):
        return None
    paths = Path(kept["last_state"]), Path(kept["checkpoint"])
    return paths if all(path.exists() for path in paths) else None


def run_recbole(
    model_name: str,
    split: Split,
    out: Path,
    work: Path,
    seed: int,
    max_minutes: float,
    train_batch_size: int | None,
    epochs: int | None,
    kept: dict | None,
    split_fingerprint: str,
) -> dict:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    model_keys = [
        line.split(":")[0]
        for line in (Path(sys.modules["recbole"].__file__).parent / "properties" / "model" / f"{model_name}.yaml").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    config = Config(
        model=model_name,
        dataset=DATASET_NAME,
        config_dict={
            "data_path": str(work),
            "checkpoint_dir": str(work / "checkpoints"),
            "benchmark_filename": ["train", "valid", "test"],
            "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
            "MAX_ITEM_LIST_LENGTH": split.max_history,
            "loss_type": "CE",
            "train_neg_sample_args": None,
            "eval_args": {"group_by": "user", "order": "TO", "split": {"RS": [0.8, 0.1, 0.1]}, "mode": "full"},
            "metrics": ["NDCG", "Hit"],
            "topk": [10],
            "valid_metric": "NDCG@10",
            "stopping_step": STOPPING_STEP,
            "seed": seed,
            "reproducibility": True,
            "use_gpu": False,
            "device": "cpu",
            "show_progress": False,
            "worker": 0,
            **({"train_batch_size": train_batch_size} if train_batch_size else {}),
            **({"epochs": epochs} if epochs else {}),
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    hyperparameters = {
        key: config[key]
        for key in [
            *model_keys,
            "MAX_ITEM_LIST_LENGTH",
            "epochs",
            "train_batch_size",
            "learning_rate",
            "weight_decay",
            "clip_grad_norm",
            "stopping_step",
            "eval_step",
            "valid_metric",
            "train_neg_sample_args",
        ]
    }

    epoch_log: list[dict] = []
    started = time.perf_counter()
    continued = capped_run_to_continue(kept, split_fingerprint, hyperparameters)
    if continued:
        resume_from, best_checkpoint = continued
        # torch >= 2.6 loads with weights_only=True, which rejects RecBole's checkpoint (it pickles the Config);
        # resume_checkpoint passes no weights_only, so torch's documented switch decides.
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        trainer.resume_checkpoint(resume_from)
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        trainer.saved_model_file = str(best_checkpoint)  # a better epoch replaces the best one's checkpoint, as in one run
        epoch_log = list(kept["epochs"])
        started -= kept["train_wall_seconds"]
        print(
            f"[{model_name}] continuing the time-capped run after its epoch {epoch_log[-1]['epoch']} "
            f"({kept['train_wall_seconds'] / 60:.1f} min so far) from {resume_from}",
            flush=True,
        )

    last_state = Path(trainer.saved_model_file).with_suffix(".last.pth")

    def after_validation(epoch: int, valid_score: float) -> None:
        elapsed = time.perf_counter() - started
        previous = epoch_log[-1]["elapsed_seconds"] if epoch_log else 0.0
        epoch_log.append({"epoch": epoch, "valid_ndcg@10": float(valid_score), "elapsed_seconds": elapsed, "train_loss": float(trainer.train_loss_dict[epoch])})
        print(
            f"[{model_name}] epoch {epoch}: loss {trainer.train_loss_dict[epoch]:.4f}, valid NDCG@10 "
            f"{valid_score:.4f} (best {trainer.best_valid_score:.4f}), epoch {elapsed - previous:.0f}s, "
            f"total {elapsed / 60:.1f} min",
            flush=True,
        )
        if elapsed > max_minutes * 60:
            # RecBole keeps the best epoch's state only; continuing this run under a higher cap needs the last one.
            trainer._save_checkpoint(epoch, saved_model_file=str(last_state), verbose=False)
            raise TimeCapReached

    try:
        trainer.fit(train_data, valid_data, verbose=False, saved=True, callback_fn=after_validation)
        stop_reason = "early_stopped" if len(epoch_log) < config["epochs"] else "max_epochs"
    except TimeCapReached:
        stop_reason = "time_capped"
    train_seconds = time.perf_counter() - started

    # torch >= 2.6 loads with weights_only=True, which rejects RecBole's checkpoint (it pickles the Config).
    checkpoint = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.eval()

    item_tokens = dataset.field2id_token["item_id"]
    item_idx_of_internal = np.array([0] + [int(token) for token in item_tokens[1:]])
    user_tokens = dataset.field2id_token["user_id"]
    row_of_user = {user: row for row, user in enumerate(split.users)}
    scores = np.full((len(split.users), split.num_items + 1), -np.inf)
    scored_rows = []
    with torch.no_grad():
        for interaction, _, _, _ in test_data:
            batch_scores = model.full_sort_predict(interaction).view(len(interaction), -1).numpy()
            rows = [row_of_user[int(user_tokens[u])] for u in interaction["user_id"].tolist()]
            scores[np.ix_(rows, item_idx_of_internal[1:])] = batch_scores[:, 1:]
            scored_rows += rows
    if sorted(scored_rows) != list(range(len(split.users))):
        sys.exit(f"{model_name}: RecBole's test loader did not give every test user exactly once")
    ranks = pessimistic_ranks(scores, split.test_targets, split.test_seen)
    return {
        "train_wall_seconds": train_seconds,
        "epochs_run": len(epoch_log),
        "best_epoch": int(checkpoint["epoch"]),
        "stop_reason": stop_reason,
        "validation_ndcg@10_recbole": float(checkpoint["best_valid_score"]),
        "test_metrics": write_ranks(out, model_name, split, ranks),
        "items_unknown_to_recbole": split.num_items - (len(item_tokens) - 1),
        "epochs": epoch_log,
        "hyperparameters": hyperparameters | {"max_minutes_per_model": max_minutes},
        "checkpoint": str(trainer.saved_model_file),
        **({"last_state": str(last_state)} if stop_reason == "time_capped" else {}),
        **({"continued_from": {"epochs_run": len(kept["epochs"]), "max_minutes": kept["hyperparameters"]["max_minutes_per_model"]}} if continued else {}),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {package: version(package) for package in ("recbole", "torch", "numpy", "scikit-surprise", "pandas", "pyarrow")} | {"python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="polyrec preprocessing output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=["SVDpp", *RECBOLE_MODELS])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--max-minutes-per-model", type=float, default=float("inf"), help="stop training after the first epoch that ends past this many minutes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-batch-size", type=int, default=None, help="RecBole's train_batch_size; default: the model's own (2048)")
    parser.add_argument("--epochs", type=int, default=None, help="RecBole's epoch bound (early stopping ends most runs); default: its own (300)")
    parser.add_argument(
        "--work", type=Path, default=Path(__file__).resolve().parents[1] / "_work" / "peers", help="RecBole's benchmark files, checkpoints and logs"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    data, out, work = args.data.resolve(), args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(data)
    write_benchmark_files(split, work / DATASET_NAME)
    os.chdir(work)  # RecBole writes its tensorboard logs under the working directory
    common = {
        "threads": args.threads,
        "seed": args.seed,
        "versions": versions(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "data": str(args.data),
        "data_content_hash": split.content_hash,
        "split_hash": split_hash(data),
        "test_users": len(split.users),
        "ranking": "all items, history masked, ties pessimistic",
    }
    for model in args.models:
        print(f"== {model}", flush=True)
        if model == "Pop":
            entry = run_popularity(split, out)
        elif model == "SVDpp":
            entry = run_svdpp(split, out, args.seed)
        else:
            record_file = out / "peers.json"
            kept = json.loads(record_file.read_text())["models"].get(model) if record_file.exists() else None
            entry = run_recbole(model, split, out, work, args.seed, args.max_minutes_per_model, args.train_batch_size, args.epochs, kept, common["split_hash"])
        record(out, model, common | entry)
        summary = entry.get("test_metrics") or ({"RMSE": entry["test_rmse"]} if "test_rmse" in entry else {})
        figures = ", ".join(f"{k} {v:.4f}" for k, v in summary.items()) or entry.get("skipped", "")
        print(f"== {model} done in {entry['train_wall_seconds']:.0f}s: {figures}", flush=True)


if __name__ == "__main__":
    main()
