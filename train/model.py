"""The polyrec multi-task recommender (HLLM / SASRec style), in plain PyTorch.

Items are encoded from their text by a Hugging Face backbone (pooled, projected to the user model's
width), plus an optional id embedding; a causal transformer reads the item vectors of a user's
history and gives a state per position; MMoE (or shared-bottom) towers turn the states into one
query per task; the tasks (``train.tasks``) turn queries into losses and scores.

Interface (RecBole style): ``calculate_loss(batch)`` for training (the losses are combined by
``train.weighting.LossWeighting``, which the trainer owns), ``predict`` and ``full_sort_predict`` for
evaluation, ``score_candidates`` for any candidates. Serving calls a small interface of its own, documented on
``PolyrecModel``. Histories are left-padded with item 0, the last column being the most recent item.

Shapes: B users, L history positions, N items, A attributes, T tokens, d the user model's width
(also the item vectors' width), H the backbone's width.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from common.errors import InputError
from train.backbone import load_backbone, pool, prepare_backbone
from train.config import ModelConfig, TowerConfig, UserModelConfig
from train.tasks import StepItems, TaskSetup, VocabularyTable, build_tasks, embedding_or_zero


@dataclass
class CatalogFeatures:
    """Per-item inputs, built once from the items table; row 0 is the padding item."""

    input_ids: Tensor  # [N+1, T] long, right-padded token ids
    attention_mask: Tensor  # [N+1, T] long
    attributes: Tensor  # [N+1, A+1] float multi-hot, column 0 unused
    is_cold: Tensor  # [N+1] bool: withheld from training

    @classmethod
    def from_items_table(cls, items: pa.Table, max_tokens: int, pad_token_id: int, num_attributes: int | None = None) -> CatalogFeatures:
        """From an ``ITEM_FEATURES`` table (``is_cold`` optional). ``num_attributes`` defaults to the
        largest attribute index present."""
        for field in ("item_idx", "input_ids", "attributes"):
            if field not in items.column_names:
                raise InputError(f"items table: missing field '{field}'")
            if items.column(field).null_count:
                raise InputError(f"items table: field '{field}' has nulls")
        item_idx = items.column("item_idx").to_numpy().astype(np.int64)
        num_items = len(item_idx)
        if not np.array_equal(np.sort(item_idx), np.arange(1, num_items + 1)):
            raise InputError(f"items table: field 'item_idx' must hold 1..{num_items} once each")

        token_rows, token_positions, token_ids = _flatten_lists(items.column("input_ids"), item_idx)
        kept = token_positions < max_tokens
        width = max(1, min(max_tokens, int(token_positions.max(initial=-1)) + 1))
        input_ids = torch.full((num_items + 1, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((num_items + 1, width), dtype=torch.long)
        input_ids[token_rows[kept], token_positions[kept]] = torch.from_numpy(token_ids[kept]).long()
        attention_mask[token_rows[kept], token_positions[kept]] = 1

        attribute_rows, _, attribute_idx = _flatten_lists(items.column("attributes"), item_idx)
        if num_attributes is None:
            num_attributes = int(attribute_idx.max(initial=0))
        bad = (attribute_idx < 1) | (attribute_idx > num_attributes)
        if bad.any():
            raise InputError(
                f"items table: field 'attributes' of item_idx {int(attribute_rows[bad][0])} holds {int(attribute_idx[bad][0])}, outside 1..{num_attributes}"
            )
        attributes = torch.zeros((num_items + 1, num_attributes + 1))
        attributes[attribute_rows, attribute_idx] = 1.0

        is_cold = torch.zeros(num_items + 1, dtype=torch.bool)
        if "is_cold" in items.column_names:
            is_cold[item_idx] = torch.from_numpy(items.column("is_cold").fill_null(False).to_numpy(zero_copy_only=False))
        return cls(input_ids, attention_mask, attributes, is_cold)

    @classmethod
    def placeholder(cls, num_items: int, num_attributes: int, max_tokens: int) -> CatalogFeatures:
        """Zeros of the right shapes, for a model whose weights and buffers are loaded afterwards."""
        return cls(
            torch.zeros((num_items + 1, max_tokens), dtype=torch.long),
            torch.zeros((num_items + 1, max_tokens), dtype=torch.long),
            torch.zeros((num_items + 1, num_attributes + 1)),
            torch.zeros(num_items + 1, dtype=torch.bool),
        )


def _flatten_lists(column: pa.ChunkedArray, row_item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item index, position in the list, value) for every element of a list column."""
    lists = column.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(values)) - np.repeat(starts, lengths)
    return np.repeat(row_item_idx, lengths), positions, values


