"""Quality on any dataset polyrec reads: polyrec against RecBole's SASRec, GRU4Rec and BERT4Rec, Surprise's SVD++
and popularity, on one split and by one evaluator, with one command::

    flock /tmp/polyrec-heavy.lock .venv/bin/python bench/quality/run.py --preprocess-config FILE --seeds 0 1 2

``FILE`` is a preprocessing config (``data.config.PreprocessConfig``: a MovieLens folder, a ``table`` source, Amazon
files, ...); without it, the embedded MovieLens-100K. The command preprocesses the data with polyrec, builds the
peers' virtual environment if it is missing (``setup_peers.sh``: RecBole 1.2.1 needs numpy < 2), trains the peers
on that split in it (``peers.py``), trains polyrec once per seed and each ``--variant``, then the default and every
variant once more on a cold-item split (``COLD_ITEM_FRACTION`` of the items withheld from training), scores
everything with polyrec's own metric functions and writes the section "Quality on NAME" of bench/RESULTS.md (NAME:
``--name``, by default the config file's stem).

Protocol: every interaction of the preprocessed split, leave-one-out (last = test, second-to-last = validation),
full ranking over all items with the user's earlier items masked, ties counted against the model
(``train.metrics``). The table gives polyrec's mean ± sample standard deviation over the seeds; the targets judge
the mean against the best peer that converged (stopped early on validation, not at its time cap).

What is kept, so that a rerun only trains what changed:

- the peers' per-user test ranks and SVD++'s predictions, in ``bench/quality/peers/<split fingerprint>/`` (the
  fingerprint, ``split_hash.py``, covers exactly what a peer sees; a model is re-run only when it has no result
  for this split at the requested epochs and batch size, and one that stopped at a lower ``--peer-max-minutes``
  than asked for continues from its checkpoint, ``peers.py``);
- each polyrec training's metrics, in ``bench/quality/polyrec/<name>/<key>.json`` (committed, as the peers' are, so
  that a table can be re-rendered on another machine), the key covering the split and the whole training config; a
  kept result is used while the code of ``train/``, ``data/`` and ``common/`` is the one it was trained with
  (comments, docstrings and layout aside: ``source_fingerprint``). The models it trained stay on the machine, in
  ``bench/_work/quality/<name>/models/<key>/``.

A variant with ``warm_start_from=<default>`` (``FROM_DEFAULT``) is a second training stage: each of its seeds starts
from the default model of that seed and split (trained first unless kept), e.g. LoRA fine-tuning after the default's
frozen backbone, ``--variant "lora-ft=model.backbone.mode=lora,epochs=1,warm_start_from=<default>"``. Its train wall is
the second stage's alone.

``--report-only`` re-renders the section from what is kept (whatever source it was trained with) without training.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.quality.split_hash import split_hash  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from common.errors import InputError  # noqa: E402
from common.storage import read_table, resolve  # noqa: E402
from data import schema  # noqa: E402
from data.config import PreprocessConfig  # noqa: E402
from data.manifest import Manifest, load_manifest  # noqa: E402
from train.artifact import TRAINED_ARTIFACT_DIR  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.evaluate import ranking_metrics  # noqa: E402
from train.metrics import mae, rmse  # noqa: E402
from train.trainer import ablation_config  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = REPO / "bench" / "_work" / "quality"
PEERS = HERE / "peers"
RECORDS = HERE / "polyrec"
PEERS_PYTHON = REPO / "bench" / ".venv-peers" / "bin" / "python"
DEFAULT_NAME = "MovieLens-100K"
RANKING_PEERS = ("SASRec", "GRU4Rec", "BERT4Rec")
ALL_PEERS = ("Pop", "SVDpp", *RANKING_PEERS)
#: RecBole's own batch is 2,048; 256 gives eight times the updates per epoch (the SASRec paper used 128), without
#: which RecBole would need hours per model here.
PEER_TRAIN_BATCH_SIZE = 256
#: RecBole's own epoch bound; early stopping (patience 5 on validation NDCG@10) ends a converging run long before.
RECBOLE_EPOCHS = 300
KS = (10, 20)
METRICS = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20")
#: Share of items withheld from training in the cold-start check.
COLD_ITEM_FRACTION = 0.1
#: The sources whose change invalidates a kept polyrec result.
SOURCE_FOLDERS = ("train", "data", "common")
#: Named variants that need no overrides: the id-only ablation (``train.trainer.ablation_config``).
BUILTIN_VARIANTS = ("id-only",)
#: A variant's ``warm_start_from`` that starts each of its runs from the default model of the same seed and split:
#: the second stage of a two-stage training, such as LoRA fine-tuning after training with the backbone frozen.
FROM_DEFAULT = "<default>"


# ---------------------------------------------------------------- configs, variants and what is kept


def parse_overrides(text: str) -> dict[str, Any]:
    """``a.b=1,c=[x, y]`` → ``{"a": {"b": 1}, "c": ["x", "y"]}``: dotted config keys, YAML values, split at the
    commas that start another ``key=`` (so a YAML list or mapping may hold commas)."""
    nested: dict[str, Any] = {}
    for assignment in re.split(r",(?=\s*[A-Za-z_][\w.]*=)", text):
        key, sep, value = assignment.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
            raise InputError(f"override {assignment!r}: expected key.path=value")
        *parents, leaf = key.strip().split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {key}: {part} is set to a value and has keys under it")
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return nested


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name=key.path=value,...`` (a variant given as train-config overrides) or a built-in name."""
    name, sep, overrides = text.partition("=")
    if not re.fullmatch(r"[\w-]+", name):
        raise InputError(f"--variant {text!r}: the name must be letters, digits, '-' or '_'")
    if not sep:
        if name not in BUILTIN_VARIANTS:
            raise InputError(f"--variant {text!r}: not a built-in variant ({', '.join(BUILTIN_VARIANTS)}); give name=key.path=value,...")
        return name, {}
    return name, parse_overrides(overrides)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def train_config(overrides: dict[str, Any], variant: str | None, seed: int, data_dir: Path, max_epochs: int | None) -> TrainConfig:
    """The default ``TrainConfig`` with ``overrides`` (the base ``--train-override`` and the variant's), seed and data."""
    settings = merged({"seed": seed, "data": str(data_dir), "model_version": "quality-bench"}, overrides)
    if max_epochs is not None:
        settings["epochs"] = max_epochs
    config = TrainConfig.from_yaml(None, **settings)
    return ablation_config(config, "id_only", Path(config.output)) if variant == "id-only" else config


