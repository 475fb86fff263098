"""The prediction tasks of the multi-task model, one class each.

A task turns its tower's output (a *query*, one per history position) into a training loss and,
for (user, item) pairs, a score. Adding a task is one class here plus its on/off switch in
``TaskConfig`` (a field named like the task's ``name``).

Shapes: B users, L history positions, d the item vector width, C candidates per user, N items
(index 0 is padding), A attributes (index 0 unused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config import TaskConfig


@dataclass(frozen=True)
class TaskSetup:
    """Everything a task's constructor may need."""

    config: TaskConfig
    hidden_size: int
    num_users: int
    num_items: int
    rating_mean: float
    item_attributes: Tensor  # [N+1, A+1] multi-hot
    is_cold: Tensor  # [N+1] bool: withheld from training
    sampled_retrieval: bool  # sampled softmax instead of the whole catalogue


@dataclass
class StepItems:
    """The item vectors one training step has: the whole catalogue (``item_idx`` None, row i is item
    i) or only the sorted catalogue indices ``item_idx``; plus the sampled retrieval negatives."""

    vectors: Tensor  # [M, d]
    item_idx: Tensor | None  # [M]
    negatives: Tensor | None  # [K]

    def lookup(self, idx: Tensor) -> Tensor:
        rows = idx if self.item_idx is None else torch.searchsorted(self.item_idx, idx.contiguous())  # a slice of a batch: torch copies it anyway, and warns
        return self.vectors[rows]


class VocabularyTable(nn.Embedding):
    """A learned table with a row per item or per user (``vocabulary``). Vocabularies are renumbered when data
    is added, so these rows are carried over by id, not by position (``train.transfer``). Every row starts at
    zero, so a row that never trained (an item or user new since) adds nothing."""

    def __init__(self, vocabulary: Literal["item", "user"], num_rows: int, width: int):
        super().__init__(num_rows, width)
        nn.init.zeros_(self.weight)
        self.vocabulary = vocabulary


def embedding_or_zero(embedding: nn.Embedding, idx: Tensor) -> Tensor:
    """Rows of ``embedding``; zeros for indices it does not hold (users or items new since training)."""
    known = idx < embedding.num_embeddings
    return embedding(torch.where(known, idx, 0)) * known.unsqueeze(-1)


def scaled_dot(query: Tensor, item_vectors: Tensor) -> Tensor:
    return (query * item_vectors).sum(-1) / query.shape[-1] ** 0.5


class Task(nn.Module):
    name: ClassVar[str]

    def loss(self, query: Tensor, batch: Mapping[str, Tensor], items: StepItems) -> Tensor:
        """Mean loss over the positions of ``batch`` that carry this task's target; query [B, L, d]."""
        raise NotImplementedError

    def read_history(self, output: Tensor, input_items: Tensor, input_ratings: Tensor | None) -> Tensor:
        """The task's query from its tower's output, [B, L, d] for every position or [B, d] for the
        last, and the history [B, L] behind it; a task may add what it reads from the history itself
        (``input_ratings``: normalised, NaN where none; None: no ratings). By default the output."""
        return output

    def score(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor, user_idx: Tensor) -> Tensor:
        """Scores [B, C] of candidates ``item_idx`` [B, C] with vectors [B, C, d] for queries [B, d]."""
        raise NotImplementedError