class ItemEncoder(nn.Module):
    """Item vectors [*, d]: projected pooled text, plus an id embedding.

    The id embedding starts at zero and is dropped (zeroed, per item and step, without rescaling)
    with probability ``id_dropout`` in training, so the text part alone must represent an item; an
    item whose id never trained (cold, or new) is represented by its text. In ``frozen`` mode the pooled backbone
    outputs of the catalogue are computed once (on first use, without gradients) and kept in the
    ``text_embeddings`` buffer; in ``lora``/``full`` mode the backbone runs on the items a step needs.
    """

    def __init__(self, config: ModelConfig, catalog: CatalogFeatures, backbone: PreTrainedModel | None):
        super().__init__()
        num_rows = len(catalog.input_ids)
        hidden_size = config.user_model.hidden_size
        self.mode = config.backbone.mode
        self.pooling = config.backbone.pooling
        self.text_batch_size = config.backbone.text_batch_size
        self.id_dropout = config.item_encoder.id_dropout
        self.backbone = prepare_backbone(backbone, config.backbone) if backbone is not None else None
        self.projection = nn.Linear(backbone.config.hidden_size, hidden_size) if backbone is not None else None
        if backbone is not None:
            self.register_buffer("input_ids", catalog.input_ids.long())
            self.register_buffer("attention_mask", catalog.attention_mask.long())
        if self.backbone is not None and self.mode == "frozen":
            self.register_buffer("text_embeddings", torch.zeros(num_rows, backbone.config.hidden_size))
        self.text_cache_ready = False
        #: Set by the trainer under ZeRO-3 with several ranks (``pooled_text``).
        self.lockstep_ranks = False
        self.id_embedding = VocabularyTable("item", num_rows, hidden_size) if config.item_encoder.use_id_embedding else None

    @property
    def encodes_per_step(self) -> bool:
        """Whether the backbone runs (with gradients) on each training step's items."""
        return self.backbone is not None and self.mode != "frozen"

    def train(self, mode: bool = True) -> ItemEncoder:
        super().train(mode)
        if self.backbone is not None and self.mode == "frozen":
            self.backbone.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (torch's signature)
        if prefix + "text_embeddings" in state_dict:
            self.text_cache_ready = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def pooled_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled backbone outputs [n, H], in batches of ``text_batch_size`` trimmed to their longest text.

        With ``lockstep_ranks`` (ZeRO-3 on several ranks, where every backbone pass all-gathers its sharded weights
        and every rank must issue the same collectives) each rank runs as many passes as the rank with the most
        chunks: the extra passes encode the padding item and join the result with weight zero, so that their
        backward passes run too."""
        chunks = [
            self._pooled_chunk(input_ids[start : start + self.text_batch_size], attention_mask[start : start + self.text_batch_size])
            for start in range(0, len(input_ids), self.text_batch_size)
        ]
        pooled = torch.cat(chunks)
        if self.lockstep_ranks:
            most_chunks = torch.tensor(len(chunks), device=input_ids.device)
            torch.distributed.all_reduce(most_chunks, op=torch.distributed.ReduceOp.MAX)
            for _ in range(int(most_chunks) - len(chunks)):
                pooled = pooled + 0.0 * self._pooled_chunk(self.input_ids[:1], self.attention_mask[:1]).sum()
        return pooled

    def _pooled_chunk(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        width = max(1, int(attention_mask.sum(1).max()))
        mask = attention_mask[:, :width]
        hidden = self.backbone(input_ids=input_ids[:, :width], attention_mask=mask)
        return pool(hidden.last_hidden_state, mask, self.pooling)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.backbone is None:
            raise InputError("model.item_encoder.use_text is off: this model cannot encode item text")
        return self.projection(self.pooled_text(input_ids, attention_mask))

    def ensure_text_cache(self) -> None:
        """Fill ``text_embeddings`` (frozen mode) unless it was computed or loaded already."""
        if self.text_cache_ready:
            return
        with torch.no_grad():
            self.text_embeddings.copy_(self.pooled_text(self.input_ids, self.attention_mask))
        self.text_cache_ready = True

    def forward(self, item_idx: Tensor, drop_ids: bool = False) -> Tensor:
        """Vectors [M, d] of catalogue items ``item_idx`` [M]; the padding item's vector is zero."""
        vectors = 0.0
        if self.backbone is not None:
            if self.mode == "frozen":
                self.ensure_text_cache()
                pooled = self.text_embeddings[item_idx]
            else:
                pooled = self.pooled_text(self.input_ids[item_idx], self.attention_mask[item_idx])
            vectors = self.projection(pooled)
        if self.id_embedding is not None:
            ids = self.id_embedding(item_idx)
            if drop_ids and self.id_dropout > 0:
                ids = ids * (torch.rand(len(item_idx), 1, device=ids.device) >= self.id_dropout)
            vectors = vectors + ids
        return vectors * (item_idx != 0).unsqueeze(-1)


def _bert_style_layers(backbone: PreTrainedModel) -> nn.ModuleList:
    """The backbone's transformer layers, if they have the BERT layout the user model can hold."""
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(hasattr(layer, "attention") and hasattr(layer.attention, "self") for layer in layers):
        raise InputError(
            "model.user_model.init_from_backbone: only BERT-style encoder layers (attention.self.query/key/value, "
            f"post-LayerNorm) can be copied into the user model; the '{backbone.config.model_type}' backbone's cannot"
        )
    return layers


def _copy_bert_layer(source: nn.Module, target: nn.TransformerEncoderLayer) -> None:
    attention = source.attention.self
    with torch.no_grad():
        target.self_attn.in_proj_weight.copy_(torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]))
        target.self_attn.in_proj_bias.copy_(torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))
        pairs = [
            (source.attention.output.dense, target.self_attn.out_proj),
            (source.attention.output.LayerNorm, target.norm1),
            (source.intermediate.dense, target.linear1),
            (source.output.dense, target.linear2),
            (source.output.LayerNorm, target.norm2),
        ]
        for source_module, target_module in pairs:
            target_module.weight.copy_(source_module.weight)
            target_module.bias.copy_(source_module.bias)