def source_fingerprint() -> str:
    """The code of ``SOURCE_FOLDERS`` as Python runs it: its syntax tree without docstrings, so that an edit of a
    comment, a docstring or the layout keeps the results trained before it, and any other edit does not."""
    digest = hashlib.sha256()
    for path in sorted(p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_bytes())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0].value, "value", None), str):
                node.body = body[1:] or [ast.Pass()]
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + ast.dump(tree).encode())
    return digest.hexdigest()


def run_key(split: str, config: TrainConfig) -> str:
    settings = config.model_dump(mode="json", exclude={"data", "output", "run_name", "model_version"})
    return hashlib.sha256(json.dumps([split, settings], sort_keys=True).encode()).hexdigest()[:16]


def model_folder(models: Path, split: str, config: TrainConfig) -> Path:
    """Where the training of ``config`` on ``split`` keeps its output (its artifact in ``TRAINED_ARTIFACT_DIR``)."""
    return models / run_key(split, config)


def trained(config: TrainConfig, split: str, sources: str | None, kept: Path, models: Path, warm_start: Path | None = None) -> dict | None:
    """polyrec's test metrics, seconds and validation curve for ``config``: kept in ``kept`` and trained from
    ``sources`` (None: from any source, and no training), or from a training now into ``models``, started from the
    artifact ``warm_start`` when given (``config`` names it by ``FROM_DEFAULT``, so that the key does not hold a
    machine's path)."""
    from train.trainer import run_training

    key = run_key(split, config)
    record = kept / f"{key}.json"
    if record.exists() and (sources is None or json.loads(record.read_text()).get("sources") == sources):
        return json.loads(record.read_text())
    if sources is None:
        return None
    output = model_folder(models, split, config)
    shutil.rmtree(output, ignore_errors=True)  # an unfinished earlier run: training refuses to overwrite an artifact
    started = time.perf_counter()
    update = {"output": str(output)} | ({"warm_start_from": str(warm_start)} if warm_start else {})
    result = run_training(config.model_copy(update=update))
    entry = {
        "seed": config.seed,
        "seconds": time.perf_counter() - started,
        "metrics": result.test_metrics,
        "validation_ndcg@10": [record["validation/NDCG@10"] for record in result.history],
        "load_average": os.getloadavg()[0],
        "sources": sources,
    }
    kept.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(entry, indent=2))
    return entry


