"""Quality on MovieLens-100K: polyrec with its default configuration against RecBole's SASRec, GRU4Rec and
BERT4Rec, Surprise's SVD++ and popularity, on one split and by one evaluator.

Protocol: every rating an interaction, users with fewer than 3 interactions dropped, each user's
interactions ordered by (timestamp, file order), last = test, second-to-last = validation, full ranking
over all items with the user's earlier items masked, ties counted against the model (``train.metrics``).

The peers are slow on a CPU, so they run once per split, in their own virtual environment (RecBole 1.2.1
needs numpy < 2), and keep their per-user test ranks in ``bench/quality/peers/``::

    bench/quality/setup_peers.sh
    bench/.venv-peers/bin/python bench/quality/peers.py --data bench/_work/quality/data --out bench/quality/peers

``run.py --report-only`` re-renders the section from the last polyrec run and the peers' current results.
This script re-runs polyrec every time: it preprocesses the embedded ml-100k, trains polyrec once per seed
(``--seeds``, default 0 and 1: one seed's spread is the size of the margins judged, so the table and the targets
use the seeds' mean), trains its id-only ablation, trains once more on a cold-item split, scores the peers' kept ranks and predictions
with polyrec's own metric functions, and writes the "Quality" section of bench/RESULTS.md. It refuses
to compare against peers that ran on another split (their manifest hash differs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.quality.split_hash import split_hash  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from common.storage import read_table, resolve  # noqa: E402
from data import schema  # noqa: E402
from data.config import PreprocessConfig  # noqa: E402
from data.pipeline import run_preprocess  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.evaluate import ranking_metrics  # noqa: E402
from train.metrics import mae, rmse  # noqa: E402
from train.trainer import ablation_config, run_training  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "_work" / "quality"
PEERS = HERE / "peers"
SECTION = "## Quality on MovieLens-100K (bench/quality)"
RANKING_PEERS = ("SASRec", "GRU4Rec", "BERT4Rec")
KS = (10, 20)
#: Share of items withheld from training in the cold-start check.
COLD_ITEM_FRACTION = 0.1


def timed_training(config: TrainConfig) -> tuple[dict[str, dict[str, float]], float, list[dict]]:
    started = time.perf_counter()
    result = run_training(config)
    return result.test_metrics, time.perf_counter() - started, result.history


def random_hit_rate(test: pa.Table, num_items: int, k: int, rows: np.ndarray) -> float:
    """HR@k a uniformly random ranking gets in expectation on ``rows``: k / candidates, capped at 1.
    The candidates are every item but the user's earlier ones; the target is one even when seen before."""
    seen, targets = test["seen_items"].to_pylist(), test["target_item"].to_pylist()
    candidates = np.array([num_items - len(set(seen[row]) - {targets[row]}) for row in rows], dtype=np.float64)
    return float(np.mean(np.minimum(k, candidates) / candidates))


def peer_results(this_split: str, test: pa.Table) -> tuple[dict, dict[str, dict[str, float]], dict[str, float] | None]:
    """The peers' kept runs (peers.json, one entry per model) and their metrics on ``test``; refuses results
    of another split (``split_hash``)."""
    record_file = PEERS / "peers.json"
    if not record_file.exists():
        raise SystemExit(f"no peer results in {PEERS}: run bench/quality/peers.py first (see this script's docstring)")
    runs = json.loads(record_file.read_text())["models"]
    stale = sorted(name for name, run in runs.items() if run.get("split_hash") != this_split)
    if stale:
        raise SystemExit(f"{record_file}: {', '.join(stale)} ran on another split than this one ({this_split[:12]}…): re-run bench/quality/peers.py on it")
    expected = dict(zip(test["user_idx"].to_pylist(), test["target_item"].to_pylist()))
    ranking: dict[str, dict[str, float]] = {}
    for model in (*RANKING_PEERS, "Pop"):
        path = PEERS / f"ranks-{model}.parquet"
        if model not in runs or not path.exists():
            continue
        ranks = pq.read_table(path)
        got = dict(zip(ranks["user_idx"].to_pylist(), ranks["target_item"].to_pylist()))
        if got != expected:
            raise SystemExit(f"{path}: its (user, target) pairs are not this split's test rows")
        ranking[model] = ranking_metrics(ranks["rank"].to_numpy(), KS)
    svdpp = None
    predictions_file = PEERS / "svdpp-predictions.parquet"
    if "SVDpp" in runs and predictions_file.exists():
        predictions = pq.read_table(predictions_file)
        predicted = predictions["prediction"].to_numpy()
        actual = predictions["target_rating_raw"].to_numpy()
        likes = predictions["target_like"].to_numpy()
        known = likes >= 0
        svdpp = {
            "rating/rmse": rmse(predicted, actual),
            "rating/mae": mae(predicted, actual),
            "like/auc": float(roc_auc_score(likes[known], predicted[known])),
            "rating/num_rows": len(predicted),
        }
    return runs, ranking, svdpp