class UserModel(nn.Module):
    """Causal transformer over the item vectors of a history → a state per position [B, L, d].

    Positions count from the oldest item of each row, so a history's states do not depend on how
    much left padding it has. A zero-initialised user embedding is added to every input (users not
    seen in training get none), and with ``rating_input`` each rated position's rating, centred on
    the mean rating, along a learned direction plus a learned "rated" vector (both zero at first, so
    training starts from the model without them; ``rating_dropout`` hides some in training). Attention: a position sees itself and earlier non-padding
    positions; a padding position sees only itself (so an empty history still has a state).
    ``init_from_backbone`` copies the backbone's first layers, which then also fix the heads,
    feed-forward width and (post-)LayerNorm placement.
    """

    def __init__(self, config: UserModelConfig, num_users: int, backbone: PreTrainedModel | None, rating_mean: float = 0.0):
        super().__init__()
        width = config.hidden_size
        settings = dict(
            d_model=width,
            nhead=config.num_heads,
            dim_feedforward=4 * width,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        if backbone is not None:
            source_layers = _bert_style_layers(backbone)
            hf = backbone.config
            if hf.hidden_size != width:
                raise InputError(f"model.user_model.hidden_size is {width} but init_from_backbone needs the backbone's width, {hf.hidden_size}")
            if len(source_layers) < config.num_layers:
                raise InputError(f"model.user_model.num_layers is {config.num_layers} but the backbone has {len(source_layers)} layers")
            if hf.hidden_act not in ("gelu", "relu"):
                raise InputError(f"model.user_model.init_from_backbone: backbone activation '{hf.hidden_act}' is not supported")
            settings.update(
                nhead=hf.num_attention_heads,
                dim_feedforward=hf.intermediate_size,
                activation=hf.hidden_act,
                layer_norm_eps=hf.layer_norm_eps,
                norm_first=False,
            )
        layer = nn.TransformerEncoderLayer(**settings)
        final_norm = nn.LayerNorm(width) if settings["norm_first"] else None
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, norm=final_norm, enable_nested_tensor=False)
        if backbone is not None:
            for source, target in zip(source_layers, self.encoder.layers):
                _copy_bert_layer(source, target)
        self.num_heads = settings["nhead"]
        self.max_positions = config.max_positions
        self.position_embedding = nn.Embedding(config.max_positions, width)
        self.user_embedding = VocabularyTable("user", num_users + 1, width)
        self.input_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(config.dropout)
        self.rating_mean = float(rating_mean)
        self.rating_dropout = config.rating_dropout
        if config.rating_input:
            self.rating_direction = nn.Parameter(torch.zeros(width))
            self.rated_embedding = nn.Parameter(torch.zeros(width))
        else:
            self.rating_direction = self.rated_embedding = None

    def _rating_inputs(self, input_ratings: Tensor, real: Tensor) -> Tensor:
        """What the ratings add to each position [B, L, d]: nothing where there is none."""
        rated = real & input_ratings.isfinite()
        if self.training and self.rating_dropout > 0:
            rated = rated & (torch.rand(rated.shape, device=rated.device) >= self.rating_dropout)
        centred = torch.where(rated, input_ratings - self.rating_mean, torch.zeros_like(input_ratings)).unsqueeze(-1)
        return centred * self.rating_direction + rated.unsqueeze(-1).to(centred) * self.rated_embedding

    def _inputs(self, item_vectors: Tensor, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None) -> tuple[Tensor, Tensor]:
        length = input_items.shape[1]
        if length > self.max_positions:
            raise InputError(f"history of {length} items is longer than model.user_model.max_positions ({self.max_positions})")
        real = input_items != 0
        positions = (real.cumsum(1) - 1).clamp(min=0)
        hidden = item_vectors + self.position_embedding(positions) + embedding_or_zero(self.user_embedding, user_idx).unsqueeze(1)
        if self.rating_direction is not None and input_ratings is not None:
            hidden = hidden + self._rating_inputs(input_ratings.to(hidden), real)
        future = torch.ones(length, length, dtype=torch.bool, device=input_items.device).triu(1)
        itself = torch.eye(length, dtype=torch.bool, device=input_items.device)
        blocked = future | (~real.unsqueeze(1) & ~itself)  # [B, L, L]: True = may not attend
        return self.dropout(self.input_norm(hidden)), blocked.repeat_interleave(self.num_heads, dim=0)

    def forward(self, item_vectors: Tensor, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> Tensor:
        """``input_ratings`` [B, L]: the history's ratings on the normalised scale, NaN where none
        (None: no rating anywhere)."""
        hidden, blocked = self._inputs(item_vectors, input_items, user_idx, input_ratings)
        return self.encoder(hidden, mask=blocked)

    def forward_with_last_attention(
        self, item_vectors: Tensor, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``forward``'s state at the last position [B, d] and, from the same pass, the last layer's attention of
        that position over the history [B, L], averaged over heads (serving needs both per request, and nothing
        else: its last layer runs for the last position alone)."""
        hidden, blocked = self._inputs(item_vectors, input_items, user_idx, input_ratings)
        *earlier, last = self.encoder.layers
        for layer in earlier:
            hidden = layer(hidden, src_mask=blocked)
        state, weights = _last_position(last, hidden, blocked[:, -1:])
        if self.encoder.norm is not None:
            state = self.encoder.norm(state)
        return state, weights


def _last_position(layer: nn.TransformerEncoderLayer, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``layer``'s output at the last position [B, d] of ``hidden`` [B, L, d] (``mask`` [B·heads, 1, L]: True = may
    not attend) and that position's attention over the positions [B, L], averaged over heads: what
    ``nn.TransformerEncoderLayer.forward`` computes there, without the other L - 1 queries."""

    def feed_forward(x: Tensor) -> Tensor:
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    query = hidden[:, -1:]
    if layer.norm_first:
        keys = layer.norm1(hidden)
        attended, weights = layer.self_attn(keys[:, -1:], keys, keys, attn_mask=mask, need_weights=True, average_attn_weights=True)
        state = query + layer.dropout1(attended)
        state = state + feed_forward(layer.norm2(state))
    else:
        attended, weights = layer.self_attn(query, hidden, hidden, attn_mask=mask, need_weights=True, average_attn_weights=True)
        state = layer.norm1(query + layer.dropout1(attended))
        state = layer.norm2(state + feed_forward(state))
    return state[:, 0], weights[:, 0]


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, a softmax gate and a tower per task. Each
    tower's output is added to the shared state (residual), so a task starts from the state itself."""

    def __init__(self, width: int, config: TowerConfig, task_names: list[str], dropout: float):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, config.expert_hidden), nn.GELU(), nn.Dropout(dropout)) for _ in range(config.num_experts))
        self.gates = nn.ModuleDict({name: nn.Linear(width, config.num_experts) for name in task_names})
        self.towers = nn.ModuleDict({name: nn.Linear(config.expert_hidden, width) for name in task_names})

    def forward(self, shared: Tensor) -> dict[str, Tensor]:
        experts = torch.stack([expert(shared) for expert in self.experts], dim=-2)  # [..., E, hidden]
        outputs = {}
        for name, gate in self.gates.items():
            mixture = (torch.softmax(gate(shared), dim=-1).unsqueeze(-1) * experts).sum(-2)
            outputs[name] = shared + self.towers[name](mixture)
        return outputs