def polyrec_runs(
    variant: str | None,
    overrides: dict[str, Any],
    seeds: list[int],
    data: Path,
    split: str,
    *,
    base: dict[str, Any],
    sources: str | None,
    kept: Path,
    models: Path,
    max_epochs: int | None,
) -> dict[int, dict]:
    """polyrec's run (``trained``) per seed of ``variant`` (None: the default) on ``split`` of ``data``. A variant whose
    ``warm_start_from`` is ``FROM_DEFAULT`` starts each seed from the default model of that seed and split, which is
    trained first unless it is kept."""
    out = {}
    for seed in seeds:
        config = train_config(merged(base, overrides), variant, seed, data, max_epochs)
        warm_start = None
        if config.warm_start_from == FROM_DEFAULT:
            default = train_config(base, None, seed, data, max_epochs)
            if trained(default, split, sources, kept, models) is None:
                continue
            warm_start = model_folder(models, split, default) / TRAINED_ARTIFACT_DIR
        run = trained(config, split, sources, kept, models, warm_start)
        if run is not None:
            out[seed] = run
    return out


# ---------------------------------------------------------------- the peers


def peer_is_kept(entry: dict | None, split: str, epochs: int, max_minutes: float) -> bool:
    """Whether a peer's kept run answers this request; one stopped at a lower time cap than asked for is not (peers.py
    continues it from its checkpoint)."""
    if entry is None or entry.get("split_hash") != split:
        return False
    settings = entry.get("hyperparameters", {})
    if "epochs" not in settings:  # popularity and SVD++: no epochs, no cap
        return True
    if entry.get("stop_reason") == "time_capped" and settings["max_minutes_per_model"] < max_minutes:
        return False
    return settings["epochs"] == epochs and settings["train_batch_size"] == PEER_TRAIN_BATCH_SIZE