class RetrievalTask(Task):
    """Next-item retrieval: cosine similarity / temperature, softmax cross-entropy over the catalogue
    (or a sampled part of it) at every position with a target.

    Cold items (withheld from training) are never candidates in training, so nothing is learned
    about them beyond their text. The sampled softmax draws ``num_sampled_negatives`` uniform
    negatives among the warm items; the batch's own targets are further (popularity-biased)
    negatives. Each candidate's logit is corrected by the log of its expected count among the
    candidates (in-batch count + K / warm items), the logQ correction of Yi et al. 2019.

    With ``mask_history`` the softmax leaves out the items of the history up to each position (not
    the target): evaluation and serving never rank those, so training should not spend the model's
    capacity on pushing them down.
    """

    name = "retrieval"

    def __init__(self, setup: TaskSetup):
        super().__init__()
        self.temperature = setup.config.temperature
        self.num_negatives = setup.config.num_sampled_negatives if setup.sampled_retrieval else 0
        self.mask_history = setup.config.mask_history
        trainable = ~setup.is_cold.bool()
        trainable[0] = False
        self.register_buffer("trainable_targets", trainable)
        # Drawing and weighting negatives per step then costs O(negatives), not O(catalogue).
        self.register_buffer("warm_items", trainable.nonzero().squeeze(1), persistent=False)

    def query_embedding(self, query: Tensor) -> Tensor:
        return F.normalize(query, dim=-1) / self.temperature

    def item_embedding(self, item_vectors: Tensor) -> Tensor:
        return F.normalize(item_vectors, dim=-1)

    def sample_negatives(self) -> Tensor | None:
        if not self.num_negatives:
            return None
        draws = torch.randint(len(self.warm_items), (self.num_negatives,), device=self.warm_items.device)
        return self.warm_items[draws]

    def loss(self, query: Tensor, batch: Mapping[str, Tensor], items: StepItems) -> Tensor:
        valid = batch["target_items"] > 0
        targets = batch["target_items"][valid]
        if not len(targets):
            return query.sum() * 0.0
        queries = self.query_embedding(query[valid])
        if items.negatives is None:
            logits = queries @ self.item_embedding(items.vectors).T
            left_out = ~self.trainable_targets
            if self.mask_history:
                catalogue = torch.arange(len(self.trainable_targets), device=targets.device)
                left_out = left_out | self.seen_before(batch["input_items"], valid, targets, catalogue)
            return F.cross_entropy(logits.masked_fill(left_out, float("-inf")), targets)
        candidates = torch.unique(torch.cat([targets, items.negatives]))
        target_rows = torch.searchsorted(candidates, targets)
        in_batch = torch.zeros(len(candidates), device=query.device).index_add_(0, target_rows, torch.ones_like(targets, dtype=torch.float))
        expected_count = in_batch + self.num_negatives / len(self.warm_items)
        logits = queries @ self.item_embedding(items.lookup(candidates)).T - expected_count.log()
        if self.mask_history:
            logits = logits.masked_fill(self.seen_before(batch["input_items"], valid, targets, candidates), float("-inf"))
        return F.cross_entropy(logits, target_rows)

    @staticmethod
    def seen_before(input_items: Tensor, valid: Tensor, targets: Tensor, columns: Tensor) -> Tensor:
        """[V, M] bool: for each position with a target (``valid`` [B, L]), which of the items
        ``columns`` [M] its row's history holds up to that position, except the target itself (a repeat
        stays a correct answer) and padding. Only the columns are compared, so a sampled softmax over a
        large catalogue never builds a catalogue-wide tensor."""
        length = input_items.shape[1]
        steps = torch.arange(length, device=input_items.device).view(1, length, 1)
        matches = input_items.unsqueeze(-1) == columns  # [B, L, M]
        first_seen = torch.where(matches, steps, length).amin(dim=1)  # [B, M]
        rows, positions = valid.nonzero(as_tuple=True)
        seen = first_seen[rows] <= positions.unsqueeze(1)
        return seen & (columns != 0) & (columns != targets.unsqueeze(1))

    def score(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor, user_idx: Tensor) -> Tensor:
        logits = (self.query_embedding(query).unsqueeze(1) * self.item_embedding(item_vectors)).sum(-1)
        return logits.masked_fill(item_idx == 0, float("-inf"))


class RatingTask(Task):
    """Explicit rating on the normalised scale: ``<u, i> / sqrt(d) + b_u(t) + b_i + mu``, MSE where rated.
    (The inner product is scaled as in attention, so untrained predictions start near ``mu``.)

    ``b_u(t) = b_u + recent level``: with ``rating_recency``, the user's ratings up to position t minus
    their ``mu + b_i``, weighted by ``decay`` per step back and shrunk towards 0 by ``prior`` pseudo-
    ratings (both learned), as Koren's timeSVD++ lets a user's bias drift: on MovieLens a user's recent
    ratings say more about the next one than their average does. The level travels as the last
    component of the task's query, so whatever carries queries (serving) carries it too."""

    name = "rating"

    def __init__(self, setup: TaskSetup):
        super().__init__()
        self.user_bias = VocabularyTable("user", setup.num_users + 1, 1)
        self.item_bias = VocabularyTable("item", setup.num_items + 1, 1)
        self.register_buffer("rating_mean", torch.tensor([float(setup.rating_mean)]))  # 1-d for DeepSpeed
        self.recency = setup.config.rating_recency
        if self.recency:
            self.decay_logit = nn.Parameter(torch.tensor([math.log(0.8 / 0.2)]))  # decay 0.8 per step back
            self.prior_logit = nn.Parameter(torch.tensor([math.log(math.expm1(3.0))]))  # softplus: 3 pseudo-ratings

    def recent_level(self, input_items: Tensor, input_ratings: Tensor) -> Tensor:
        """The recent rating level after each position [B, L] (0 without rated items)."""
        rated = (input_items > 0) & input_ratings.isfinite()
        item_bias = embedding_or_zero(self.item_bias, input_items).squeeze(-1)
        residuals = torch.where(rated, input_ratings.to(item_bias) - self.rating_mean - item_bias, torch.zeros_like(item_bias))
        steps = torch.arange(input_items.shape[1], device=input_items.device)
        back = steps[:, None] - steps[None, :]  # [t, s]: how far s lies before t
        weights = torch.where(back >= 0, torch.sigmoid(self.decay_logit) ** back.clamp(min=0), torch.zeros_like(item_bias[:1]))
        return (residuals @ weights.T) / (rated.to(item_bias) @ weights.T + F.softplus(self.prior_logit))

    def read_history(self, output: Tensor, input_items: Tensor, input_ratings: Tensor | None) -> Tensor:
        if not self.recency:
            return output
        if input_ratings is None:
            level = output.new_zeros(output.shape[:-1])
        else:
            level = self.recent_level(input_items, input_ratings).to(output)
            level = level[:, -1] if output.ndim == 2 else level
        return torch.cat([output, level.unsqueeze(-1)], dim=-1)

    def predict(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor, user_idx: Tensor) -> Tensor:
        level = 0.0
        if self.recency:
            query, level = query[..., :-1], query[..., -1]
        user_bias = embedding_or_zero(self.user_bias, user_idx)  # [B, 1] or [B, L, 1]
        item_bias = embedding_or_zero(self.item_bias, item_idx).squeeze(-1)
        return scaled_dot(query, item_vectors) + user_bias.squeeze(-1) + level + item_bias + self.rating_mean

    def loss(self, query: Tensor, batch: Mapping[str, Tensor], items: StepItems) -> Tensor:
        ratings = batch["target_ratings"]
        valid = (batch["target_items"] > 0) & ratings.isfinite()
        targets = batch["target_items"][valid]
        users = batch["user_idx"].unsqueeze(1).expand_as(valid)[valid]
        predicted = self.predict(query[valid], targets, items.lookup(targets), users)
        # Without targets the loss still reads the task's tables: DeepSpeed gives a parameter left without a gradient a
        # dense zero one, which a sparse table (``optimizer.sparse_tables``) cannot take.
        return F.mse_loss(predicted, ratings[valid].float()) if len(targets) else predicted.sum() * 0.0

    def score(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor, user_idx: Tensor) -> Tensor:
        return self.predict(query.unsqueeze(1), item_idx, item_vectors, user_idx.unsqueeze(1))


