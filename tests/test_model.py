"""The multi-task model on tiny random backbones: masks, losses that fall on a learnable synthetic
problem, score consistency, loss weighting, LoRA on a decoder backbone, cold-start items."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from common.errors import InputError
from train.config import LossWeightingConfig, ModelConfig, TaskConfig
from train.model import CatalogFeatures, PolyrecModel, _last_position
from train.tasks import RetrievalTask, StepItems, TaskSetup
from train.weighting import LossWeighting

# --- A learnable synthetic world ---------------------------------------------------------------
# 30 warm items in a cycle (the next item is i % 30 + 1) and item 31, cold, with item 7's text.
NUM_WARM = 30
COLD_ITEM, TWIN_OF_COLD = 31, 7
NUM_ITEMS, NUM_USERS, NUM_ATTRIBUTES = 31, 8, 6
VOCAB = 100

TINY_BERT = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}
TINY_QWEN2 = {**TINY_LLAMA, "model_type": "qwen2"}


pytestmark = pytest.mark.usefixtures("one_thread")


def item_tokens(item: int) -> list[int]:
    item = TWIN_OF_COLD if item == COLD_ITEM else item
    return [1, 50 + item % 7, 60 + item % 5, 10 + item]


def item_attributes(item: int) -> list[int]:
    return [item % 3 + 1, item % 2 + 4] + ([6] if item % 5 == 0 else [])


def items_table() -> pa.Table:
    items = list(range(1, NUM_ITEMS + 1))
    return pa.table(
        {
            "item_idx": pa.array(items, pa.int32()),
            "input_ids": pa.array([item_tokens(i) for i in items], pa.list_(pa.int32())),
            "attributes": pa.array([item_attributes(i) for i in items], pa.list_(pa.int32())),
            "is_cold": [i == COLD_ITEM for i in items],
        }
    )


def next_item(item: torch.Tensor) -> torch.Tensor:
    return item % NUM_WARM + 1


def rating_of(item: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    return torch.where(item % 2 == 0, 1.0, -1.0) + 0.5 * (user % 2)


def training_batch(generator: torch.Generator, size: int = 32, length: int = 6) -> dict[str, torch.Tensor]:
    start = torch.randint(1, NUM_WARM + 1, (size,), generator=generator)
    sequence = [start]
    for _ in range(length):
        sequence.append(next_item(sequence[-1]))
    sequence = torch.stack(sequence, dim=1)
    inputs, targets = sequence[:, :-1].clone(), sequence[:, 1:].clone()
    padding = torch.arange(length) < torch.randint(0, length - 1, (size, 1), generator=generator)
    inputs[padding], targets[padding] = 0, 0
    users = torch.randint(1, NUM_USERS + 1, (size,), generator=generator)
    ratings = rating_of(targets, users.unsqueeze(1))
    ratings[(targets == 0) | (torch.rand(size, length, generator=generator) < 0.25)] = float("nan")
    likes = (targets % 3 == 0).long()
    likes[(targets == 0) | (torch.rand(size, length, generator=generator) < 0.25)] = -1
    return {"input_items": inputs, "target_items": targets, "target_ratings": ratings, "target_likes": likes, "user_idx": users}


def model_config(**sections) -> ModelConfig:
    settings = {
        "backbone": {"random_init_config": TINY_BERT},
        "user_model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "dropout": 0.1, "max_positions": 16},
        "towers": {"num_experts": 3, "expert_hidden": 32},
        "tasks": {"temperature": 0.1},
    }
    for section, values in sections.items():
        settings[section] = {**settings.get(section, {}), **values}
    return ModelConfig.model_validate(settings)


def build_model(config: ModelConfig, seed: int = 0) -> PolyrecModel:
    torch.manual_seed(seed)
    catalog = CatalogFeatures.from_items_table(items_table(), max_tokens=8, pad_token_id=0, num_attributes=NUM_ATTRIBUTES)
    return PolyrecModel(config, NUM_USERS, NUM_ITEMS, NUM_ATTRIBUTES, catalog, rating_mean=0.25)


def train(model: PolyrecModel, steps: int, lr: float = 3e-3, seed: int = 0) -> list[dict[str, float]]:
    """Adam on the weighted loss, as the trainer does; the per-task losses of every step."""
    generator = torch.Generator().manual_seed(seed)
    weighting = LossWeighting(model.config.loss_weighting, model.task_names)
    trained = [p for p in [*model.parameters(), *weighting.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        losses, shared = model.calculate_loss(training_batch(generator), return_shared=True)
        total, _ = weighting(losses, shared)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({name: loss.item() for name, loss in losses.items()})
    return history


@pytest.fixture(scope="module")
def trained() -> tuple[PolyrecModel, list[dict[str, float]]]:
    # Uncertainty weighting balances the tasks here, so each of them (the auxiliary attributes task included)
    # must learn its part of the synthetic problem within the budget.
    model = build_model(model_config(item_encoder={"id_dropout": 0.3}, loss_weighting={"method": "uncertainty"}))
    history = train(model, steps=300)
    return model.eval(), history


# --- Catalogue features -------------------------------------------------------------------------


def test_catalog_features_pad_truncate_and_multi_hot():
    table = pa.table(
        {
            "item_idx": pa.array([2, 1], pa.int32()),
            "input_ids": pa.array([[5, 6, 7, 8, 9], [3]], pa.list_(pa.int32())),
            "attributes": pa.array([[1, 3], []], pa.list_(pa.int32())),
            "is_cold": [True, False],
        }
    )
    catalog = CatalogFeatures.from_items_table(table, max_tokens=4, pad_token_id=99)
    assert catalog.input_ids.tolist() == [[99, 99, 99, 99], [3, 99, 99, 99], [5, 6, 7, 8]]
    assert catalog.attention_mask.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert catalog.attributes.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]]
    assert catalog.is_cold.tolist() == [False, False, True]


def test_catalog_features_reject_bad_indices():
    good = {"input_ids": pa.array([[1], [2]], pa.list_(pa.int32())), "attributes": pa.array([[1], [2]], pa.list_(pa.int32()))}
    with pytest.raises(InputError, match="item_idx"):
        CatalogFeatures.from_items_table(pa.table({"item_idx": pa.array([1, 3], pa.int32()), **good}), 4, 0)
    with pytest.raises(InputError, match="attributes.*item_idx 2"):
        CatalogFeatures.from_items_table(pa.table({"item_idx": pa.array([1, 2], pa.int32()), **good}), 4, 0, num_attributes=1)
    with pytest.raises(InputError, match="input_ids"):
        CatalogFeatures.from_items_table(pa.table({"item_idx": pa.array([1], pa.int32())}), 4, 0)


# --- Masks and shapes ---------------------------------------------------------------------------


def test_padding_never_attends_and_states_are_causal():
    model = build_model(model_config()).eval()
    users = torch.tensor([3])
    history = torch.tensor([[4, 9, 2, 17, 5, 11]])
    with torch.no_grad():
        states = model.sequence_states(history, users)
        padded = model.sequence_states(F.pad(history, (5, 0)), users)
        assert padded.shape == (1, 11, 32)
        torch.testing.assert_close(padded[:, 5:], states)

        changed = history.clone()
        changed[0, 3] = 20
        changed_states = model.sequence_states(changed, users)
        torch.testing.assert_close(changed_states[:, :3], states[:, :3])
        assert (changed_states[0, 3:] - states[0, 3:]).abs().amax(-1).min() > 1e-3

        # Whatever sits in the padding slots, the real positions' states do not see it.
        padded_items = F.pad(history, (3, 0))
        vectors = model.item_table()[padded_items]
        noisy = vectors.clone()
        noisy[:, :3] = torch.randn(1, 3, 32) * 10
        torch.testing.assert_close(model.user_model(noisy, padded_items, users)[:, 3:], model.user_model(vectors, padded_items, users)[:, 3:])

        contributions = model.attention_contributions(padded_items, users)
        assert contributions.shape == (1, 9)
        assert contributions[0, :3].abs().max() == 0
        torch.testing.assert_close(contributions.sum(), torch.tensor(1.0))

        empty = model.user_state(torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 2]))
        assert empty.shape == (2, 32) and empty.isfinite().all()
        with pytest.raises(InputError, match="max_positions"):
            model.user_state(torch.ones(1, 17, dtype=torch.long), users)


def test_history_ratings_are_read_causally_and_a_missing_one_adds_nothing():
    model = build_model(model_config()).eval()
    with torch.no_grad():  # zero at initialisation (training starts from the model without ratings)
        assert model.user_model.rating_direction.abs().max() == 0 and model.user_model.rated_embedding.abs().max() == 0
        model.user_model.rating_direction.normal_()
        model.user_model.rated_embedding.normal_()
    users, history = torch.tensor([3]), torch.tensor([[0, 0, 4, 9, 2, 17]])
    nan = float("nan")
    with torch.no_grad():
        unrated = model.sequence_states(history, users)
        torch.testing.assert_close(model.sequence_states(history, users, torch.full((1, 6), nan)), unrated)
        ratings = torch.tensor([[5.0, -7.0, nan, 1.0, nan, nan]])  # the padding's "ratings" are ignored
        rated = model.sequence_states(history, users, ratings)
        torch.testing.assert_close(rated[:, :3], unrated[:, :3])
        assert (rated[0, 3:] - unrated[0, 3:]).abs().amax(-1).min() > 1e-3
        torch.testing.assert_close(rated, model.sequence_states(history, users, torch.tensor([[nan, nan, nan, 1.0, nan, nan]])))
        # A rating at the mean adds only the "rated" vector; the direction scales with the distance from the mean.
        at_mean = model.user_model._rating_inputs(torch.tensor([[0.25, 2.25]]), torch.tensor([[True, True]]))
        torch.testing.assert_close(at_mean[0, 0], model.user_model.rated_embedding)
        torch.testing.assert_close(at_mean[0, 1] - at_mean[0, 0], 2.0 * model.user_model.rating_direction)
    assert not model.config.user_model.rating_input or build_model(model_config(user_model={"rating_input": False})).user_model.rating_direction is None


def test_a_users_mood_is_learned_from_the_ratings_of_the_history():
    """Each row's ratings are one mood (+1 or -1) that neither the items nor the user say: only the
    history's ratings can predict the next rating, read by the user model or by the rating task's
    recent level."""

    def mood_batch(generator: torch.Generator, size: int = 32, length: int = 6) -> dict[str, torch.Tensor]:
        items = torch.randint(1, NUM_WARM + 1, (size, length + 1), generator=generator)
        mood = torch.where(torch.rand(size, 1, generator=generator) < 0.5, 1.0, -1.0).expand(size, length + 1).clone()
        return {
            "input_items": items[:, :-1],
            "target_items": items[:, 1:],
            "input_ratings": mood[:, :-1],
            "target_ratings": mood[:, 1:],
            "target_likes": torch.full((size, length), -1),
            "user_idx": torch.randint(1, NUM_USERS + 1, (size,), generator=generator),
        }

    held_out = {}
    for reader in ("user model", "recent level", None):
        model = build_model(
            model_config(
                user_model={"rating_input": reader == "user model"},
                tasks={"retrieval": False, "like": False, "attributes": False, "rating_recency": reader == "recent level"},
            )
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(150):
            loss = model.calculate_loss(mood_batch(generator))["rating"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            held_out[reader] = model.eval().calculate_loss(mood_batch(torch.Generator().manual_seed(7), size=256))["rating"].item()
    assert held_out[None] > 0.8  # the mood's variance is 1
    # The recent level is shrunk towards 0 by its prior pseudo-ratings, which matters over six positions.
    assert held_out["user model"] < 0.2 and held_out["recent level"] < 0.4, held_out


def test_the_rating_tasks_recent_level_as_computed_by_hand():
    model = build_model(model_config()).eval()
    rating = model.tasks["rating"]
    with torch.no_grad():
        rating.item_bias.weight[3] = 0.5
        rating.item_bias.weight[7] = -0.25
        rating.decay_logit.fill_(0.0)  # decay 0.5 per step back
        rating.prior_logit.fill_(math.log(math.e - 1))  # softplus: 1 pseudo-rating
    nan = float("nan")
    items, ratings = torch.tensor([[0, 3, 5, 7]]), torch.tensor([[2.0, 1.25, nan, 1.0]])  # the padding's rating is ignored
    residual_3, residual_7 = 1.25 - 0.25 - 0.5, 1.0 - 0.25 + 0.25  # rating - mu - b_i
    expected = [0.0, residual_3 / (1 + 1), 0.5 * residual_3 / (0.5 + 1), (0.25 * residual_3 + residual_7) / (0.25 + 1 + 1)]
    with torch.no_grad():
        torch.testing.assert_close(rating.recent_level(items, ratings)[0], torch.tensor(expected))
        users = torch.tensor([2])
        query = model.user_queries(items, users, ratings)["rating"]
        assert query[0, -1].item() == pytest.approx(expected[-1])
        unrated = model.score_candidates(items, users, torch.tensor([[9]]))["rating"]
        rated = model.score_candidates(items, users, torch.tensor([[9]]), input_ratings=ratings)["rating"]
    torch.testing.assert_close(rated - unrated, torch.tensor([[expected[-1]]]), atol=1e-5, rtol=0)


def test_the_one_pass_for_serving_gives_the_encoders_queries_and_the_last_layers_attention():
    model = build_model(model_config()).eval()
    history, users = torch.tensor([[0, 0, 4, 9, 2], [3, 8, 1, 7, 6]]), torch.tensor([3, 0])
    last = model.user_model.encoder.layers[-1]
    assert last.norm_first  # the reference below normalises before attention
    captured = {}
    hook = last.register_forward_pre_hook(lambda module, args: captured.setdefault("hidden", args[0]))
    with torch.no_grad():
        model.sequence_states(history, users)  # the encoder's own forward
        hook.remove()
        queries, contributions = model.queries_and_contributions(history, users)
        expected_queries = model.user_queries(history, users)
        torch.testing.assert_close(queries, expected_queries)

        # Reference: softmax(q·k / sqrt(d_head)) of the last position over the real positions, averaged over heads.
        x = last.norm1(captured["hidden"])
        q, k, _ = F.linear(x, last.self_attn.in_proj_weight, last.self_attn.in_proj_bias).chunk(3, -1)
        batch, length, width = x.shape
        heads = last.self_attn.num_heads
        q, k = q.view(batch, length, heads, -1)[:, -1], k.view(batch, length, heads, -1)
        logits = torch.einsum("bhd,blhd->bhl", q, k) / (width // heads) ** 0.5
        expected = logits.masked_fill((history == 0).unsqueeze(1), float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(contributions, expected)
    assert contributions[0, :2].abs().max() == 0


@pytest.mark.parametrize("norm_first", [True, False])  # False: a user model initialised from a BERT backbone
def test_the_last_layer_for_the_last_position_alone_is_the_layers_own_output_there(norm_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, activation="gelu", batch_first=True, norm_first=norm_first).eval()
    hidden = torch.randn(3, 7, 16)
    blocked = torch.ones(7, 7, dtype=torch.bool).triu(1).repeat(3 * 2, 1, 1)
    blocked[0:2, :, :3] = True  # the first row's three oldest positions are padding
    blocked[0:2, :3, :3] |= ~torch.eye(3, dtype=torch.bool)
    with torch.no_grad():
        state, weights = _last_position(layer, hidden, blocked[:, -1:])
        expected = layer(hidden, src_mask=blocked)[:, -1]
        _, expected_weights = layer.self_attn(
            *(3 * [layer.norm1(hidden) if norm_first else hidden]), attn_mask=blocked, need_weights=True, average_attn_weights=True
        )
    torch.testing.assert_close(state, expected)
    torch.testing.assert_close(weights, expected_weights[:, -1])
    assert weights[0, :3].abs().max() == 0


def test_switched_off_tasks_are_not_built():
    model = build_model(model_config(tasks={"like": False, "attributes": False}, towers={"kind": "shared_bottom"}))
    assert model.task_names == ["retrieval", "rating"]
    assert set(model.towers.towers) == {"retrieval", "rating"}
    losses, shared = model.calculate_loss(training_batch(torch.Generator().manual_seed(1)), return_shared=True)
    assert set(losses) == {"retrieval", "rating"} and all(loss.ndim == 0 for loss in losses.values())
    assert shared.shape == (32, 6, 32)
    # GradNorm on the model's shared representation: weights sum to the task count, all parts get gradients.
    weighting = LossWeighting(LossWeightingConfig(method="gradnorm"), model.task_names)
    total, weights = weighting(losses, shared)
    total.backward()
    torch.testing.assert_close(sum(weights.values()), torch.tensor(2.0))
    assert weighting.weight_logits.grad.abs().sum() > 0 and model.user_model.position_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="every task"):
        build_model(model_config(tasks={"retrieval": False, "rating": False, "like": False, "attributes": False}))


# --- Learning -----------------------------------------------------------------------------------


def test_every_task_loss_falls_on_the_synthetic_problem(trained):
    model, history = trained
    first, last = history[0], history[-1]
    # Chance levels: uniform over 30 items; predicting the mean rating; the like and attribute base rates.
    chance = {"retrieval": math.log(NUM_WARM), "rating": 1.0 + 0.25**2, "like": 0.64, "attributes": 0.6}
    for task, level in chance.items():
        assert first[task] > 0.5 * level, task
        assert last[task] < 0.2 * level, (task, last[task])

    batch = training_batch(torch.Generator().manual_seed(99), size=64)
    with torch.no_grad():
        held_out = model.calculate_loss(batch)
        scores = model.full_sort_predict({"input_items": batch["input_items"], "user_idx": batch["user_idx"]})
    assert held_out["rating"] < 0.1 and held_out["like"] < 0.15
    has_history = batch["input_items"][:, -1] > 0
    expected = next_item(batch["input_items"][:, -1])
    assert (scores.argmax(1) == expected)[has_history].float().mean() > 0.95


def test_scores_agree_across_predict_full_sort_and_candidates(trained):
    model, _ = trained
    batch = training_batch(torch.Generator().manual_seed(5), size=8)
    inputs, users = batch["input_items"], batch["user_idx"]
    targets = torch.randint(1, NUM_ITEMS + 1, (8,))
    with torch.no_grad():
        full = model.full_sort_predict({"input_items": inputs, "user_idx": users})
        predicted = model.predict({"input_items": inputs, "user_idx": users, "target_items": targets})
        candidates = torch.stack([targets, torch.full_like(targets, 3), torch.zeros_like(targets)], dim=1)
        scored = model.score_candidates(inputs, users, candidates)
    assert full.shape == (8, NUM_ITEMS + 1)
    assert torch.isneginf(full[:, 0]).all() and full[:, 1:].isfinite().all()
    torch.testing.assert_close(full.gather(1, targets[:, None])[:, 0], predicted["retrieval"])
    torch.testing.assert_close(scored["retrieval"][:, 1], full[:, 3])
    assert torch.isneginf(scored["retrieval"][:, 2]).all()
    for task in ("retrieval", "rating", "like", "attributes"):
        torch.testing.assert_close(scored[task][:, 0], predicted[task])
    assert ((predicted["like"] >= 0) & (predicted["like"] <= 1)).all()

    # The rating is <u, i> / sqrt(d) + b_u + b_i + mu, on the rating tower's query.
    with torch.no_grad():
        query = model.user_queries(inputs, users)["rating"]
        query, level = query[:, :-1], query[:, -1]  # no ratings in the history: the recent level is 0
        assert level.abs().max() == 0
        rating = model.tasks["rating"]
        expected = (query * model.item_table()[targets]).sum(-1) / 32**0.5 + rating.user_bias.weight[users, 0] + rating.item_bias.weight[targets, 0] + 0.25
    torch.testing.assert_close(predicted["rating"], expected)


def test_cold_item_is_represented_by_its_text(trained):
    model, _ = trained
    tokens = torch.tensor([item_tokens(COLD_ITEM)])
    with torch.no_grad():
        table = model.item_table()
        from_text = model.encode_item_text(tokens, torch.ones_like(tokens))[0]
        batch = training_batch(torch.Generator().manual_seed(3), size=4)
        extra = model.score_candidates(batch["input_items"], batch["user_idx"], torch.tensor([[COLD_ITEM, NUM_ITEMS + 1]] * 4), from_text[None])
    # Its id never trained, so the cold item's vector is its text's.
    torch.testing.assert_close(table[COLD_ITEM], from_text)
    torch.testing.assert_close(extra["retrieval"][:, 0], extra["retrieval"][:, 1])
    # And that text vector is nearest to the trained item with the same text.
    similarity = F.cosine_similarity(from_text[None], table[1 : NUM_WARM + 1])
    assert similarity.argmax().item() + 1 == TWIN_OF_COLD
    assert similarity[TWIN_OF_COLD - 1] > 0.8


# --- Retrieval losses, by hand ------------------------------------------------------------------


def _retrieval_task(sampled: bool, is_cold: list[bool], negatives: int = 2, mask_history: bool = False) -> RetrievalTask:
    config = TaskConfig(temperature=1.0, num_sampled_negatives=negatives, mask_history=mask_history)
    setup = TaskSetup(
        config=config,
        hidden_size=2,
        num_users=1,
        num_items=3,
        rating_mean=0.0,
        item_attributes=torch.zeros(4, 2),
        is_cold=torch.tensor(is_cold),
        sampled_retrieval=sampled,
    )
    return RetrievalTask(setup)


ITEM_VECTORS = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # items 0..3; cosines with q: -1, 1, 0


def test_full_softmax_skips_cold_items():
    task = _retrieval_task(sampled=False, is_cold=[False, False, False, True])
    batch = {"target_items": torch.tensor([[0, 2]])}
    loss = task.loss(torch.tensor([[[5.0, 0.0], [1.0, 0.0]]]), batch, StepItems(ITEM_VECTORS, None, None))
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-2))))  # softmax over items 1, 2


def test_sampled_softmax_with_logq_correction():
    task = _retrieval_task(sampled=True, is_cold=[False] * 4)
    batch = {"target_items": torch.tensor([[2]])}
    items = StepItems(ITEM_VECTORS[[2, 3]], torch.tensor([2, 3]), negatives=torch.tensor([3, 3]))
    loss = task.loss(torch.tensor([[[1.0, 0.0]]]), batch, items)
    # Candidates 2 (the target, once in the batch) and 3; expected counts 1 + 2/3 and 0 + 2/3.
    logit_target, logit_negative = 1 - math.log(5 / 3), 0 - math.log(2 / 3)
    expected = -logit_target + math.log(math.exp(logit_target) + math.exp(logit_negative))
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert task.sample_negatives().shape == (2,)
    assert _retrieval_task(sampled=True, is_cold=[False, True, True, False], negatives=50).sample_negatives().unique().tolist() == [3]


def test_full_softmax_leaves_out_the_history_but_not_a_repeated_target():
    task = _retrieval_task(sampled=False, is_cold=[False] * 4, mask_history=True)
    # Position 0 (input 1 → target 3): item 1 is left out. Position 1 (inputs 1, 3 → target 1, a
    # repeat): item 3 is left out, the target 1 stays. Cosines with q = (1, 0): item 1 -1, 2 1, 3 0.
    batch = {"input_items": torch.tensor([[1, 3]]), "target_items": torch.tensor([[3, 1]])}
    query = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    loss = task.loss(query, batch, StepItems(ITEM_VECTORS, None, None))
    first = -0 + math.log(math.exp(1) + math.exp(0))  # softmax over items 2, 3
    second = 1 + math.log(math.exp(-1) + math.exp(1))  # softmax over items 1, 2
    torch.testing.assert_close(loss, torch.tensor((first + second) / 2))
    unmasked = _retrieval_task(sampled=False, is_cold=[False] * 4).loss(query, batch, StepItems(ITEM_VECTORS, None, None))
    assert unmasked > loss


def test_seen_before_matches_a_loop_over_positions():
    generator = torch.Generator().manual_seed(0)
    input_items = torch.randint(0, 6, (3, 7), generator=generator)
    target_items = torch.randint(0, 6, (3, 7), generator=generator)
    valid = target_items > 0
    seen = RetrievalTask.seen_before(input_items, valid, target_items[valid], torch.arange(6))
    expected = []
    for row, position in valid.nonzero().tolist():
        history = set(input_items[row, : position + 1].tolist()) - {0, int(target_items[row, position])}
        expected.append([item in history for item in range(6)])
    assert seen.tolist() == expected


def test_sampled_softmax_leaves_out_the_history_among_its_candidates():
    task = _retrieval_task(sampled=True, is_cold=[False] * 4, mask_history=True)
    batch = {"input_items": torch.tensor([[3]]), "target_items": torch.tensor([[2]])}
    items = StepItems(ITEM_VECTORS[[1, 2, 3]], torch.tensor([1, 2, 3]), negatives=torch.tensor([1, 3]))
    loss = task.loss(torch.tensor([[[1.0, 0.0]]]), batch, items)
    # Candidates 1, 2 (the target) and 3 (seen: left out); expected counts 0 + 2/3 and 1 + 2/3 of items 1 and 2.
    logit_target, logit_negative = 1 - math.log(5 / 3), -1 - math.log(2 / 3)
    expected = -logit_target + math.log(math.exp(logit_target) + math.exp(logit_negative))
    torch.testing.assert_close(loss, torch.tensor(expected))


# --- Loss weighting -----------------------------------------------------------------------------


def test_static_weighting():
    weighting = LossWeighting(LossWeightingConfig(method="static", static_weights={"a": 2.0, "b": 0.5}), ["a", "b"])
    total, weights = weighting({"a": torch.tensor(3.0), "b": torch.tensor(4.0)})
    assert total.item() == 8.0 and weights["a"].item() == 2.0
    with pytest.raises(InputError, match="static_weights.*c"):
        LossWeighting(LossWeightingConfig(method="static", static_weights={"a": 1.0}), ["a", "c"])


def test_uncertainty_weights_go_to_inverse_losses():
    weighting = LossWeighting(LossWeightingConfig(method="uncertainty"), ["big", "small"])
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        total, weights = weighting({"big": torch.tensor(4.0), "small": torch.tensor(0.25)})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    # exp(-s) L + s is smallest at exp(-s) = 1 / L.
    torch.testing.assert_close(weights["big"], torch.tensor(0.25), rtol=0.02, atol=0)
    torch.testing.assert_close(weights["small"], torch.tensor(4.0), rtol=0.02, atol=0)


def test_gradnorm_weights_balance_gradients_and_sum_to_task_count():
    weighting = LossWeighting(LossWeightingConfig(method="gradnorm", gradnorm_alpha=1.5), ["steep", "flat"])
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    shared = torch.randn(4, 3, requires_grad=True)
    for step in range(100):
        losses = {"steep": (3 * shared).pow(2).mean(), "flat": 0.1 * shared.pow(2).mean()}
        total, weights = weighting(losses, shared)
        optimizer.zero_grad()
        shared.grad = None
        total.backward()
        if step == 0:
            # The GradNorm term moves the weights only: the representation gets sum_t w_t dL_t/dshared.
            torch.testing.assert_close(shared.grad, (weights["steep"] * 18 + weights["flat"] * 0.2) * shared / 12)
        optimizer.step()
        torch.testing.assert_close(weights["steep"] + weights["flat"], torch.tensor(2.0))
    # Gradient norms 90:1 at equal weights, both losses at their initial value: the steep task's
    # weight falls until the weighted norms match (w_flat / w_steep -> 90).
    assert weights["steep"] < 0.05 < 1.9 < weights["flat"]


# --- Backbone modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("backbone_config, mode", [(TINY_LLAMA, "lora"), (TINY_QWEN2, "full")])
def test_decoder_backbone_trains_its_own_parameters(backbone_config, mode):
    config = model_config(
        backbone={"random_init_config": backbone_config, "mode": mode, "pooling": "last", "lora_r": 4, "gradient_checkpointing": True},
        tasks={"num_sampled_negatives": 8},
    )
    model = build_model(config)
    assert model.tasks["retrieval"].num_negatives == 8  # the catalogue is not encoded per step
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    history = train(model, steps=50, lr=5e-3)
    changed = {name for name, value in model.named_parameters() if not torch.equal(value, before[name])}
    backbone = {name for name in before if name.startswith("item_encoder.backbone.")}
    if mode == "lora":
        assert changed & backbone and all("lora_" in name for name in changed & backbone)
        trainable = {name for name, value in model.named_parameters() if value.requires_grad}
        assert {name for name in backbone if "lora_" not in name}.isdisjoint(trainable)
    else:
        assert any("layers.0.mlp" in name for name in changed & backbone)
    assert "item_encoder.projection.weight" in changed and "user_model.position_embedding.weight" in changed
    early = sum(step["retrieval"] for step in history[:5]) / 5
    late = sum(step["retrieval"] for step in history[-5:]) / 5
    assert late < 0.5 * early


def test_frozen_backbone_is_cached_and_untouched():
    model = build_model(model_config())
    backbone = {name: value.clone() for name, value in model.item_encoder.backbone.named_parameters()}
    train(model, steps=3)
    assert all(torch.equal(value, backbone[name]) for name, value in model.item_encoder.backbone.named_parameters())
    encoder = model.item_encoder
    with torch.no_grad():
        direct = encoder.pooled_text(encoder.input_ids, encoder.attention_mask)
    torch.testing.assert_close(encoder.text_embeddings, direct)
    assert encoder.text_embeddings[COLD_ITEM].equal(encoder.text_embeddings[TWIN_OF_COLD])


def test_user_model_copies_bert_layers():
    bert = {**TINY_BERT, "num_hidden_layers": 2, "num_attention_heads": 4}
    model = build_model(model_config(backbone={"random_init_config": bert}, user_model={"init_from_backbone": True}))
    model.eval()
    source = model.item_encoder.backbone.encoder.layer
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        for source_layer, target_layer in zip(source, model.user_model.encoder.layers):
            expected = source_layer(hidden)
            expected = expected[0] if isinstance(expected, tuple) else expected
            torch.testing.assert_close(target_layer(hidden), expected)
    with pytest.raises(InputError, match="hidden_size"):
        build_model(model_config(backbone={"random_init_config": bert}, user_model={"init_from_backbone": True, "hidden_size": 16}))
    with pytest.raises(InputError, match="BERT-style"):
        build_model(model_config(backbone={"random_init_config": TINY_LLAMA}, user_model={"init_from_backbone": True}))