def ensure_peers(data_dir: Path, split: str, models: list[str], args: argparse.Namespace) -> Path:
    """The peers' folder for this split, after training the requested models it does not hold yet."""
    folder = PEERS / split[:16]
    record = folder / "peers.json"
    runs = json.loads(record.read_text())["models"] if record.exists() else {}
    epochs = args.peer_max_epochs or RECBOLE_EPOCHS
    missing = [model for model in models if not peer_is_kept(runs.get(model), split, epochs, args.peer_max_minutes)]
    kept = ", ".join(sorted(set(models) - set(missing))) or "none"
    held_back = "--report-only" if args.report_only else "--no-peer-training" if args.no_peer_training else None
    to_train = f"to train: {', '.join(missing) or 'none'}"
    if missing and held_back:
        to_train = f"not trained ({held_back}): {', '.join(missing)}, reported as kept, if kept at all"
    print(f"split {split[:16]}: peers kept in {folder}: {kept}; {to_train}")
    if not missing or held_back:
        return folder
    if not PEERS_PYTHON.exists():
        subprocess.run([str(HERE / "setup_peers.sh")], check=True)
    command = [str(PEERS_PYTHON), str(HERE / "peers.py"), "--data", str(data_dir), "--out", str(folder), "--models", *missing]
    command += ["--threads", str(args.peer_threads), "--seed", "0", "--train-batch-size", str(PEER_TRAIN_BATCH_SIZE), "--epochs", str(epochs)]
    command += ["--max-minutes-per-model", str(args.peer_max_minutes), "--work", str(REPO / "bench" / "_work" / "peers" / split[:16])]
    print("peers:", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    return folder


def peer_results(folder: Path, split: str, test: pa.Table) -> tuple[dict, dict[str, dict[str, float]], dict[str, float] | None]:
    """The peers' kept runs (peers.json) and their metrics on ``test``; refuses results of another split."""
    record = folder / "peers.json"
    runs = json.loads(record.read_text())["models"] if record.exists() else {}
    stale = sorted(name for name, run in runs.items() if run.get("split_hash") != split)
    if stale:
        raise SystemExit(f"{record}: {', '.join(stale)} ran on another split than this one ({split[:12]}…)")
    expected = dict(zip(test["user_idx"].to_pylist(), test["target_item"].to_pylist()))
    ranking: dict[str, dict[str, float]] = {}
    for model in (*RANKING_PEERS, "Pop"):
        path = folder / f"ranks-{model}.parquet"
        if model not in runs or not path.exists():
            continue
        ranks = pq.read_table(path)
        if dict(zip(ranks["user_idx"].to_pylist(), ranks["target_item"].to_pylist())) != expected:
            raise SystemExit(f"{path}: its (user, target) pairs are not this split's test rows")
        ranking[model] = ranking_metrics(ranks["rank"].to_numpy(), KS)
    svdpp = None
    predictions_file = folder / "svdpp-predictions.parquet"
    if "SVDpp" in runs and predictions_file.exists():
        predictions = pq.read_table(predictions_file)
        predicted, actual = predictions["prediction"].to_numpy(), predictions["target_rating_raw"].to_numpy()
        likes = predictions["target_like"].to_numpy()
        known = likes >= 0
        svdpp = {"rating/rmse": rmse(predicted, actual), "rating/mae": mae(predicted, actual), "like/auc": float(roc_auc_score(likes[known], predicted[known]))}
    return runs, ranking, svdpp


# ---------------------------------------------------------------- the measurement


def random_hit_rate(test: pa.Table, num_items: int, k: int, rows: np.ndarray) -> float:
    """HR@k a uniformly random ranking gets in expectation on ``rows``: k / candidates, capped at 1.
    The candidates are every item but the user's earlier ones; the target is one even when seen before."""
    seen, targets = test["seen_items"].to_pylist(), test["target_item"].to_pylist()
    candidates = np.array([num_items - len(set(seen[row]) - {targets[row]}) for row in rows], dtype=np.float64)
    return float(np.mean(np.minimum(k, candidates) / candidates))


def preprocessing_config(path: Path | None, output: Path, cold: bool = False) -> PreprocessConfig:
    """The data's preprocessing config with this benchmark's output; relative source paths are the caller's (the
    current directory's), made absolute so that Ray's workers read the same files."""
    config = PreprocessConfig.from_yaml(path)
    for source in (config.source, *config.extra_sources):
        for field in ("path", "items_path", "users_path"):
            value = getattr(source, field)
            if value is not None and "://" not in value:
                setattr(source, field, str(Path(value).resolve()))
    config.output = str(output)
    if cold:
        config.split.cold_item_fraction = COLD_ITEM_FRACTION
    if config.split.strategy != "leave_one_out":
        raise InputError(f"{path}: split.strategy is {config.split.strategy!r}; the quality benchmark's protocol is leave_one_out")
    return config


def preprocessed(config: PreprocessConfig, reuse: bool) -> Manifest:
    from data.pipeline import run_preprocess

    if reuse and (Path(config.output) / "manifest.json").exists():
        return load_manifest(config.output)
    shutil.rmtree(config.output, ignore_errors=True)
    return run_preprocess(config)


def data_shape(data_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """What the defaults' rules read: catalogue size and the users' history lengths before their test target."""
    lengths = np.array([len(seen) for seen in read_table(resolve(str(data_dir)), f"{schema.SEQUENCES_DIR}/test")["seen_items"].to_pylist()])
    features, clean = manifest.config["features"], manifest.config["clean"]
    return {
        "num_users": manifest.num_users,
        "num_items": manifest.num_items,
        "history_median": float(np.median(lengths)),
        "history_mean": float(lengths.mean()),
        "history_p90": float(np.percentile(lengths, 90)),
        "history_read_whole": float(np.mean(lengths <= features["max_history"])),
        "max_history": features["max_history"],
        "like_threshold": features["like_threshold"],
        "rating_range": [clean["min_value"], clean["max_value"]],
        "min_user_interactions": clean["min_user_interactions"],
    }


def cold_start(args: argparse.Namespace, work: Path, reuse: bool, variants: list[tuple[str | None, dict]], runs_of) -> dict[str, dict]:
    """The cold-item check, per model (the default, ``None``, and each variant; first seed): the same data with
    ``COLD_ITEM_FRACTION`` of the items withheld from training, scored on the test targets among them, where only an
    item's content can place it."""
    cold_dir = work / "cold-data"
    cold_manifest = preprocessed(preprocessing_config(args.preprocess_config, cold_dir, cold=True), reuse)
    cold_split = split_hash(cold_dir)
    cold_test = read_table(resolve(str(cold_dir)), f"{schema.SEQUENCES_DIR}/test")
    random_hr = random_hit_rate(cold_test, cold_manifest.num_items, 10, np.flatnonzero(cold_test["is_cold_target"].to_numpy(zero_copy_only=False)))
    out = {}
    for variant, overrides in variants:
        runs = runs_of(variant, overrides, args.seeds[:1], cold_dir, cold_split)
        if runs:
            seed, run = next(iter(runs.items()))
            metrics = run["metrics"]["polyrec"]
            out[variant or "polyrec"] = {
                "seed": seed,
                "num_rows": int(metrics.get("cold/num_rows", 0)),
                "HR@10": metrics.get("cold/HR@10", 0.0),
                "NDCG@10": metrics.get("cold/NDCG@10", 0.0),
                "random_HR@10": random_hr,
            }
    return out


def measure(args: argparse.Namespace, name: str) -> dict:
    import ray

    work = WORK / slug(name)
    kept = RECORDS / slug(name)
    data_dir = work / "data"
    reuse = args.report_only
    if not args.report_only:
        # The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether the training
        # controller lives, and logs a warning every few seconds without it.
        ray.init(logging_level="WARNING")
    manifest = preprocessed(preprocessing_config(args.preprocess_config, data_dir), reuse)
    split = split_hash(data_dir)
    peers_folder = ensure_peers(data_dir, split, args.peers, args)
    sources = None if args.report_only else source_fingerprint()
    base = parse_overrides(",".join(args.train_override)) if args.train_override else {}
    variants = [parse_variant(text) for text in args.variant]
    variant_seeds = args.variant_seeds or args.seeds[:1]
    runs_of = functools.partial(polyrec_runs, base=base, sources=sources, kept=kept, models=work / "models", max_epochs=args.max_epochs)

    results: dict[str, Any] = {
        "name": name,
        # what trained these results; --report-only and --no-write change only where the section goes
        "command": shlex.join(["bench/quality/run.py", *(arg for arg in sys.argv[1:] if arg not in ("--report-only", "--no-write"))]),
        "preprocess_config": str(args.preprocess_config) if args.preprocess_config else None,
        "manifest_hash": manifest.content_hash,
        "split_hash": split,
        "shape": data_shape(data_dir, manifest),
        "train_overrides": base,
        "max_epochs": args.max_epochs,
        "polyrec": runs_of(None, {}, args.seeds, data_dir, split),
        "variants": {variant: {"overrides": overrides, "runs": runs_of(variant, overrides, variant_seeds, data_dir, split)} for variant, overrides in variants},
    }
    if not results["polyrec"]:
        raise SystemExit(f"no kept polyrec result for this split and config in {kept}: run without --report-only first")
    if not args.skip_cold:
        results["cold"] = cold_start(args, work, reuse, [(None, {}), *variants], runs_of)
    if ray.is_initialized():
        ray.shutdown()
    test = read_table(resolve(str(data_dir)), f"{schema.SEQUENCES_DIR}/test")
    results["peer_folder"] = str(peers_folder.relative_to(REPO))
    results["peer_runs"], results["peers"], results["svdpp"] = peer_results(peers_folder, split, test)
    return results


# ---------------------------------------------------------------- the report


def slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-").lower()


def summary(runs: dict[Any, dict], model: str = "polyrec") -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (0 for one run) of every metric all ``runs`` have."""
    metrics = [run["metrics"][model] for run in runs.values()]
    shared = sorted(set.intersection(*(set(m) for m in metrics)))
    values = {key: np.array([m[key] for m in metrics], dtype=np.float64) for key in shared}
    return (
        {key: float(v.mean()) for key, v in values.items()},
        {key: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()},
    )


def cell(mean: dict[str, float] | None, key: str, std: dict[str, float] | None = None) -> str:
    value = (mean or {}).get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:.4f} ± {std[key]:.4f}" if std and key in std else f"{value:.4f}"


def seeds_label(runs: dict) -> str:
    seeds = ", ".join(str(seed) for seed in runs)
    return f"mean ± sd of seeds {seeds}" if len(runs) > 1 else f"seed {seeds}"


def converged(runs: dict, ranking: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The ranking peers that stopped on their own (early stopping on validation), not at the time or epoch cap."""
    return {name: metrics for name, metrics in ranking.items() if name in RANKING_PEERS and runs[name].get("stop_reason") == "early_stopped"}


def report(results: dict) -> str:
    shape, runs, peers = results["shape"], results["peer_runs"], results["peers"]
    polyrec_mean, polyrec_std = summary(results["polyrec"])
    polyrec_std = polyrec_std if len(results["polyrec"]) > 1 else None
    polyrec_row = f"polyrec ({seeds_label(results['polyrec'])})"
    seconds = {name: run["seconds"] for name, run in results["polyrec"].items()}
    rows: list[tuple[str, dict | None, dict | None, str]] = [(polyrec_row, polyrec_mean, polyrec_std, f"{max(seconds.values()) / 60:.1f} min")]
    if len(results["polyrec"]) > 1:
        rows += [(f"polyrec, seed {seed}", run["metrics"]["polyrec"], None, f"{run['seconds'] / 60:.1f} min") for seed, run in results["polyrec"].items()]
    for variant, entry in results["variants"].items():
        if entry["runs"]:
            mean, std = summary(entry["runs"])
            wall = max(run["seconds"] for run in entry["runs"].values())
            rows.append((f"polyrec {variant} ({seeds_label(entry['runs'])})", mean, std if len(entry["runs"]) > 1 else None, f"{wall / 60:.1f} min"))
    for name in RANKING_PEERS:
        if name in peers:
            rows.append((f"{name} ({runs[name].get('stop_reason', '')})", peers[name], None, f"{runs[name]['train_wall_seconds'] / 60:.1f} min"))
    popularity = next(iter(results["polyrec"].values()))["metrics"]["popularity"]
    rows.append(("popularity", popularity, None, ""))

    config_file = results["preprocess_config"]
    source = f"`--preprocess-config {config_file}`" if config_file else "the embedded MovieLens-100K (no `--preprocess-config`)"
    overrides = f"; every polyrec run with `--train-override {results['train_overrides']}`" if results["train_overrides"] else ""
    capped = f"; polyrec's epochs capped at {results['max_epochs']} (`--max-epochs`)" if results["max_epochs"] else ""
    low, high = shape["rating_range"]
    versions = next((run["versions"] for run in runs.values() if "versions" in run), {})
    loads = ", ".join(f"{run['load_average']:.1f}" for run in results["polyrec"].values())
    lines = [
        f"## Quality on {results['name']} (bench/quality)",
        "",
        f"Machine: {machine('ray', 'torch', 'transformers', 'deepspeed')}. Run {time.strftime('%Y-%m-%d', time.gmtime())}; "
        f"1-minute load average after polyrec's trainings {loads} "
        "(1-2 is the training alone); the peers' wall times come from their own runs.",
        "",
        f"Data: {source}{overrides}{capped}. {shape['num_users']:,} users (at least {shape['min_user_interactions']} "
        f"interactions), {shape['num_items']:,} items; history before the test target: median {shape['history_median']:.0f}, "
        f"mean {shape['history_mean']:.0f}, 90th percentile {shape['history_p90']:.0f} items, of which the last "
        f"{shape['max_history']} are read (`features.max_history`, by every model alike). Protocol: leave-one-out "
        "(last = test, second-to-last = validation), full ranking over every item with the user's earlier items masked, "
        f"ties counted against the model, {shape['num_users']:,} test users. One split (manifest "
        f"`{results['manifest_hash'][:12]}…`, split fingerprint `{results['split_hash'][:12]}…`) and one set of metric "
        "functions (`train.metrics`) for every model.",
        "",
        f"Command: `flock /tmp/polyrec-heavy.lock .venv/bin/python {results['command']}` (polyrec: the default `TrainConfig`"
        f"{' with the overrides above' if results['train_overrides'] else ''}). The peers run in "
        "their own environment (bench/.venv-peers, `setup_peers.sh`: "
        + ", ".join(f"{package} {version}" for package, version in versions.items())
        + f"), on the same split, once per split fingerprint (kept in `{results['peer_folder']}/`, with each model's "
        "command, epochs and hyperparameters): RecBole's defaults for each model except the protocol's (CE loss, max length "
        f"= `features.max_history`, early stopping on validation NDCG@10 with patience 5) and a training batch of {PEER_TRAIN_BATCH_SIZE} "
        "instead of 2,048. Beside each RecBole model, why it stopped: `early_stopped` (converged on validation), "
        "`time_capped` or `max_epochs` (a cap; its figures are then a floor and it is not the peer the targets judge).",
        "",
        "| model | " + " | ".join(METRICS) + " | train wall |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    lines += [f"| {name} | " + " | ".join(cell(mean, key, std) for key in METRICS) + f" | {wall} |" for name, mean, std, wall in rows]
    missing = [name for name in RANKING_PEERS if name not in peers]
    if missing:
        lines += ["", f"Not in this table: {', '.join(missing)} (no kept result for this split)."]
    if "Pop" in peers:
        lines += [
            "",
            f"Cross-check of the two ranking codes: peers.py's popularity gets HR@10 {peers['Pop']['HR@10']:.4f} and NDCG@10 "
            f"{peers['Pop']['NDCG@10']:.4f}; polyrec's evaluator's popularity {popularity['HR@10']:.4f} and {popularity['NDCG@10']:.4f}.",
        ]
    svdpp = results["svdpp"]
    if "rating/rmse" in polyrec_mean:
        lines += [
            "",
            f"Rating and like on the same test interactions (raw {low:g}–{high:g} ratings; a like is a rating ≥ "
            f"{shape['like_threshold']:g}; SVD++'s predicted rating is its like score; SVD++ is fitted on the training "
            "ratings and each user's validation rating, every rating known before the test target, as polyrec reads the "
            "validation item and its rating in the test-time history):",
            "",
            "| model | rating RMSE | rating MAE | like AUC |",
            "|---|---:|---:|---:|",
            f"| {polyrec_row} | " + " | ".join(cell(polyrec_mean, key, polyrec_std) for key in ("rating/rmse", "rating/mae", "like/auc")) + " |",
        ]
        for name, metrics in (("SVD++ (Surprise)", svdpp), ("popularity", popularity)):
            if metrics:
                lines.append(f"| {name} | " + " | ".join(cell(metrics, key) for key in ("rating/rmse", "rating/mae", "like/auc")) + " |")
    cold = results.get("cold", {})
    if cold:
        any_run = next(iter(cold.values()))
        lines += [
            "",
            f"Cold items: the same data with {COLD_ITEM_FRACTION:.0%} of the items withheld from training, each model trained "
            f"on it once (seed {any_run['seed']}) and scored on the {any_run['num_rows']} test targets among the withheld items, "
            "which only their content (text, attributes) can place; a random ranking gets HR@10 "
            f"{any_run['random_HR@10']:.4f} there:",
            "",
            "| model | cold HR@10 | cold NDCG@10 | HR@10 / random |",
            "|---|---:|---:|---:|",
        ]
        for model, run in cold.items():
            label = "polyrec" if model == "polyrec" else f"polyrec {model}"
            lines.append(f"| {label} | {run['HR@10']:.4f} | {run['NDCG@10']:.4f} | {run['HR@10'] / run['random_HR@10']:.1f}× |")
    lines += ["", "Targets (on polyrec's mean):", ""]
    lines += [f"- {verdict}" for verdict in verdicts(results, polyrec_mean, svdpp)]
    lines += ["", "Defaults and the data's shape (each default that could depend on the data, its rule, and whether this data meets it):", ""]
    lines += [f"- {rule}" for rule in default_rules(shape)]
    lines += ["", f"The peers' runs (`{results['peer_folder']}/peers.json`):", ""]
    for name, run in runs.items():
        facts = {
            key: value
            for key, value in run.items()
            # the checkpoints' paths are this machine's, not a fact of the run
            if isinstance(value, (int, float, str, bool))
            and key not in ("data", "data_content_hash", "split_hash", "split_hash_note", "command", "checkpoint", "last_state")
        }
        continued = run.get("continued_from")
        lines.append(
            f"- {name}: "
            + ", ".join(f"{key} {round(value, 4) if isinstance(value, float) else value}" for key, value in facts.items())
            + (f", continued from the state after its first {continued['epochs_run']} epochs (capped at {continued['max_minutes']:g} min)" if continued else "")
        )
    lines.append("")
    lines += [
        f"polyrec's validation NDCG@10 by epoch, seed {seed}: {', '.join(f'{v:.4f}' for v in run['validation_ndcg@10'])}."
        for seed, run in results["polyrec"].items()
    ]
    return "\n".join(lines)


def verdicts(results: dict, polyrec: dict[str, float], svdpp: dict[str, float] | None) -> list[str]:
    ranking = converged(results["peer_runs"], results["peers"])
    out = []
    if ranking:
        for metric, factor in (("NDCG@10", 1.15), ("HR@10", 1.10)):
            best = max(ranking, key=lambda name: ranking[name][metric])
            ratio = polyrec[metric] / ranking[best][metric]
            out.append(
                f"{metric}: polyrec {polyrec[metric]:.4f} = {ratio:.2f}× the best converged sequential peer ({best}, "
                f"{ranking[best][metric]:.4f}; target ≥ {factor:.2f}×: {'met' if ratio >= factor else 'missed'})"
            )
    else:
        out.append("ranking targets: no sequential peer converged on this split (none stopped early), so none is judged against")
    if svdpp and "rating/rmse" in polyrec:
        ratio = polyrec["rating/rmse"] / svdpp["rating/rmse"]
        out.append(
            f"rating RMSE: polyrec {polyrec['rating/rmse']:.4f} = {ratio:.2f}× SVD++'s {svdpp['rating/rmse']:.4f} "
            f"(target ≤ 0.97×: {'met' if ratio <= 0.97 else 'missed'})"
        )
        out.append(
            f"like AUC: polyrec {polyrec['like/auc']:.4f} vs SVD++'s rating as a like score {svdpp['like/auc']:.4f} "
            f"(target: above: {'met' if polyrec['like/auc'] > svdpp['like/auc'] else 'missed'})"
        )
    cold = results.get("cold", {}).get("polyrec")
    if cold:
        ratio = cold["HR@10"] / cold["random_HR@10"]
        out.append(
            f"cold items ({COLD_ITEM_FRACTION:.0%} of items withheld from training, {cold['num_rows']} test targets among them; "
            f"seed {cold['seed']}): HR@10 {cold['HR@10']:.4f} against {cold['random_HR@10']:.4f} for a random "
            f"ranking = {ratio:.1f}× (target ≥ 10×: {'met' if ratio >= 10 else 'missed'}); NDCG@10 {cold['NDCG@10']:.4f}"
        )
    return out


def default_rules(shape: dict[str, Any]) -> list[str]:
    """The rules that polyrec's data-dependent defaults follow, checked on this data. They read the data's shape
    (catalogue size, history lengths), never a test split's figures."""
    defaults = TrainConfig()
    tasks, max_history = defaults.model.tasks, shape["max_history"]
    window = min(defaults.window_targets, max_history)
    span = 2 / tasks.temperature
    sampled = tasks.sampled_retrieval(shape["num_items"])
    return [
        f"window length (`features.max_history` {max_history}): a setting of the protocol, not of polyrec, read by every "
        "model alike (SASRec's 50 for sets of this size); not tuned per dataset: on ml-100k 100 learned more slowly per "
        f"epoch than 50. Here it holds the whole history before the target for {shape['history_read_whole']:.0%} of the "
        f"users, the last {max_history} items for the others.",
        f"targets per training window (`window_targets` {defaults.window_targets}): rule: half of `max_history`, so every "
        f"training target has at least half the context a test target has; here {window} of {max_history} = "
        f"{window / max_history:.0%}: {'holds' if abs(2 * window - max_history) <= 1 else 'does not hold: set window_targets to max_history / 2'}.",
        f"softmax kind (`model.tasks.retrieval_loss` {tasks.retrieval_loss!r}): rule (`TaskConfig.sampled_retrieval`): the "
        f"full softmax up to `full_softmax_max_items` ({tasks.full_softmax_max_items:,}) items, where a sampled step "
        f"costs as much on a 2-core CPU (bench/scale.py), sampled with logQ correction above; here {shape['num_items']:,} "
        f"items: {'sampled' if sampled else 'full'}.",
        f"temperature (`model.tasks.temperature` {tasks.temperature:g}): logits are cosine / temperature, so their span is "
        f"2 / temperature = {span:g} nats; rule: that span must exceed ln(items) (the log-odds a softmax needs to single "
        f"out one item of the catalogue) with room to spare, at least 2×; here ln({shape['num_items']:,}) = "
        f"{np.log(shape['num_items']):.1f}: {'holds' if span >= 2 * np.log(shape['num_items']) else 'does not hold: lower the temperature'}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preprocess-config", type=Path, default=None, help="a polyrec preprocessing config (YAML); default: the embedded MovieLens-100K")
    parser.add_argument("--name", default=None, help=f"the dataset's name in RESULTS.md; default: the config file's stem, or {DEFAULT_NAME}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train polyrec once per seed; the targets judge the mean (default: 0 1 2)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a named polyrec variant as train-config overrides, name=key.path=value,... (or the built-in 'id-only'); repeatable; "
        "warm_start_from=<default> starts it from the default model of its seed and split",
    )
    parser.add_argument("--variant-seeds", type=int, nargs="+", default=None, help="seeds of each variant (default: the first of --seeds)")
    parser.add_argument("--train-override", action="append", default=[], help="key.path=value,... applied to every polyrec training")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap polyrec's epochs (smoke runs; default: the config's)")
    parser.add_argument("--peers", nargs="+", choices=ALL_PEERS, default=list(ALL_PEERS), help="peer models to run and report (default: all)")
    parser.add_argument("--peer-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--peer-max-minutes",
        type=float,
        default=90.0,
        help="each RecBole model stops after the first epoch past this (default: 90); one kept at a lower cap continues",
    )
    parser.add_argument("--peer-max-epochs", type=int, default=None, help=f"RecBole's epoch bound (default: {RECBOLE_EPOCHS}, its own)")
    parser.add_argument("--no-peer-training", action="store_true", help="report the peers kept for this split, train none")
    parser.add_argument("--skip-cold", action="store_true", help="leave out the cold-item split")
    parser.add_argument("--report-only", action="store_true", help="re-render the section from kept results, training nothing")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    name = args.name or (args.preprocess_config.stem if args.preprocess_config else DEFAULT_NAME)
    try:
        for text in args.variant:
            parse_variant(text)
        results = measure(args, name)
    except InputError as err:
        parser.exit(2, f"run.py: error: {err}\n")
    (WORK / slug(name) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    section = report(results)
    print(section)
    if not args.no_write:
        write_section(section.splitlines()[0], section)


if __name__ == "__main__":
    main()