class LikeTask(Task):
    """Like / dislike: ``sigmoid(<u, i> / sqrt(d) + b_i + b)``, binary cross-entropy where the like is known."""

    name = "like"

    def __init__(self, setup: TaskSetup):
        super().__init__()
        self.item_bias = VocabularyTable("item", setup.num_items + 1, 1)
        self.bias = nn.Parameter(torch.zeros(1))  # 1-d: DeepSpeed cannot broadcast 0-d tensors

    def logit(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor) -> Tensor:
        return scaled_dot(query, item_vectors) + embedding_or_zero(self.item_bias, item_idx).squeeze(-1) + self.bias

    def loss(self, query: Tensor, batch: Mapping[str, Tensor], items: StepItems) -> Tensor:
        likes = batch["target_likes"]
        valid = (batch["target_items"] > 0) & (likes >= 0)
        targets = batch["target_items"][valid]
        logits = self.logit(query[valid], targets, items.lookup(targets))
        return F.binary_cross_entropy_with_logits(logits, likes[valid].float()) if len(targets) else logits.sum() * 0.0

    def score(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor, user_idx: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(query.unsqueeze(1), item_idx, item_vectors))


class AttributesTask(Task):
    """Auxiliary: multi-label prediction of the next item's attributes. As a score, the mean
    predicted probability of the candidate's attributes (0 for items without known attributes)."""

    name = "attributes"

    def __init__(self, setup: TaskSetup):
        super().__init__()
        self.register_buffer("item_attributes", setup.item_attributes.float())
        self.head = nn.Linear(setup.hidden_size, setup.item_attributes.shape[1] - 1)

    def loss(self, query: Tensor, batch: Mapping[str, Tensor], items: StepItems) -> Tensor:
        valid = batch["target_items"] > 0
        if not valid.any():
            return query.sum() * 0.0
        labels = self.item_attributes[batch["target_items"][valid], 1:]
        return F.binary_cross_entropy_with_logits(self.head(query[valid]), labels)

    def score(self, query: Tensor, item_idx: Tensor, item_vectors: Tensor, user_idx: Tensor) -> Tensor:
        probabilities = torch.sigmoid(self.head(query)).unsqueeze(1)  # [B, 1, A]
        known = item_idx < len(self.item_attributes)
        attributes = self.item_attributes[torch.where(known, item_idx, 0), 1:] * known.unsqueeze(-1)
        return (attributes * probabilities).sum(-1) / attributes.sum(-1).clamp(min=1.0)


TASKS: tuple[type[Task], ...] = (RetrievalTask, RatingTask, LikeTask, AttributesTask)


def build_tasks(setup: TaskSetup) -> nn.ModuleDict:
    """The tasks switched on in ``TaskConfig``, in a fixed order. The attributes task needs a catalogue with
    attributes: without any (a source with no genres or categories) it is left out."""
    has_attributes = setup.item_attributes.shape[1] > 1
    return nn.ModuleDict({task.name: task(setup) for task in TASKS if getattr(setup.config, task.name) and (task is not AttributesTask or has_attributes)})
