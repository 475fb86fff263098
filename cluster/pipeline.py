"""The main job: the whole loop on the embedded default, one stage after another.

1. The source's last ``replay_fraction`` of interactions (by time) is set aside as "the future"; the rest is the
   base data. 2. preprocess → 3. train (+ test-split evaluation) → 4. serve → 5. simulated users replay the
future through the HTTP API (each asks for recommendations, then rates what they really watched) → 6. retrain
from the base data plus the feedback log, warm-started → 7. hot-swap when the gate passes → 8. a report
comparing before and after (``<output>/report.md``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from cluster.retrain import RetrainConfig, run_retrain
from cluster.simulate import replay
from common.config import RayConfig
from common.errors import InputError
from common.ray_connect import connect
from data import schema
from data.config import ColumnMapping, PreprocessConfig, SourceConfig
from data.manifest import format_report
from data.pipeline import run_preprocess
from data.readers import read_source
from train.artifact import TRAINED_ARTIFACT_DIR
from train.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _stage_config(cls, configs: Path, name: str, **overrides):
    path = configs / f"{name}.yaml"
    return cls.from_yaml(path if path.is_file() else None, **overrides)


def set_aside_future(source: SourceConfig, folder: Path, replay_fraction: float) -> tuple[SourceConfig, pa.Table]:
    """Write the base interactions and the items as Parquet, return a source reading them and the future."""
    tables = read_source(source).collected()  # the split needs every timestamp; the main job's sources are small
    interactions = tables.interactions
    cutoff = pc.quantile(interactions["timestamp"], q=1 - replay_fraction, interpolation="higher")[0].as_py()
    future = interactions.filter(pc.greater_equal(interactions["timestamp"], cutoff))
    base = interactions.filter(pc.less(interactions["timestamp"], cutoff))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(base, folder / "base.parquet")
    pq.write_table(tables.items, folder / "items.parquet")
    pq.write_table(future, folder / "future.parquet")
    text_fields = [name for name in tables.items.column_names if name != "item_id"]
    return (
        SourceConfig(
            format="table",
            path=str(folder / "base.parquet"),
            items_path=str(folder / "items.parquet"),
            columns=ColumnMapping(event="event", value="value", item_fields={name: name for name in text_fields}),
        ),
        future.sort_by("timestamp"),
    )


def run_pipeline(
    output: str = "runs/default",
    *,
    replay_fraction: float = 0.05,
    max_replayed: int = 1500,
    held_out: int = 300,
    port: int = 8000,
    keep_serving: bool = False,
    pretrain: bool = False,
    configs: Path = CONFIG_DIR,
) -> Path:
    """The main job into ``output``, each stage configured by its file in ``configs`` (a stage without one: its defaults)."""

    from serve.config import ServeConfig
    from serve.runner import check_ports_free, run_service, use_throughput_env
    from train.trainer import run_training

    if not Path(configs).is_dir():
        raise InputError(f"--configs {configs}: no such folder (it holds the stages' files: preprocess.yaml, train.yaml, ...)")
    root = Path(output).resolve()
    if (root / "model" / TRAINED_ARTIFACT_DIR).exists():  # every later stage would refuse to overwrite its output
        raise InputError(f"{root} already holds a finished run; choose another output (make run RUN_DIR=...) or remove it")
    # Every stage's file is read now: a mistake in the last one is reported before the first one runs.
    serve_config = _stage_config(ServeConfig, configs, "serve", feedback_log=str(root / "feedback"), state_dir=str(root / "serve"), port=port)
    preprocess = _stage_config(PreprocessConfig, configs, "preprocess", output=str(root / "data"))
    train = _stage_config(TrainConfig, configs, "train", data=preprocess.output, output=str(root / "model"))
    retrain = _stage_config(
        RetrainConfig, configs, "retrain", feedback_log=str(root / "feedback"), output=str(root / "retrain"), serve_state_dir=str(root / "serve")
    )
    if pretrain:
        from train.pretrain import PretrainConfig, run_pretrain

        pretrain_config = _stage_config(PretrainConfig, configs, "pretrain", data=preprocess.output, output=str(root / "pretrained"))
    timings: dict[str, float] = {}
    if not ray.is_initialized():
        # Every stage shares one local Ray instance. The serving replicas hold fractional CPUs for as long as
        # the app runs, so the instance advertises more logical CPUs than the machine has: otherwise the
        # retraining's Ray Data and Train tasks (1 CPU each) would wait for the service forever. The dashboard
        # stays on: Ray Train's placement-group cleaner asks its state API whether the training controller
        # lives (without it, it logs a warning every few seconds while training runs).
        use_throughput_env()
        check_ports_free(serve_config)  # now, not after the training
        connect(RayConfig(num_cpus=(os.cpu_count() or 2) + 2))

    def timed(stage: str, started: float) -> None:
        timings[stage] = time.perf_counter() - started
        print(f"[polyrec pipeline] {stage}: {timings[stage]:.1f}s")

    started = time.perf_counter()
    preprocess.source, future = set_aside_future(preprocess.source, root / "replay", replay_fraction)
    manifest = run_preprocess(preprocess)
    print(format_report(manifest))
    timed("preprocess", started)

    started = time.perf_counter()
    if pretrain:  # the backbone continues from the configured one on this catalogue's text, and training (and retraining) uses it
        pretrain_config.name_or_path = pretrain_config.name_or_path or train.model.backbone.name_or_path
        train.model.backbone.name_or_path = str(run_pretrain(pretrain_config).output)
        timed("pretrain", started)
        started = time.perf_counter()
    before = run_training(train)
    timed("train + evaluate", started)

    started = time.perf_counter()
    # The service loads the histories of the data the model was trained on (training_data: artifact).
    service = run_service(serve_config.model_copy(update={"model": before.artifact}), blocking=False)
    timed("serve (start)", started)

    try:
        # The future's first part is replayed with feedback; the next, held-out part is only asked about,
        # once before the swap and once after, so both versions answer it from the same server-side state.
        known_users = set(pq.read_table(root / "data" / schema.USER_VOCAB_PATH, columns=["user_id"])["user_id"].to_pylist())
        held_out = min(held_out, len(future) // 4)  # a small future still leaves interactions to ask about
        replayed_count = min(max_replayed, len(future) - held_out)
        replayed, held_out_part = future.slice(0, replayed_count), future.slice(replayed_count, held_out)
        started = time.perf_counter()
        online = replay(service.url, replayed, k=10, known_users=known_users)
        timed(f"simulated users ({online['requests']} requests)", started)
        before_swap = replay(service.url, held_out_part, k=10, send_feedback=False, known_users=known_users, progress_label="held-out users, v1")

        started = time.perf_counter()
        retrain.preprocess, retrain.train = preprocess, train  # the model in service is retrained as it was trained
        after = run_retrain(retrain)
        timed("retrain + hot swap", started)

        after_swap = replay(service.url, held_out_part, k=10, send_feedback=False, known_users=known_users, progress_label="held-out users, after the gate")
        report = _write_report(root, manifest, before, after, online, {"before": before_swap, "after": after_swap}, timings)
    except BaseException:  # Ctrl-C or a failed stage: the service still stops gracefully (its feedback flushed)
        service.stop()
        raise
    if keep_serving:
        print(f"[polyrec pipeline] serving at {service.url} (Ctrl-C to stop)")
        service.serve_until_stopped()
    else:
        service.stop()
    return report


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _write_report(root: Path, manifest, before, after, online: dict, held_out: dict[str, dict], timings: dict[str, float]) -> Path:
    def row(name: str, metrics: dict) -> str:
        keys = ["HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "like/auc", "rating/rmse"]
        return f"| {name} | " + " | ".join(f"{metrics.get(key, float('nan')):.4f}" for key in keys) + " |"

    lines = [
        "# polyrec: main job report",
        "",
        f"Data: {manifest.num_interactions:,} base interactions, {manifest.num_users:,} users, {manifest.num_items:,} items "
        f"(content hash `{manifest.content_hash[:12]}`).",
        "",
        "## Offline, test split (leave-one-out, full ranking, earlier items masked)",
        "",
        "| model | HR@10 | NDCG@10 | MRR@10 | HR@20 | NDCG@20 | like AUC | rating RMSE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("popularity (base data)", before.test_metrics["popularity"]),
        row("v1: trained on base data", before.test_metrics["polyrec"]),
        row("popularity (base + feedback)", after.test_metrics["popularity"]),
        row("v2: retrained with feedback", after.test_metrics["polyrec"]),
        "",
        "## Online, simulated users through the HTTP API",
        "",
        f"- Replayed {online['requests']} future interactions: HR@10 of the served list before the user's real choice "
        f"= {online['hit_rate']:.4f}, p50 latency {online['p50_ms']:.1f} ms, p99 {online['p99_ms']:.1f} ms, "
        f"{online['errors']} errors; {online['feedback_events']} feedback events logged.",
        "",
        f"## Gate: both versions on the new data's validation split ({'promoted' if after.promoted else 'kept v1'}, "
        f"hot swap {'done' if after.swapped else 'not done'})",
        "",
        "| metric | v1 (serving) | v2 (candidate) | allowed change for the worse | |",
        "|---|---:|---:|---:|---|",
        *[
            f"| {check.metric} | {_figure(check.serving)} | {_figure(check.candidate)} | {check.tolerance} | "
            f"{'skipped' if check.skipped else 'pass' if check.passed else 'FAIL'} |"
            for check in after.gate.checks
        ],
        "",
        f"The {held_out['before']['requests']} interactions after the replayed ones, asked about (no feedback) before and after the gate:",
        "",
        "| | served by | HR@10 | known users with a `because` | errors | p50 ms |",
        "|---|---|---:|---:|---:|---:|",
        *[
            f"| {when} the gate | `{', '.join(run['model_versions'])}` | {run['hit_rate']:.4f} | {run['explained_share']:.1%} | "
            f"{run['errors']} | {run['p50_ms']:.1f} |"
            for when, run in held_out.items()
        ],
        "",
        "## Wall time (this machine)",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()],
        "",
        f"Artifacts: v1 `{before.artifact}`, v2 `{after.new_model}`. Training curves: `model/training_curves.png`.",
    ]
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (root / "report.json").write_text(json.dumps({"online": online, "held_out": held_out, "timings": timings}, indent=2))
    print(report.read_text())
    return report
