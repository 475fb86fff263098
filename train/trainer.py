"""Training on Ray Train with DeepSpeed: the loop in plain sight.

The driver (``run_training``) reads the preprocessing output once (``read_training_data``), fits the model on a
``TorchTrainer`` whose workers each run ``train_loop_per_worker`` (``fit``), and exports the best checkpoint as a
model artifact with its test metrics. The test-split evaluation beside the popularity baseline (``evaluate_on_test``)
and the ablations (``train_ablations``) are functions beside it. Workers read training windows
(``training_windows``) as Ray Data shards, train every task at once through a DeepSpeed engine (ZeRO 0-3; with the
sampled softmax the per-item and per-user tables train sparse, by a ``TableOptimizer`` beside it), evaluate the
validation split (a fixed sample of its rows on large data) after each epoch, report to Ray Train with a checkpoint,
and stop early when validation NDCG@10 stops improving.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from common import storage
from common.console import quiet_train_worker, verbose, worker_bar
from common.errors import InputError
from common.ray_connect import connect, ray_train_fit
from common.storage import Location, read_table, resolve
from data import schema
from data.features import RatingNormalisation, load_tokenizer
from data.manifest import load_manifest
from train.artifact import METADATA_FILE, TRAINED_ARTIFACT_DIR, load_artifact, refuse_existing_artifact, save_artifact
from train.batching import left_pad
from train.config import SELECTION_K, TrainConfig
from train.evaluate import PopularityScorer, evaluate, evaluate_with_popularity, write_report
from train.model import CatalogFeatures, PolyrecModel
from train.plots import plot_training_curves
from train.tasks import VocabularyTable
from train.tracking import TrackedRun, start_tracking
from train.transfer import load_state_by_id, rows_by_id
from train.weighting import LossWeighting
from train.windows import training_windows

# Not print: Ray Train's workers tee print to stdout and to the root logger, so each line would show
# twice; the root logger alone reaches the console (and Ray Train's application log) once.
logger = logging.getLogger(__name__)

SELECTION_METRIC = f"validation/NDCG@{SELECTION_K}"
CONSOLIDATED_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"


@dataclass
class TrainingInputs:
    """What every worker needs to build the model, read once by the driver (small tables only)."""

    items: pa.Table
    validation: pa.Table
    num_users: int
    num_items: int
    num_attributes: int
    rating_mean: float
    pad_token_id: int
    max_history: int
    max_text_tokens: int
    data_hash: str
    tokenizer_path: str  # the tokenizer that made the items' token ids
    rating: dict[str, Any]  # the manifest's rating normalisation (data.features.RatingNormalisation)


class TrainingModule(torch.nn.Module):
    """The model and its loss weighting as one module, so that DeepSpeed owns every trained parameter."""

    def __init__(self, model: PolyrecModel, weighting: LossWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        losses, shared = self.model.calculate_loss(batch, return_shared=True)
        total, weights = self.weighting(losses, shared)
        return total, losses, weights


def build_model(config: TrainConfig, inputs: TrainingInputs) -> PolyrecModel:
    catalog = CatalogFeatures.from_items_table(inputs.items, inputs.max_text_tokens, inputs.pad_token_id)
    return PolyrecModel(
        config.model,
        num_users=inputs.num_users,
        num_items=inputs.num_items,
        num_attributes=inputs.num_attributes,
        catalog=catalog,
        rating_mean=inputs.rating_mean,
    )


def training_batch(rows: dict[str, np.ndarray], max_history: int) -> dict[str, torch.Tensor]:
    """Training windows (``training_windows``) → left-padded next-item tensors: position t predicts item
    t+1, except in the first ``context`` positions of a window, which have no target."""

    def targets(sequences: list[np.ndarray], none: float) -> list[np.ndarray]:
        shifted = [sequence[1:].copy() for sequence in sequences]
        for target, context in zip(shifted, rows["context"]):
            target[:context] = none
        return shifted

    items = [np.array(seq, dtype=np.int64) for seq in rows["items"]]
    ratings = [np.array(seq, dtype=np.float32) for seq in rows["ratings"]]
    likes = [np.array(seq, dtype=np.int64) for seq in rows["likes"]]
    return {
        "input_items": left_pad([s[:-1] for s in items], max_history),
        "input_ratings": left_pad([s[:-1] for s in ratings], max_history, pad_value=float("nan"), dtype=torch.float32),
        "target_items": left_pad(targets(items, schema.PAD_INDEX), max_history),
        "target_ratings": left_pad(targets(ratings, float("nan")), max_history, pad_value=float("nan"), dtype=torch.float32),
        "target_likes": left_pad(targets(likes, -1), max_history, pad_value=-1),
        "user_idx": torch.as_tensor(np.asarray(rows["user_idx"], dtype=np.int64)),
    }


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    precision = config.precision
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
    if config.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    if config.deepspeed.zero_stage == 3:
        # Lets rank 0 gather the full weights for the artifact at every checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optimizer.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.optimizer.lr,
                "betas": list(config.optimizer.betas),
                "weight_decay": config.optimizer.weight_decay,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # progress is reported per epoch, not by DeepSpeed
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, config.deepspeed.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _parameter_groups(module: TrainingModule, config: TrainConfig, sparse: Sequence[VocabularyTable] = ()) -> list[dict[str, Any]]:
    """The parameters DeepSpeed's optimizer trains: the backbone's (LoRA adapters or all its weights) at
    ``backbone_lr``, the rest at ``lr``; not the ``sparse`` tables (``TableOptimizer``)."""
    backbone_encoder = module.model.item_encoder.backbone
    in_backbone = {id(param) for param in backbone_encoder.parameters()} if backbone_encoder is not None else set()
    left_out = {id(table.weight) for table in sparse}
    backbone, rest = [], []
    for param in module.parameters():
        if param.requires_grad and id(param) not in left_out:
            (backbone if id(param) in in_backbone else rest).append(param)
    groups = [{"params": rest, "lr": config.optimizer.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.optimizer.backbone_lr})
    return groups


def make_tables_sparse(model: PolyrecModel, config: TrainConfig) -> list[VocabularyTable]:
    """The model's per-item and per-user tables, switched to sparse gradients, where ``optimizer.sparse_tables``
    asks for them; none otherwise."""
    setting = config.optimizer.sparse_tables
    if setting is False or (setting == "auto" and not (model.sampled_retrieval and config.sparse_tables_supported)):
        return []
    tables = [module for module in model.modules() if isinstance(module, VocabularyTable)]
    for table in tables:
        table.sparse = True
    return tables


class TableOptimizer:
    """Row-wise Adam (``torch.optim.SparseAdam``) for the sparse tables, on the learning-rate schedule of the rest.

    It steps as a post-hook of DeepSpeed's optimizer: after DeepSpeed averaged the sparse gradients over the ranks and
    clipped the gradient norm over every parameter, and before it zeroes the gradients. Its state travels in the
    DeepSpeed checkpoint's client state."""

    def __init__(self, tables: list[VocabularyTable], config: TrainConfig, num_train_windows: int):
        self.optimizer = torch.optim.SparseAdam([table.weight for table in tables], lr=config.optimizer.lr, betas=config.optimizer.betas)
        self.schedule = _learning_rate_schedule(config, num_train_windows)(self.optimizer)

    def step_after(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: self.step())

    def step(self) -> None:
        self.optimizer.step()
        self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        return {"table_optimizer": self.optimizer.state_dict(), "table_schedule": self.schedule.state_dict()}

    def load_state_dict(self, client_state: dict[str, Any], checkpoint: str) -> None:
        if "table_optimizer" not in client_state:
            raise InputError(f"{checkpoint}: trained without sparse tables (optimizer.sparse_tables), so it cannot resume with them")
        self.optimizer.load_state_dict(client_state["table_optimizer"])
        self.schedule.load_state_dict(client_state["table_schedule"])


