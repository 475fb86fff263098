"""Continued pretraining of the item encoder's language model on the catalogue's own text: the loop in plain sight.

``run_pretrain`` reads a preprocessing output once (the items' token ids and, for the contrastive objective, the
pairs of items consumed one after the other in the training sequences), runs ``pretrain_loop`` on Ray Train's
workers (``TorchTrainer``, DDP beyond one worker) and writes a Hugging Face folder (safetensors and tokenizer) that
``model.backbone.name_or_path`` accepts, with its provenance in ``polyrec_pretrain.json``.

Objectives (``PretrainConfig.objective``):

- ``mlm``: masked-LM (BERT's 80/10/10 masking of 15% of the tokens). A sentence-embedding checkpoint such as the
  packaged all-MiniLM-L6-v2 has no MLM head: ``AutoModelForMaskedLM`` creates one (decoder tied to the word
  embeddings, transform layer freshly initialised), trained with the rest.
- ``clm``: causal LM, next-token prediction, for decoder backbones.
- ``contrastive``: BLaIR / Recformer style: the pooled texts of two items a user consumed one after the other are
  pulled together against the other items of the batch (in-batch negatives, symmetric InfoNCE).
- ``auto``: ``mlm`` for a backbone with a masked-LM head class (encoders), else ``clm``.

The items' text is tokenised by preprocessing, so the backbone must share the data's tokenizer (the packaged MiniLM
does by default). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray.train
import torch
import torch.nn.functional as F
from pydantic import Field
from ray.train import Checkpoint, RunConfig
from ray.train.torch import TorchTrainer, prepare_data_loader, prepare_model
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from common.config import RayConfig, StageConfig
from common.console import worker_bar
from common.errors import InputError
from common.ray_connect import connect, ray_train_fit
from common.storage import read_table, resolve
from data import schema
from data.features import load_tokenizer
from data.manifest import load_manifest
from train.backbone import PRETRAIN_PROVENANCE_FILE, TOKENIZER_FILES, default_backbone_path, pool
from train.config import ScalingConfig

logger = logging.getLogger(__name__)

Objective = Literal["mlm", "clm", "contrastive"]
#: The worker's losses and step count, beside the weights in its checkpoint (not part of the output folder).
PROGRESS_FILE = "pretrain_progress.json"


class PretrainConfig(StageConfig):
    data: str = "runs/default/data"  # preprocessing output (path or URI): the items' text and the training sequences
    output: str = "runs/default/pretrained"  # the Hugging Face folder written (local, new or empty)
    #: The backbone to continue from, a Hugging Face folder; None: the packaged all-MiniLM-L6-v2.
    name_or_path: str | None = None
    #: Contrastive by default: training reads the backbone's pooled vector, and on ml-100k masked-LM training undid
    #: MiniLM's sentence-embedding training (text-only HR@10 0.046 -> 0.024) while contrastive kept it (0.048).
    #: ``auto`` picks the language-model objective by kind: mlm for encoders, clm for decoders.
    objective: Literal["auto", "mlm", "clm", "contrastive"] = "contrastive"
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=2)  # per worker; texts (mlm, clm) or item pairs (contrastive)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # share of the steps with a linear warm-up, then linear decay to 0
    grad_clip: float = 1.0
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    #: Contrastive: pairs drawn afresh each epoch from all consecutive pairs of the training sequences.
    pairs_per_epoch: int = Field(1024, ge=2)
    temperature: float = Field(0.05, gt=0)
    pooling: Literal["mean", "last", "cls"] = "mean"  # as model.backbone.pooling of the training that uses it
    seed: int = 0
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


@dataclass
class PretrainCorpus:
    """What every worker needs, read once by the driver (small: one token list per item, two ints per pair)."""

    texts: list[list[int]]  # the items' token ids, by item_idx - 1
    pairs: np.ndarray  # [P, 2] item_idx of items consumed one after the other (contrastive only; else empty)
    tokenizer: PreTrainedTokenizerBase  # the one that made the token ids
    data_hash: str


def resolve_objective(config: PretrainConfig, source: Path) -> Objective:
    if config.objective != "auto":
        return config.objective
    model_type = AutoConfig.from_pretrained(source, local_files_only=True).model_type
    return "mlm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "clm"


def load_language_model(source: str | Path, objective: Objective) -> nn.Module:
    """The backbone with the head its objective trains (none for contrastive), in fp32, from safetensors only."""
    model_class = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM, "contrastive": AutoModel}[objective]
    try:
        return model_class.from_pretrained(source, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"pretrain.name_or_path: {source}: cannot load it for the {objective} objective: {err}") from None


def trained_backbone(model: nn.Module, objective: Objective, source: str | Path) -> PreTrainedModel:
    """The trained model as the ``AutoModel`` training loads: the objective's head dropped, and what the objective
    never trains (BERT's pooler) kept from the source, so the folder loads with no missing or unexpected weight."""
    if objective == "contrastive":
        return model
    backbone = AutoModel.from_pretrained(source, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    unexpected = backbone.load_state_dict(model.base_model.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the {objective} model's encoder has weights its AutoModel lacks: {unexpected[:5]}")
    return backbone


def consecutive_pairs(sequences: pa.Table) -> np.ndarray:
    """[P, 2] item_idx of every two items a user consumed one after the other in TRAIN_SEQUENCE rows (a row's
    ``history`` ends with the item just before its first), repeats of one item left out."""
    pairs = []
    for history, items in zip(sequences["history"].to_pylist(), sequences["items"].to_pylist()):
        sequence = history[-1:] + items
        pairs += [(a, b) for a, b in zip(sequence[:-1], sequence[1:]) if a != b]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def read_corpus(data_uri: str, objective: Objective) -> PretrainCorpus:
    location = resolve(data_uri, "data")
    manifest = load_manifest(data_uri)
    items = read_table(location, schema.ITEMS_DIR).sort_by("item_idx")
    pairs = consecutive_pairs(read_table(location, f"{schema.SEQUENCES_DIR}/train")) if objective == "contrastive" else np.zeros((0, 2), np.int64)
    if objective == "contrastive" and len(pairs) < 2:
        raise InputError(f"{data_uri}: the contrastive objective needs pairs of items consumed one after the other; the training sequences have {len(pairs)}")
    tokenizer = load_tokenizer(manifest.tokenizer.path)
    if objective == "mlm" and tokenizer.mask_token is None:
        raise InputError(f"pretrain.objective: mlm needs a mask token; the tokenizer of {data_uri} has none (use clm or contrastive)")
    if tokenizer.pad_token is None:  # decoders' tokenizers often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return PretrainCorpus(texts=[list(ids) for ids in items["input_ids"].to_pylist()], pairs=pairs, tokenizer=tokenizer, data_hash=manifest.content_hash)


def make_loader(corpus: PretrainCorpus, objective: Objective, config: PretrainConfig, epoch: int) -> DataLoader:
    """Shuffled batches for one epoch: texts with their labels (mlm, clm) or the two sides of item pairs (contrastive)."""
    if objective == "contrastive":
        rng = np.random.default_rng([config.seed, epoch])
        chosen = corpus.pairs[rng.choice(len(corpus.pairs), size=min(config.pairs_per_epoch, len(corpus.pairs)), replace=False)]

        def collate(rows: list[np.ndarray]) -> dict[str, Any]:
            pair = np.stack(rows)
            # One padded batch, anchors then positives: one forward pass (DDP allows one per backward).
            texts = [corpus.texts[i - 1] for i in np.concatenate([pair[:, 0], pair[:, 1]])]
            return {**corpus.tokenizer.pad({"input_ids": texts}, return_tensors="pt"), "positive_items": torch.as_tensor(pair[:, 1])}

        return DataLoader(list(chosen), batch_size=config.batch_size, shuffle=False, collate_fn=collate)
    collator = DataCollatorForLanguageModeling(corpus.tokenizer, mlm=objective == "mlm", mlm_probability=config.mlm_probability, return_tensors="pt")
    generator = torch.Generator().manual_seed(config.seed * 1_009 + epoch)
    return DataLoader([{"input_ids": ids} for ids in corpus.texts], batch_size=config.batch_size, shuffle=True, collate_fn=collator, generator=generator)


def contrastive_loss(model: nn.Module, batch: dict[str, Any], pooling: str, temperature: float) -> Tensor:
    """Symmetric InfoNCE between the pooled, normalised texts of each pair's two items (``batch``: the anchors' texts,
    then the positives'); the other pairs of the batch are the negatives, except those whose positive is the same item
    (not a negative at all)."""

    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    anchors, positives = F.normalize(pool(hidden, batch["attention_mask"], pooling), dim=-1).chunk(2)
    logits = anchors @ positives.T / temperature
    items = batch["positive_items"]
    same_item = (items[:, None] == items[None, :]) & ~torch.eye(len(items), dtype=torch.bool, device=items.device)
    logits = logits.masked_fill(same_item, torch.finfo(logits.dtype).min)
    targets = torch.arange(len(items), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def objective_loss(model: nn.Module, batch: dict[str, Any], objective: Objective, config: PretrainConfig) -> Tensor:
    if objective == "contrastive":
        return contrastive_loss(model, batch, config.pooling, config.temperature)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    objective: Objective,
    config: PretrainConfig,
    *,
    device: torch.device,
    bar=None,  # noqa: ANN001 (a progress bar, common.console.worker_bar)
) -> float:
    """One pass over ``loader``; the mean loss. ``bar``: a progress bar to advance by each step."""
    model.train()
    total, steps = 0.0, 0
    for batch in loader:
        loss = objective_loss(model, {k: v.to(device) for k, v in batch.items()}, objective, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total, steps = total + float(loss.detach()), steps + 1
        if bar is not None:
            bar.update(1)
    return total / max(1, steps)


def pretrain_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's worker: load, train ``epochs`` epochs, report each epoch's loss; rank 0 saves the model at the end."""
    config = PretrainConfig.model_validate(loop_config["config"])
    corpus: PretrainCorpus = ray.get(loop_config["corpus"])
    objective: Objective = loop_config["objective"]
    context = ray.train.get_context()
    rank = context.get_world_rank()

    torch.manual_seed(config.seed)
    model = prepare_model(load_language_model(loop_config["source"], objective))
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def epoch_loader(epoch: int) -> DataLoader:
        loader = prepare_data_loader(make_loader(corpus, objective, config, epoch), move_to_device=False)
        if context.get_world_size() > 1:  # this worker's share, shuffled anew each epoch
            loader.sampler.set_epoch(epoch)
        return loader

    total_steps = config.epochs * len(epoch_loader(0))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    losses = []
    bar = worker_bar(f"pretrain ({objective})", total=total_steps, unit="batch") if rank == 0 else None
    for epoch in range(config.epochs):
        torch.manual_seed(config.seed * 100_003 + epoch * 1_009 + rank)  # the masking draws
        loader = epoch_loader(epoch)
        if bar is not None:
            bar.set_description(f"pretrain ({objective}), epoch {epoch + 1}/{config.epochs}")
        losses.append(train_epoch(model, loader, optimizer, scheduler, objective, config, device=device, bar=bar))
        if rank == 0:
            logger.info(f"[polyrec pretrain] epoch {epoch + 1}/{config.epochs} {objective} loss={losses[-1]:.4f}")
        metrics = {"epoch": epoch + 1, "loss": losses[-1]}
        if epoch + 1 < config.epochs:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                trained_backbone(unwrapped, objective, loop_config["source"]).save_pretrained(folder)
                Path(folder, PROGRESS_FILE).write_text(json.dumps({"epoch_losses": losses, "steps": total_steps}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)
    if bar is not None:
        bar.close()


@dataclass
class PretrainResult:
    output: Path  # the Hugging Face folder
    provenance: dict[str, Any]  # what polyrec_pretrain.json holds


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Continue pretraining ``config.name_or_path`` on the catalogue of ``config.data`` and write the result to
    ``config.output`` (atomically: a partial folder never appears under that name)."""
    started = time.perf_counter()
    source = Path(config.name_or_path).resolve() if config.name_or_path else default_backbone_path()
    if not (source / "config.json").is_file():
        raise InputError(f"pretrain.name_or_path: no Hugging Face model folder (config.json) at {source}")
    if "://" in config.output:
        raise InputError(f"pretrain.output must be a local folder on this version, got {config.output!r}")
    output = Path(config.output).resolve()
    if output.exists() and not output.is_dir():
        raise InputError(f"pretrain.output: {output} is a file; name a folder")
    if output.exists() and any(output.iterdir()):
        raise InputError(f"pretrain.output: {output} is not empty; choose another output")
    objective = resolve_objective(config, source)
    corpus = read_corpus(config.data, objective)
    source_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True) if any((source / name).is_file() for name in TOKENIZER_FILES) else None
    if source_tokenizer is not None and len(source_tokenizer) != len(corpus.tokenizer):
        raise InputError(
            f"pretrain.name_or_path: the backbone's tokenizer ({len(source_tokenizer)} tokens) is not the one that tokenised {config.data} "
            f"({len(corpus.tokenizer)} tokens): preprocess with features.tokenizer set to the backbone's folder"
        )

    connect(config.ray, log_to_driver=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        pretrain_loop,
        # The corpus by reference: Ray Train's controller unpickles the loop config, and would import this module's stack for it.
        train_loop_config={"config": config.model_dump(mode="json"), "corpus": ray.put(corpus), "objective": objective, "source": str(source)},
        scaling_config=config.scaling.for_ray_train(),
        run_config=RunConfig(name="pretrain", storage_path=str(staging / "ray_results")),
    )
    try:
        with ray_train_fit():
            result = trainer.fit()
        if result.error is not None:
            raise result.error
        weights = staging / "model"
        result.checkpoint.to_directory(str(weights))
        (source_tokenizer or corpus.tokenizer).save_pretrained(weights)
        progress = json.loads((weights / PROGRESS_FILE).read_text())
        (weights / PROGRESS_FILE).unlink()
        provenance = {
            "source": str(source),
            "data": config.data if "://" in config.data else str(Path(config.data).resolve()),
            "data_manifest_hash": corpus.data_hash,
            "objective": objective,
            "epochs": config.epochs,
            "steps": progress["steps"],
            "epoch_losses": progress["epoch_losses"],
            "final_loss": progress["epoch_losses"][-1],
            "seconds": round(time.perf_counter() - started, 1),
            "config": config.model_dump(mode="json"),
        }
        (weights / PRETRAIN_PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.exists():
            output.rmdir()  # empty, checked above
        weights.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PretrainResult(output=output, provenance=provenance)