def _cell(metrics: dict[str, float] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"


def _load_note(results: dict) -> str:
    """What else ran: wall times on 2 shared cores mean little without it."""
    if "load_average" not in results:
        return "polyrec's machine load was not recorded; the peers' wall times come from their own runs."
    before, after = results["load_average"]
    return (
        f"1-minute load average {before:.1f} before polyrec's trainings and {after:.1f} after (1-2 is this job alone); "
        "the peers' wall times come from their own runs, which shared the machine with other jobs."
    )


def report(results: dict) -> str:
    polyrec, peers, runs = results["polyrec"], results["peers"], results["peer_runs"]
    ranking_peers = {name: metrics for name, metrics in peers.items() if name in RANKING_PEERS}
    per_seed = results["polyrec_seeds"]
    polyrec_row = f"polyrec (mean of seeds {', '.join(per_seed)})" if len(per_seed) > 1 else "polyrec"
    models = {polyrec_row: polyrec}
    models |= {f"polyrec, seed {seed}": metrics for seed, metrics in per_seed.items()} if len(per_seed) > 1 else {}
    models |= {"polyrec id-only (ablation)": results["id_only"], **ranking_peers, "popularity": results["popularity"]}
    seconds = {polyrec_row: results["polyrec_seconds"], "polyrec id-only (ablation)": results["id_only_seconds"]}
    seconds |= {f"polyrec, seed {seed}": value for seed, value in results["polyrec_seconds_by_seed"].items()}
    seconds |= {name: runs[name]["train_wall_seconds"] for name in ranking_peers}
    versions = next(iter(runs.values()), {}).get("versions", {})
    lines = [
        SECTION,
        "",
        f"Machine: {machine('ray', 'torch', 'transformers', 'deepspeed')}. Run {time.strftime('%Y-%m-%d', time.gmtime())}; " + _load_note(results),
        "",
        "Protocol: every rating an interaction, users with fewer than 3 interactions dropped, per-user order "
        "(timestamp, file order), leave-one-out (last = test, second-to-last = validation), full ranking over all "
        f"{results['num_items']:,} items with the user's earlier items masked, ties counted against the model, "
        f"{results['num_users']:,} test users. One split (manifest `{results['manifest_hash'][:12]}…`, "
        f"split fingerprint `{results['split_hash'][:12]}…`) and one set of metric "
        "functions (`train.metrics`) for every model; the peers' per-user test ranks come from bench/quality/peers.py, "
        "which masks the same way.",
        "",
        "polyrec: `.venv/bin/python bench/quality/run.py` (default `TrainConfig`, re-run every time). Peers: "
        "`bench/quality/setup_peers.sh`, then bench/quality/peers.py once per split, in their own environment ("
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + "); each model's command, seed, epochs and hyperparameters are kept in bench/quality/peers/peers.json. "
        "RecBole's own defaults for each model except the protocol's (CE loss, max length 50, early stopping on "
        "validation NDCG@10 with patience 5) and a training batch of 256 instead of 2,048 (eight times the updates "
        "per epoch; the original SASRec paper used 128): at 5–8 minutes per epoch on one thread here, RecBole's "
        "default would need hours to converge. Each peer also has a time cap; `stop_reason` below says whether it "
        "stopped early (converged on validation) or hit the cap (then its figures are a floor).",
        "",
        "| model | HR@10 | NDCG@10 | MRR@10 | HR@20 | NDCG@20 | MRR@20 | train wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in models.items():
        wall = f"{seconds[name] / 60:.1f} min" if name in seconds else ""
        lines.append(f"| {name} | " + " | ".join(_cell(metrics, key) for key in ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20")) + f" | {wall} |")
    missing = [name for name in RANKING_PEERS if name not in ranking_peers]
    if missing:
        lines += ["", f"Not in this table: {', '.join(missing)} (no kept result in bench/quality/peers; run peers.py --models {' '.join(missing)})."]
    if "Pop" in peers:
        lines += [
            "",
            f"Cross-check of the two ranking codes: peers.py's popularity gets HR@10 {peers['Pop']['HR@10']:.4f} and NDCG@10 "
            f"{peers['Pop']['NDCG@10']:.4f}; polyrec's evaluator's popularity {results['popularity']['HR@10']:.4f} and "
            f"{results['popularity']['NDCG@10']:.4f}.",
        ]

    svdpp = results["svdpp"]
    lines += [
        "",
        "Rating and like on the same test interactions (raw 1–5 ratings; a like is a rating ≥ 4; SVD++'s predicted "
        "rating serves as its like score; SVD++ is fitted on the training ratings and each user's validation rating, "
        "every rating known before the test target, as polyrec reads the validation item and its rating in the "
        "test-time history):",
        "",
        "| model | rating RMSE | rating MAE | like AUC |",
        "|---|---:|---:|---:|",
    ]
    for name, metrics in ((polyrec_row, polyrec), ("SVD++ (Surprise)", svdpp), ("popularity", results["popularity"])):
        lines.append(f"| {name} | {_cell(metrics, 'rating/rmse')} | {_cell(metrics, 'rating/mae')} | {_cell(metrics, 'like/auc')} |")
    lines += ["", "Targets:", ""]
    lines += [f"- {verdict}" for verdict in verdicts(results, seconds)]
    lines += ["", "The peers' runs (bench/quality/peers/peers.json):", ""]
    for name, run in runs.items():
        facts = {
            key: value
            for key, value in run.items()
            if isinstance(value, (int, float, str, bool)) and key not in ("data", "data_content_hash", "split_hash", "split_hash_note", "command")
        }
        lines.append(f"- {name}: " + ", ".join(f"{key} {round(value, 4) if isinstance(value, float) else value}" for key, value in facts.items()))
    lines += [""] + [f"polyrec's validation NDCG@10 by epoch, seed {seed}: {curve}." for seed, curve in results["polyrec_curves"].items()]
    return "\n".join(lines)


def verdicts(results: dict, seconds: dict[str, float]) -> list[str]:
    polyrec, svdpp = results["polyrec"], results["svdpp"]
    peers = {name: metrics for name, metrics in results["peers"].items() if name in RANKING_PEERS}
    seeds = results["polyrec_seeds"]
    seeds_note = f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    out = []
    if peers:
        best = max(peers, key=lambda name: peers[name]["NDCG@10"])
        for metric, factor in (("NDCG@10", 1.15), ("HR@10", 1.10)):
            ratio = polyrec[metric] / max(peers[n][metric] for n in peers)
            out.append(
                f"{metric}: polyrec {polyrec[metric]:.4f}{seeds_note} = {ratio:.2f}× the best peer (target ≥ {factor:.2f}×: "
                f"{'met' if ratio >= factor else 'missed'})"
            )
        reached = polyrec["NDCG@10"] >= peers[best]["NDCG@10"]
        if best in seconds:
            met = reached and results["polyrec_seconds"] <= seconds[best]
            out.append(
                f"speed: the best peer ({best}) trained for {seconds[best] / 60:.1f} min to NDCG@10 {peers[best]['NDCG@10']:.4f}; "
                f"polyrec's whole training run (Ray start, text vectors, every epoch, test evaluation{'; the slowest seed' if seeds_note else ''}) took "
                f"{results['polyrec_seconds'] / 60:.1f} min and "
                + ("ended above it" if reached else "ended below it")
                + f" (target: reach it in no more time: {'met' if met else 'missed'})"
            )
    else:
        out.append("ranking targets: no RecBole peer results yet")
    if svdpp:
        ratio = polyrec["rating/rmse"] / svdpp["rating/rmse"]
        out.append(
            f"rating RMSE: polyrec {polyrec['rating/rmse']:.4f}{seeds_note} = {ratio:.2f}× SVD++'s {svdpp['rating/rmse']:.4f} "
            f"(target ≤ 0.97×: {'met' if ratio <= 0.97 else 'missed'})"
        )
        out.append(
            f"like AUC: polyrec {polyrec['like/auc']:.4f} vs SVD++'s rating as a like score {svdpp['like/auc']:.4f} "
            f"(target: above: {'met' if polyrec['like/auc'] > svdpp['like/auc'] else 'missed'})"
        )
    cold = results.get("cold")
    if cold:
        ratio = cold["HR@10"] / cold["random_HR@10"]
        out.append(
            f"cold items ({COLD_ITEM_FRACTION:.0%} of items withheld from training, {cold['num_rows']} test targets among them): "
            f"HR@10 {cold['HR@10']:.4f} against {cold['random_HR@10']:.4f} for a random ranking = {ratio:.1f}× "
            f"(target ≥ 10×: {'met' if ratio >= 10 else 'missed'}); NDCG@10 {cold['NDCG@10']:.4f}"
        )
    return out


def mean_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """The metrics every run has, averaged over the runs."""
    shared = set.intersection(*(set(run) for run in runs))
    return {key: float(np.mean([run[key] for run in runs])) for key in sorted(shared)}


def measure_polyrec(skip_cold: bool, seeds: list[int]) -> dict:
    """Preprocess ml-100k, train polyrec once per seed and its id-only ablation (first seed), and (unless
    skipped) polyrec on a cold-item split (first seed)."""
    # The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether the
    # training controller lives, and logs a warning every few seconds without it.
    ray.init(logging_level="WARNING")
    for previous_output in WORK.glob("*"):
        if previous_output.is_dir():
            shutil.rmtree(previous_output)  # training refuses to overwrite an artifact
    load_before = os.getloadavg()[0]
    data_dir = WORK / "data"
    manifest = run_preprocess(PreprocessConfig(output=str(data_dir)))
    configs = {seed: TrainConfig(data=str(data_dir), output=str(WORK / f"polyrec-seed{seed}"), model_version="quality-bench", seed=seed) for seed in seeds}
    per_seed, seconds, curves = {}, {}, {}
    for seed, config in configs.items():
        metrics, seconds[seed], history = timed_training(config)
        per_seed[seed] = metrics["polyrec"]
        curves[seed] = ", ".join(f"{record['validation/NDCG@10']:.4f}" for record in history)
    id_only, id_only_seconds, _ = timed_training(ablation_config(configs[seeds[0]], "id_only", WORK / "polyrec-id-only"))
    results = {
        "manifest_hash": manifest.content_hash,
        "num_users": manifest.num_users,
        "num_items": manifest.num_items,
        "polyrec": mean_metrics(list(per_seed.values())),
        "polyrec_seeds": per_seed,
        "popularity": metrics["popularity"],
        "id_only": id_only["polyrec"],
        "polyrec_seconds": max(seconds.values()),
        "polyrec_seconds_by_seed": seconds,
        "id_only_seconds": id_only_seconds,
        "polyrec_curves": curves,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    if not skip_cold:
        cold_dir = WORK / "cold-data"
        cold_config = PreprocessConfig(output=str(cold_dir))
        cold_config.split.cold_item_fraction = COLD_ITEM_FRACTION
        cold_manifest = run_preprocess(cold_config)
        cold_metrics, _, _ = timed_training(TrainConfig(data=str(cold_dir), output=str(WORK / "polyrec-cold"), model_version="quality-cold", seed=seeds[0]))
        cold_test = read_table(resolve(str(cold_dir)), f"{schema.SEQUENCES_DIR}/test")
        cold_rows = np.flatnonzero(cold_test["is_cold_target"].to_numpy(zero_copy_only=False))
        results["cold"] = {
            "num_rows": int(cold_metrics["polyrec"]["cold/num_rows"]),
            "HR@10": cold_metrics["polyrec"]["cold/HR@10"],
            "NDCG@10": cold_metrics["polyrec"]["cold/NDCG@10"],
            "random_HR@10": random_hit_rate(cold_test, cold_manifest.num_items, 10, cold_rows),
        }
    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="leave out the cold-item split")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render the section from the last polyrec run (bench/_work/quality/polyrec.json) and the peers' current results",
    )
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="train polyrec once per seed; the table and the targets use the mean (default: 0 1)"
    )
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")

    polyrec_file = WORK / "polyrec.json"
    if not args.report_only:
        WORK.mkdir(parents=True, exist_ok=True)
        polyrec_file.write_text(json.dumps(measure_polyrec(args.skip_cold, args.seeds), indent=2))
    if not polyrec_file.exists():
        raise SystemExit(f"no polyrec results in {polyrec_file}: run without --report-only first")
    results = json.loads(polyrec_file.read_text())
    test = read_table(resolve(str(WORK / "data")), f"{schema.SEQUENCES_DIR}/test")
    results["split_hash"] = split_hash(WORK / "data")
    results["peer_runs"], results["peers"], results["svdpp"] = peer_results(results["split_hash"], test)
    section = report(results)
    print(section)
    if not args.no_write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