def _learning_rate_schedule(config: TrainConfig, num_train_windows: int):
    """Linear warm-up, then constant or a cosine decay to ``min_lr_ratio`` over the configured epochs
    (an early stop ends it part-way)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    settings = config.optimizer
    windows_per_worker = math.ceil(num_train_windows / config.scaling.num_workers)
    total_steps = config.epochs * max(1, math.ceil(windows_per_worker / config.batch_size))

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        if settings.schedule == "constant":
            return get_constant_schedule_with_warmup(optimizer, settings.warmup_steps)
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, settings.warmup_steps, max(total_steps, settings.warmup_steps + 1), min_lr_rate=settings.min_lr_ratio
        )

    return schedule


def _consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full weights of the recommender (without the loss weighting), on rank 0; every rank must call this."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if ray.train.get_context().get_world_rank() != 0:
        return None
    prefix = "model."
    return {k[len(prefix) :]: v.detach().float().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    import deepspeed

    quiet_train_worker()
    config = TrainConfig.model_validate(loop_config["config"])
    inputs: TrainingInputs = ray.get(loop_config["inputs"])
    context = ray.train.get_context()
    rank = context.get_world_rank()

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config, inputs)
    model.item_encoder.lockstep_ranks = config.deepspeed.zero_stage == 3 and context.get_world_size() > 1
    if config.warm_start_from:
        warm_start(model, config.warm_start_from, ray.get(loop_config["warm_start_rows"]), announce=rank == 0)
    module = TrainingModule(model, LossWeighting(config.model.loss_weighting, model.task_names))
    tables = make_tables_sparse(model, config)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=_parameter_groups(module, config, tables),
        config=deepspeed_config(config),
        lr_scheduler=_learning_rate_schedule(config, loop_config["num_train_windows"]),
    )
    table_optimizer = TableOptimizer(tables, config, loop_config["num_train_windows"]) if tables else None
    if table_optimizer is not None:
        table_optimizer.step_after(engine.optimizer)
        if rank == 0:
            logger.info("[polyrec train] the per-item and per-user tables train sparse, row by row (optimizer.sparse_tables)")
    device = engine.device

    validation_rows = inputs.validation.num_rows
    state = {"epoch": 0, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [], "validation_rows": validation_rows}
    checkpoint = ray.train.get_checkpoint() or (Checkpoint(config.resume_from) if config.resume_from else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(os.path.join(ckpt_dir, DEEPSPEED_DIR))
            if table_optimizer is not None:
                table_optimizer.load_state_dict(client_state, checkpoint.path)
            state = json.loads(Path(ckpt_dir, TRAINER_STATE).read_text())
        if rank == 0:
            logger.info("[polyrec train] resumed at epoch %d from %s", state["epoch"], checkpoint.path)
        if state.get("validation_rows") != validation_rows:
            # A best scored on other validation rows (another validation_sample_rows, or a checkpoint older than the
            # record) is no yardstick for this run's scores: selection and early stopping start again here.
            if rank == 0:
                logger.warning(
                    "[polyrec train] the checkpoint's best (validation NDCG@10 %.4f, epoch %d) was scored on %s validation rows, this run "
                    "scores %d: the best checkpoint and early stopping count from this run's epochs only",
                    state["best"],
                    state["best_epoch"],
                    state.get("validation_rows", "unrecorded"),
                    validation_rows,
                )
            state.update(best=-math.inf, best_epoch=-1, bad_epochs=0, validation_rows=validation_rows)

    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch = math.ceil(loop_config["num_train_windows"] / config.scaling.num_workers / config.batch_size)
    bar = worker_bar("train", total=(config.epochs - state["epoch"]) * steps_per_epoch, unit="batch") if rank == 0 else None
    while state["epoch"] < config.epochs and state["bad_epochs"] < config.early_stopping_patience:
        epoch = state["epoch"]
        # Reseeding per epoch makes a resumed run continue exactly as an uninterrupted one would.
        torch.manual_seed(config.seed * 100_003 + epoch * 1_009 + rank)
        engine.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        weights: dict[str, float] = {}
        if bar is not None:
            bar.set_description(f"train, epoch {epoch + 1}/{config.epochs}")
        for rows in shard.iter_batches(
            batch_size=config.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=config.batch_size * 8,
            local_shuffle_seed=config.seed + epoch,
        ):
            batch = {k: v.to(device) for k, v in training_batch(rows, inputs.max_history).items()}
            total, losses, weights = engine(batch)
            engine.backward(total)
            engine.step()
            steps += 1
            if bar is not None:
                bar.update(1)
            for name, value in {"total": total, **losses}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        train_seconds = time.perf_counter() - started

        engine.eval()
        with torch.no_grad():
            validation = evaluate(
                model,
                inputs.validation,
                ks=config.eval_ks,
                num_items=inputs.num_items,
                max_history=inputs.max_history,
                batch_size=256,
            )
        metrics = {
            "epoch": epoch + 1,
            "steps": steps,
            "epoch_seconds": round(train_seconds, 3),
            "lr": engine.get_lr()[0],
            **{f"train/loss_{k}": v / max(1, steps) for k, v in sums.items()},
            **{f"train/weight_{k}": float(v) for k, v in weights.items()},
            **{f"validation/{k}": float(v) for k, v in validation.items()},
        }
        score = metrics[SELECTION_METRIC]
        improved = score > state["best"]
        state.update(
            epoch=epoch + 1,
            best=max(state["best"], score),
            best_epoch=epoch + 1 if improved else state["best_epoch"],
            bad_epochs=0 if improved else state["bad_epochs"] + 1,
        )
        state["history"].append(metrics)
        if rank == 0:
            losses_text = " ".join(f"{k[len('train/loss_') :]}={v:.4f}" for k, v in metrics.items() if k.startswith("train/loss_"))
            logger.info(
                f"[polyrec train] epoch {epoch + 1}/{config.epochs} {losses_text} "
                f"val ndcg@10={score:.4f} hr@10={metrics['validation/HR@10']:.4f} ({train_seconds:.1f}s)" + (" *" if improved else "")
            )
        _fault_injection(epoch + 1)
        with tempfile.TemporaryDirectory() as ckpt_dir:
            engine.save_checkpoint(os.path.join(ckpt_dir, DEEPSPEED_DIR), tag="state", client_state=table_optimizer.state_dict() if table_optimizer else {})
            weights_state = _consolidated_state_dict(engine)
            if rank == 0:
                save_file(weights_state, os.path.join(ckpt_dir, CONSOLIDATED_WEIGHTS))
                Path(ckpt_dir, TRAINER_STATE).write_text(json.dumps(state))
            ray.train.report({**metrics, "best": state["best"]}, checkpoint=Checkpoint.from_directory(ckpt_dir))
    if bar is not None:
        bar.close()
    return state


def warm_start(model: PolyrecModel, artifact_path: str, rows: dict[str, np.ndarray], *, announce: bool) -> None:
    """Initialise from a served model, carried over by id (``train.transfer.load_state_by_id``): its per-item and
    per-user rows move to this data's indices (``rows``, from ``train.transfer.rows_by_id``), ids new to this data keep
    their zero rows, buffers stay this data's catalogue's, every other tensor is carried over when its shape is unchanged."""
    target_size = len(model.state_dict())
    carried = load_state_by_id(model, load_artifact(artifact_path).model.state_dict(), rows)
    if announce:
        known = {vocabulary: int((mapping[1:] >= 0).sum()) for vocabulary, mapping in rows.items()}
        logger.info(
            "[polyrec train] warm start from %s: %d/%d tensors; rows carried over by id for %d of %d items and %d of %d users",
            artifact_path,
            len(carried),
            target_size,
            known["item"],
            len(rows["item"]) - 1,
            known["user"],
            len(rows["user"]) - 1,
        )


def _fault_injection(epoch: int) -> None:
    """Crash this worker once after the given epoch, for the recovery test (a test about a fault)."""
    marker = os.environ.get("POLYREC_FAIL_AFTER_EPOCH_MARKER")
    if marker and epoch == int(os.environ.get("POLYREC_FAIL_AFTER_EPOCH", "0")) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


@dataclass
class TrainResult:
    artifact: str  # where the exported model artifact is
    best_checkpoint: str
    latest_checkpoint: str
    checkpoints: list[tuple[str, dict[str, Any]]]  # every kept checkpoint with its metrics
    best_validation: dict[str, float]
    history: list[dict[str, Any]]
    test_metrics: dict[str, dict[str, float]]  # by model: polyrec, popularity, ...
    tracking: TrackedRun | None = None  # the run's MLflow run (train.tracking), None when tracking is off


def run_training(config: TrainConfig) -> TrainResult:
    """Fit on Ray Train + DeepSpeed, then export the best checkpoint as a model artifact that records its test metrics
    (reported beside the popularity baseline's and each ablation's, with the training curves)."""
    _refuse_unsupported_combinations(config)
    config = config.model_copy(update=absolute_start_points(config))
    output, published = _output_folder(config)
    load_manifest(config.data)  # a missing or outdated preprocessing output is refused before Ray starts
    connect(config.ray, log_to_driver=True)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # seeded, reproducible shards
    data = resolve(config.data)
    inputs, windows, popularity = read_training_data(data, config.window_targets, config.validation_sample_rows)

    tracking = start_tracking(config)
    result = fit(config, inputs, windows, output, published, tracking)
    best = result.get_best_checkpoint(SELECTION_METRIC, "max")
    model, best_state = load_checkpoint_model(config, inputs, best)
    history = (result.return_value or {}).get("history") or best_state["history"]
    best_validation = best_state["history"][-1]

    users = read_table(data, schema.USER_VOCAB_PATH)
    test_metrics = evaluate_on_test(model, popularity, inputs, data, users, config.eval_ks) | train_ablations(config, output)
    artifact = save_artifact(
        model,
        output / TRAINED_ARTIFACT_DIR,
        items=inputs.items,
        users=users,
        model_version=config.model_version or time.strftime("v%Y%m%d-%H%M%S"),
        data_manifest_hash=inputs.data_hash,
        rating=inputs.rating,
        training_data=data.uri if "://" in data.uri else data.path,
        metrics={"validation": _validation_figures(best_validation), "test": test_metrics["polyrec"]},
    )
    write_report(test_metrics, output)
    plot_training_curves(history, output / "training_curves.png")
    if tracking is not None:
        tracking.finish(output, test_metrics["polyrec"])
    final = _publish(output, published)
    return TrainResult(
        artifact=final(str(artifact)),
        best_checkpoint=final(best.path),
        latest_checkpoint=final(result.checkpoint.path),
        checkpoints=[(final(checkpoint.path), metrics) for checkpoint, metrics in result.best_checkpoints or []],
        best_validation=best_validation,
        history=history,
        test_metrics=test_metrics,
        tracking=tracking,
    )


def _refuse_unsupported_combinations(config: TrainConfig) -> None:
    if config.deepspeed.zero_stage == 3 and config.model.loss_weighting.method == "gradnorm":
        raise InputError(
            "train.model.loss_weighting.method: gradnorm does not run under deepspeed.zero_stage 3 (its per-task gradients "
            "run the towers' backward again, which ZeRO-3's parameter gathering does not allow); use zero_stage 0-2, or 'uncertainty'"
        )


def absolute_start_points(config: TrainConfig) -> dict[str, Any]:
    """``warm_start_from``, ``resume_from`` and the backbone's ``name_or_path`` as absolute paths (URIs as given):
    Ray Train's workers run in directories of their own, where a relative path finds nothing. A local folder that
    is missing fails here, before any worker starts."""

    def absolute_folder(value: str, setting: str) -> str:
        if "://" in value:
            return value
        path = Path(value).resolve()
        if not path.is_dir():
            raise InputError(f"train.{setting}: {value} is not a folder")
        return str(path)

    absolute: dict[str, Any] = {field: absolute_folder(getattr(config, field), field) for field in ("warm_start_from", "resume_from") if getattr(config, field)}
    backbone = config.model.backbone
    if config.model.item_encoder.use_text and backbone.name_or_path:
        name_or_path = absolute_folder(backbone.name_or_path, "model.backbone.name_or_path")
        absolute["model"] = config.model.model_copy(update={"backbone": backbone.model_copy(update={"name_or_path": name_or_path})})
    return absolute


def _validation_figures(epoch: dict[str, float]) -> dict[str, float]:
    """An epoch's validation figures named as the test split's are (``validation/NDCG@10`` → ``NDCG@10``)."""
    return {name.removeprefix("validation/"): value for name, value in epoch.items() if name.startswith("validation/")}


def _output_folder(config: TrainConfig) -> tuple[Path, Location | None]:
    """The local folder the run writes, and the location it is published to when ``train.output`` is a URI (the run
    then writes into a temporary folder, and its checkpoints go straight to the URI). Refused now rather than after
    the training when an artifact (the model's or an ablation's) is already there or the URI is not writable."""
    artifact_dirs = [TRAINED_ARTIFACT_DIR, *[f"ablations/{name}/{TRAINED_ARTIFACT_DIR}" for name in config.ablations]]
    if "://" in config.output:
        published = resolve(config.output, "train.output")
        for artifact_dir in artifact_dirs:
            if storage.exists(published, artifact_dir):
                raise InputError(f"{config.output}: an artifact is already there ({artifact_dir}) and is never overwritten; choose another output")
        storage.discard(storage.open_staging(published))  # the writability probe
        return Path(tempfile.mkdtemp(prefix="polyrec-train-")), published
    output = Path(config.output).resolve()
    for artifact_dir in artifact_dirs:
        refuse_existing_artifact(output / artifact_dir)
    return output, None


def _publish(output: Path, published: Location | None) -> Callable[[str], str]:
    """Copy the run's local folder to its URI, if it has one (each artifact's metadata last, so that no reader takes
    a half-copied artifact for one), and return how a path of the run (local, or on the URI's filesystem) is named
    from now on."""
    if published is None:
        return str
    storage.upload_folder(output, published, last=METADATA_FILE)
    shutil.rmtree(output)

    def final(path: str) -> str:
        relative = Path(path).relative_to(output).as_posix() if Path(path).is_relative_to(output) else None
        return storage.file_uri(published, published.join(relative) if relative else path)

    return final


def read_train_sequences(data: Location) -> pa.Table:
    """The ``TRAIN_SEQUENCE`` rows, read into the driver: the popularity baseline and the rating mean count them all."""
    return read_table(data, f"{schema.SEQUENCES_DIR}/train")


def load_training_inputs(data_uri: str, train_sequences: pa.Table) -> TrainingInputs:
    location = resolve(data_uri)
    manifest = load_manifest(data_uri)
    return TrainingInputs(
        items=read_table(location, schema.ITEMS_DIR).sort_by("item_idx"),
        validation=read_table(location, f"{schema.SEQUENCES_DIR}/validation"),
        num_users=manifest.num_users,
        num_items=manifest.num_items,
        num_attributes=manifest.num_attributes,
        rating_mean=_training_rating_mean(train_sequences),
        pad_token_id=manifest.tokenizer.pad_token_id or 0,
        max_history=manifest.config["features"]["max_history"],
        max_text_tokens=manifest.tokenizer.max_text_tokens,
        data_hash=manifest.content_hash,
        tokenizer_path=manifest.tokenizer.path,
        rating=manifest.rating.model_dump(),
    )


def _training_rating_mean(train_sequences: pa.Table) -> float:
    """Mean normalised rating of the training interactions (0 when none is rated)."""
    flat = pc.list_flatten(train_sequences["ratings"])
    known = pc.filter(flat, pc.invert(pc.is_nan(flat)))
    return float(pc.mean(known).as_py()) if len(known) else 0.0


def validation_sample(rows: pa.Table, limit: int | None) -> pa.Table:
    """``limit`` of the validation rows, the same ones for any run on this data; all of them when ``limit`` is None."""
    if limit is None or rows.num_rows <= limit:
        return rows
    # Seeded by a constant, not the training seed: runs with different seeds are then selected on the same rows.
    chosen = np.sort(np.random.default_rng(0).choice(rows.num_rows, size=limit, replace=False))
    return rows.take(chosen)


def read_training_data(data: Location, window_targets: int, validation_sample_rows: int | None) -> tuple[TrainingInputs, ray.data.Dataset, PopularityScorer]:
    """What the training reads from the preprocessing output: the inputs every worker gets (with a sample of
    ``validation_sample_rows`` of the validation split, see :func:`validation_sample`), the popularity baseline, and the
    training windows, cut by Ray Data's workers and held in the object store (a few per user: small enough to keep,
    which spares every epoch a re-read)."""
    train_sequences = read_train_sequences(data)
    inputs = load_training_inputs(data.uri, train_sequences)
    inputs.validation = validation_sample(inputs.validation, validation_sample_rows)
    windows = (
        ray.data.read_parquet(data.join(f"{schema.SEQUENCES_DIR}/train"), filesystem=data.filesystem)
        .map_batches(training_windows, fn_kwargs={"max_history": inputs.max_history, "window_targets": window_targets}, batch_format="pyarrow")
        .materialize()
    )
    return inputs, windows, PopularityScorer(train_sequences, inputs.num_items)


def fit(
    config: TrainConfig, inputs: TrainingInputs, windows: ray.data.Dataset, output: Path, published: Location | None = None, tracking: TrackedRun | None = None
) -> Result:
    """``train_loop_per_worker`` on Ray Train's workers over the training windows, which keeps the best checkpoints by
    validation NDCG@10 and the latest in ``ray_results`` of ``published`` (a URI's location) or else of ``output``;
    each epoch's metrics also go to ``tracking``'s MLflow run."""
    output.mkdir(parents=True, exist_ok=True)
    results = published or resolve(str(output))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            # Objects of polyrec go in by reference: Ray Train's controller unpickles the loop config, and one in it had
            # the controller import the training stack (torch, transformers) for 5 s before any worker could start.
            # The workers read one copy from the object store.
            "inputs": ray.put(inputs),
            "num_train_windows": windows.count(),
            "warm_start_rows": ray.put(rows_by_id(config.warm_start_from, resolve(config.data))) if config.warm_start_from else None,
        },
        scaling_config=config.scaling.for_ray_train(),
        datasets={"train": windows},
        run_config=RunConfig(
            # One folder per invocation: Ray Train restores a run whose folder exists, so a reused name would
            # silently continue (or, with another config, fail to load) an earlier training into this output.
            name=f"{config.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=results.join("ray_results"),
            storage_filesystem=None if results.is_local else results.filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={
                "env_vars": {
                    **{k: v for k, v in os.environ.items() if k.startswith("POLYREC_FAIL_")},
                    # Named, DeepSpeed does not warn on every worker that it found no GPU.
                    **({} if config.scaling.use_gpu else {"DS_ACCELERATOR": "cpu"}),
                }
            },
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep, checkpoint_score_attribute=SELECTION_METRIC, checkpoint_score_order="max"
            ),
            callbacks=[tracking.callback()] if tracking else None,
            # Ray Train's own progress lines (resources, worker group, each report) go to its log files; --verbose shows them.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    with ray_train_fit():
        result = trainer.fit()
    if result.error is not None:
        if tracking is not None:
            tracking.fail()
        raise result.error
    return result


def load_checkpoint_model(config: TrainConfig, inputs: TrainingInputs, checkpoint: Checkpoint) -> tuple[PolyrecModel, dict[str, Any]]:
    """The model of a checkpoint (its consolidated weights, in eval mode) and the trainer state saved with it."""
    with checkpoint.as_directory() as ckpt_dir:
        model = build_model(config, inputs)
        model.load_state_dict(load_file(os.path.join(ckpt_dir, CONSOLIDATED_WEIGHTS)), strict=True)
        state = json.loads(Path(ckpt_dir, TRAINER_STATE).read_text())
    model.eval()
    if model.item_encoder.backbone is not None and model.tokenizer is None:
        # A backbone built from a config (random_init_config) brings no tokenizer; the artifact needs the one that
        # made the catalogue's token ids to encode new items' text as training did.
        model.tokenizer = load_tokenizer(inputs.tokenizer_path)
    return model, state


def evaluate_on_test(
    model: PolyrecModel, popularity: PopularityScorer, inputs: TrainingInputs, data: Location, users: pa.Table, ks: list[int]
) -> dict[str, dict[str, float]]:
    """The model and the popularity baseline on the test split (``train.evaluate.evaluate_with_popularity``); ratings
    on the raw scale, de-normalised per user (``users``: the user vocabulary)."""
    return evaluate_with_popularity(
        model,
        popularity,
        read_table(data, f"{schema.SEQUENCES_DIR}/test"),
        ks=ks,
        num_items=inputs.num_items,
        max_history=inputs.max_history,
        batch_size=256,
        data_ratings=RatingNormalisation.model_validate(inputs.rating).denormaliser(users),
    )


def ablation_config(config: TrainConfig, ablation: str, output: Path) -> TrainConfig:
    """The training config of an ablation: the same settings with one part of the model switched off."""
    variant = config.model_copy(deep=True)
    variant.ablations, variant.output, variant.resume_from, variant.warm_start_from = [], str(output), None, None
    variant.run_name = f"{config.run_name}-{ablation}"
    if ablation == "id_only":
        # Id dropout exists so that text alone can stand for an item; without text it only removes signal.
        variant.model.item_encoder = variant.model.item_encoder.model_copy(update={"use_text": False, "use_id_embedding": True, "id_dropout": 0.0})
    return variant


def train_ablations(config: TrainConfig, output: Path) -> dict[str, dict[str, float]]:
    """Each configured ablation trained and exported into ``output/ablations/<name>`` (``ablation_config``): its test
    metrics, keyed by its name in the report."""
    return {
        f"polyrec {ablation.replace('_', '-')}": run_training(ablation_config(config, ablation, output / "ablations" / ablation)).test_metrics["polyrec"]
        for ablation in config.ablations
    }