class SharedBottom(nn.Module):
    """One shared layer, then a tower per task (residual, as in ``MMoE``)."""

    def __init__(self, width: int, config: TowerConfig, task_names: list[str], dropout: float):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(width, config.expert_hidden), nn.GELU(), nn.Dropout(dropout))
        self.towers = nn.ModuleDict({name: nn.Linear(config.expert_hidden, width) for name in task_names})

    def forward(self, shared: Tensor) -> dict[str, Tensor]:
        bottom = self.bottom(shared)
        return {name: shared + tower(bottom) for name, tower in self.towers.items()}


class PolyrecModel(nn.Module):
    """The multi-task recommender. See the module docstring; batches are dicts of tensors.

    Training batch: ``input_items`` [B, L], ``target_items`` [B, L] (0: no target),
    ``target_ratings`` [B, L] (NaN: none), ``target_likes`` [B, L] (-1: none), ``user_idx`` [B].
    Evaluation batch: ``input_items`` [B, L], ``user_idx`` [B], ``target_items`` [B].

    In ``lora``/``full`` mode the retrieval loss is always the sampled
    softmax (the catalogue cannot be encoded every step); ``tasks.retrieval_loss`` chooses in
    ``frozen`` mode (``auto``: by the catalogue's size, ``TaskConfig.sampled_retrieval``). With the sampled
    softmax a training step encodes only the items it touches, so its cost does not grow with the catalogue.
    ``item_table()`` is cached outside training mode; switching modes (``train()``, ``eval()``) or
    ``refresh_item_cache()`` recomputes it.

    Serving (``serve.model_runtime``) calls four methods besides these: ``retrieval_keys`` (its ANN index),
    ``queries_and_contributions`` (one user-model pass per batch of requests, which retrieval and ranking share),
    ``score_with_queries`` (ranking from that pass) and ``encode_item_text`` (items registered at run time).
    """

    def __init__(
        self,
        config: ModelConfig,
        num_users: int,
        num_items: int,
        num_attributes: int,
        catalog: CatalogFeatures,
        rating_mean: float,
    ):
        super().__init__()
        for field in ("input_ids", "attention_mask", "attributes", "is_cold"):
            rows = len(getattr(catalog, field))
            if rows != num_items + 1:
                raise InputError(f"catalog: '{field}' has {rows} rows, expected num_items + 1 = {num_items + 1}")
        if catalog.attributes.shape[1] != num_attributes + 1:
            raise InputError(f"catalog: 'attributes' has {catalog.attributes.shape[1]} columns, expected num_attributes + 1")
        if not (config.item_encoder.use_text or config.item_encoder.use_id_embedding):
            raise InputError("model.item_encoder: use_text and use_id_embedding cannot both be off")
        if config.user_model.init_from_backbone and not config.item_encoder.use_text:
            raise InputError("model.user_model.init_from_backbone needs model.item_encoder.use_text")

        self.config = config
        self.num_users = num_users
        self.num_items = num_items
        self.num_attributes = num_attributes
        self.rating_mean = float(rating_mean)

        backbone, self.tokenizer = load_backbone(config.backbone) if config.item_encoder.use_text else (None, None)
        # Layers are copied before LoRA wraps the backbone.
        self.user_model = UserModel(config.user_model, num_users, backbone if config.user_model.init_from_backbone else None, rating_mean)
        self.item_encoder = ItemEncoder(config, catalog, backbone)
        setup = TaskSetup(
            config=config.tasks,
            hidden_size=config.user_model.hidden_size,
            num_users=num_users,
            num_items=num_items,
            rating_mean=rating_mean,
            item_attributes=catalog.attributes,
            is_cold=catalog.is_cold,
            sampled_retrieval=config.tasks.sampled_retrieval(num_items) or self.item_encoder.encodes_per_step,
        )
        self.sampled_retrieval = setup.sampled_retrieval
        self.tasks = build_tasks(setup)
        if not self.tasks:
            raise InputError("model.tasks: every task is switched off")
        tower_class = MMoE if config.towers.kind == "mmoe" else SharedBottom
        self.towers = tower_class(config.user_model.hidden_size, config.towers, list(self.tasks), config.user_model.dropout)
        self.register_buffer("item_cache", None, persistent=False)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    # --- item vectors ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> PolyrecModel:
        super().train(mode)
        self.item_cache = None
        return self

    def refresh_item_cache(self) -> Tensor:
        with torch.no_grad():
            self.item_cache = self.item_encoder(torch.arange(self.num_items + 1, device=self._device()))
        return self.item_cache

    def item_table(self) -> Tensor:
        """Vectors of every item [N+1, d] (row 0 zero): recomputed with gradients in training mode,
        cached otherwise."""
        if self.training:
            return self.item_encoder(torch.arange(self.num_items + 1, device=self._device()), drop_ids=True)
        return self.item_cache if self.item_cache is not None else self.refresh_item_cache()

    def _device(self) -> torch.device:
        return self.user_model.position_embedding.weight.device

    def _step_items(self, item_idx: Tensor, negatives: Tensor | None) -> StepItems:
        """Item vectors for a step touching ``item_idx`` (any shape): the catalogue table, or, in training
        without the full softmax, only the items needed (and the negatives)."""
        if not (self.training and self.sampled_retrieval):
            return StepItems(self.item_table(), None, negatives)
        needed = [item_idx.flatten()] + ([negatives] if negatives is not None else [])
        unique = torch.unique(torch.cat(needed))
        return StepItems(self.item_encoder(unique, drop_ids=True), unique, negatives)

    # --- training -------------------------------------------------------------------------------

    def calculate_loss(self, batch: Mapping[str, Tensor], return_shared: bool = False) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
        """Unweighted per-task losses (scalars), keyed by task name; with ``return_shared``, also the
        user model's output [B, L, d], the representation every task reads (for GradNorm)."""
        input_items, target_items = batch["input_items"], batch["target_items"]
        negatives = self.tasks["retrieval"].sample_negatives() if "retrieval" in self.tasks else None
        items = self._step_items(torch.stack([input_items, target_items]), negatives)
        input_ratings = batch.get("input_ratings")
        shared = self.user_model(items.lookup(input_items), input_items, batch["user_idx"], input_ratings)
        queries = self._read_history(self.towers(shared), input_items, input_ratings)
        losses = {name: task.loss(queries[name], batch, items) for name, task in self.tasks.items()}
        return (losses, shared) if return_shared else losses

    # --- inference ------------------------------------------------------------------------------

    # ``input_ratings`` [B, L] below: the history's ratings (normalised scale), NaN where none; None: none at all.

    def sequence_states(self, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> Tensor:
        """The user model's state at every position [B, L, d]."""
        items = self._step_items(input_items, None)
        return self.user_model(items.lookup(input_items), input_items, user_idx, input_ratings)

    def user_state(self, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> Tensor:
        """The state after the whole history [B, d]."""
        return self.sequence_states(input_items, user_idx, input_ratings)[:, -1]

    def user_queries(self, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> dict[str, Tensor]:
        """Each task's query [B, d]: its tower's output for the state after the whole history."""
        return self._read_history(self.towers(self.user_state(input_items, user_idx, input_ratings)), input_items, input_ratings)

    def _read_history(self, outputs: Mapping[str, Tensor], input_items: Tensor, input_ratings: Tensor | None) -> dict[str, Tensor]:
        """Each task's query from its tower's output and the history (``Task.read_history``)."""
        return {name: task.read_history(outputs[name], input_items, input_ratings) for name, task in self.tasks.items()}

    def score_candidates(
        self,
        input_items: Tensor,
        user_idx: Tensor,
        candidate_items: Tensor,
        extra_item_vectors: Tensor | None = None,
        input_ratings: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Every task's score [B, C] of ``candidate_items`` [B, C]: the retrieval logit (-inf for
        item 0), the rating (normalised scale), the like probability, the attribute affinity.
        ``extra_item_vectors`` [E, d] (e.g. from ``encode_item_text``) are items N+1 .. N+E; they
        have no learned biases."""
        queries = self.user_queries(input_items, user_idx, input_ratings)
        return self.score_with_queries(queries, user_idx, candidate_items, extra_item_vectors)

    def score_with_queries(
        self,
        queries: Mapping[str, Tensor],
        user_idx: Tensor,
        candidate_items: Tensor,
        extra_item_vectors: Tensor | None = None,
        tasks: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """``score_candidates`` for queries already computed by ``user_queries`` (or
        ``queries_and_contributions``): the user model does not run again. ``tasks``: the tasks scored, of
        those the model has (None: every one)."""
        table = self.item_table()
        if extra_item_vectors is not None:
            table = torch.cat([table, extra_item_vectors.to(table)])
        vectors = table[candidate_items]
        wanted = self.tasks.items() if tasks is None else [(name, task) for name, task in self.tasks.items() if name in tasks]
        return {name: task.score(queries[name], candidate_items, vectors, user_idx) for name, task in wanted}

    def predict(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every task's score [B] of (user, ``target_items``)."""
        scores = self.score_candidates(batch["input_items"], batch["user_idx"], batch["target_items"].unsqueeze(1), input_ratings=batch.get("input_ratings"))
        return {name: score[:, 0] for name, score in scores.items()}

    def retrieval_query(self, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> Tensor:
        """Query vectors [B, d] whose inner products with ``retrieval_keys()`` are the retrieval logits
        (for an inner-product ANN index)."""
        return self.tasks["retrieval"].query_embedding(self.user_queries(input_items, user_idx, input_ratings)["retrieval"])

    def retrieval_keys(self) -> Tensor:
        """Key vectors [N+1, d] of every item for ``retrieval_query``."""
        return self.tasks["retrieval"].item_embedding(self.item_table())

    def full_sort_predict(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Retrieval logits of every item [B, N+1]; column 0 (padding) is -inf."""
        scores = self.retrieval_query(batch["input_items"], batch["user_idx"], batch.get("input_ratings")) @ self.retrieval_keys().T
        scores[:, 0] = float("-inf")
        return scores

    # --- serving: one user-model pass shared by retrieval and ranking, and new items' text -------

    def encode_item_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Vectors [n, d] from text alone (right-padded token ids), for cold or new items."""
        return self.item_encoder.encode_text(input_ids, attention_mask)

    def queries_and_contributions(self, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """``user_queries`` and ``attention_contributions`` from one pass of the user model."""
        items = self._step_items(input_items, None)
        state, weights = self.user_model.forward_with_last_attention(items.lookup(input_items), input_items, user_idx, input_ratings)
        return self._read_history(self.towers(state), input_items, input_ratings), weights * (input_items != 0)

    def attention_contributions(self, input_items: Tensor, user_idx: Tensor, input_ratings: Tensor | None = None) -> Tensor:
        """How much each history position contributed to the last state [B, L] (the last layer's
        attention from the last position, averaged over heads); padding positions get 0."""
        return self.queries_and_contributions(input_items, user_idx, input_ratings)[1]
