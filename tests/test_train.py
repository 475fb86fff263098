"""Ray Train + DeepSpeed training on CPU workers: a 2-worker run, resume from a checkpoint, recovery from a worker
crash, the exported artifact, and the sparse per-item and per-user tables."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from common.errors import InputError
from common.storage import read_table, resolve
from data import schema
from tests.tiny import tiny_config
from train.artifact import load_artifact
from train.config import LossWeightingConfig, TrainConfig
from train.evaluate import evaluate
from train.trainer import (
    CONSOLIDATED_WEIGHTS,
    DEEPSPEED_DIR,
    TRAINER_STATE,
    TableOptimizer,
    _training_rating_mean,
    build_model,
    load_training_inputs,
    make_tables_sparse,
    read_train_sequences,
    run_training,
    training_batch,
    warm_start,
)
from train.transfer import rows_by_id
from train.weighting import LossWeighting
from train.windows import training_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(trained_run, ray_local) -> str:
    """The tiny slice the session's `polyrec train` ran on (the same ``tiny_preprocess_config``): only read here."""
    return trained_run.data


def _weights(result) -> dict[str, torch.Tensor]:
    """The weights after the last epoch (the artifact holds the best epoch's, which may be an earlier one)."""
    return load_file(os.path.join(result.latest_checkpoint, CONSOLIDATED_WEIGHTS))


def sampled_config(data_dir: str, output, **overrides) -> TrainConfig:
    """``tiny_config`` with the sampled retrieval loss, under which the per-item and per-user tables train with sparse
    gradients and their own row-wise optimizer (``optimizer.sparse_tables: auto``)."""
    config = tiny_config(data_dir, output, **overrides)
    config.model.tasks.retrieval_loss = "sampled"
    return config


def test_two_worker_training_learns_and_exports(data_dir, tmp_path):
    """Two workers under ZeRO-0 with the sampled softmax, so the tables train sparse and DeepSpeed averages their
    sparse gradients (by all-gather); every task's tables get one each step, so no rank stands in a dense zero for a
    missing one. ZeRO-1 to 3 on two workers: tests/test_large_model_paths.py."""
    config = sampled_config(data_dir, tmp_path / "run", scaling__num_workers=2, scaling__cpus_per_worker=0.5, epochs=3)
    result = run_training(config)

    history = result.history
    assert [record["epoch"] for record in history] == [1, 2, 3]
    # Every task is trained and logged separately; with ~40 users per epoch only retrieval (the task with
    # the most signal) is sure to improve monotonically enough to check here (tests/test_model.py checks each
    # task's learning on a learnable problem).
    for task in ("retrieval", "rating", "like", "attributes"):
        losses = [record[f"train/loss_{task}"] for record in history]
        assert all(np.isfinite(losses)) and all(loss > 0 for loss in losses), (task, losses)
        assert all(f"train/weight_{task}" in record for record in history)
    retrieval = [record["train/loss_retrieval"] for record in history]
    assert retrieval[-1] < retrieval[0], retrieval
    # The exported model is the best checkpoint by validation NDCG@10.
    best = max(record["validation/NDCG@10"] for record in history)
    assert result.best_validation["validation/NDCG@10"] == pytest.approx(best)

    # The artifact reproduces the validation metrics of its checkpoint with plain torch.
    artifact = load_artifact(result.artifact)
    validation = read_table(resolve(data_dir), f"{schema.SEQUENCES_DIR}/validation")
    with torch.no_grad():
        again = evaluate(artifact.model, validation, ks=[10, 20], num_items=artifact.model.num_items, max_history=20, batch_size=64)
    assert again["NDCG@10"] == pytest.approx(best, abs=1e-6)
    assert os.path.exists(os.path.join(config.output, "training_curves.png"))
    assert os.path.exists(os.path.join(config.output, "metrics.json"))
    assert set(result.test_metrics) >= {"polyrec", "popularity"}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Three epochs on one worker, never interrupted: the reference for the resume and recovery tests, which so
    restore DeepSpeed's optimizer and the sparse tables' one. The id-only ablation is trained after it, which leaves
    its weights alone."""
    return run_training(sampled_config(data_dir, tmp_path_factory.mktemp("straight"), epochs=3, ablations=["id_only"]))


def test_the_tables_train_beside_deepspeeds_optimizer_and_their_state_is_checkpointed(uninterrupted):
    states = torch.load(Path(uninterrupted.latest_checkpoint, DEEPSPEED_DIR, "state", "mp_rank_00_model_states.pt"), weights_only=False)
    tables = states["table_optimizer"]
    steps = sum(record["steps"] for record in uninterrupted.history)
    # id embedding, user embedding, the rating task's user and item biases, the like task's item biases: each stepped
    # once per training step, and left out of DeepSpeed's optimizer
    assert [int(entry["step"]) for entry in tables["state"].values()] == [steps] * 5
    assert states["table_schedule"]["last_epoch"] == steps
    model = load_artifact(uninterrupted.artifact).model
    trained = sum(1 for param in model.parameters() if param.requires_grad)
    assert sum(len(group["params"]) for group in states["optimizer"]["param_groups"]) == trained - 5


def test_sparse_tables_update_only_the_rows_a_step_touched(data_dir):
    """Row-wise Adam: a user's rows stay as they are through a step without that user, where a dense Adam would move
    them on its momentum."""
    config = sampled_config(data_dir, "unused")
    model = build_model(config, load_training_inputs(data_dir, read_train_sequences(resolve(data_dir))))
    tables = make_tables_sparse(model, config)
    names = {id(module): name for name, module in model.named_modules()}
    assert sorted(names[id(table)] for table in tables) == [
        "item_encoder.id_embedding",
        "tasks.like.item_bias",
        "tasks.rating.item_bias",
        "tasks.rating.user_bias",
        "user_model.user_embedding",
    ]
    optimizer = TableOptimizer(tables, config, num_train_windows=100)
    weighting = LossWeighting(config.model.loss_weighting, model.task_names)
    model.train()

    def step(users: list[int]) -> dict[str, torch.Tensor]:
        items = torch.arange(1, 7).repeat(len(users), 1)
        batch = {
            "input_items": items[:, :-1],
            "target_items": items[:, 1:],
            "target_ratings": torch.full((len(users), 5), 4.0),
            "target_likes": torch.ones(len(users), 5, dtype=torch.long),
            "user_idx": torch.tensor(users),
        }
        total, _ = weighting(model.calculate_loss(batch), None)
        optimizer.optimizer.zero_grad()
        total.backward()
        assert all(table.weight.grad.is_sparse for table in tables)
        optimizer.step()
        return {name: model.get_submodule(name).weight.detach().clone() for name in ("user_model.user_embedding", "tasks.rating.user_bias")}

    before = step([4])  # the warm-up's first step has a learning rate of 0
    first = step([1, 2])
    second = step([3])
    for name in first:
        assert not torch.equal(first[name][[1, 2]], before[name][[1, 2]]), name
        assert torch.equal(second[name][[1, 2]], first[name][[1, 2]]), name  # untouched by the second step
        assert not torch.equal(second[name][3], first[name][3]), name
        assert torch.equal(second[name][5:], before[name][5:]), name


def test_sparse_tables_are_chosen_where_they_pay_and_deepspeed_can_reduce_them(data_dir):
    inputs = load_training_inputs(data_dir, read_train_sequences(resolve(data_dir)))
    for overrides, sampled, expected in (
        ({}, True, 5),  # sampled softmax, ZeRO-0, fp32 on CPU
        ({}, False, 0),  # a full softmax touches every item row each step
        ({"deepspeed__zero_stage": 2}, True, 0),  # DeepSpeed's ZeRO optimizers flatten every gradient
        ({"optimizer__sparse_tables": False}, True, 0),
        ({"optimizer__sparse_tables": True}, False, 5),
    ):
        config = sampled_config(data_dir, "unused", **overrides) if sampled else tiny_config(data_dir, "unused", **overrides)
        assert len(make_tables_sparse(build_model(config, inputs), config)) == expected, overrides
    with pytest.raises(ValueError, match="optimizer.sparse_tables: true needs deepspeed.zero_stage 0 and fp32 precision \\(here stage 2, fp32\\)"):
        TrainConfig.model_validate({"optimizer": {"sparse_tables": True}, "deepspeed": {"zero_stage": 2}})


def test_id_only_ablation_is_trained_without_text_and_evaluated_beside_the_model(data_dir, uninterrupted):
    assert set(uninterrupted.test_metrics) == {"polyrec", "polyrec id-only", "popularity"}
    ablation = load_artifact(Path(uninterrupted.artifact).parent / "ablations" / "id_only" / "artifact")
    assert not ablation.config.item_encoder.use_text and ablation.model.item_encoder.backbone is None
    assert ablation.config.item_encoder.id_dropout == 0.0
    test = read_table(resolve(data_dir), f"{schema.SEQUENCES_DIR}/test")
    with torch.no_grad():
        again = evaluate(ablation.model, test, ks=[10, 20], num_items=ablation.model.num_items, max_history=20, batch_size=64)
    for metric in ("HR@10", "NDCG@10", "MRR@20"):
        assert uninterrupted.test_metrics["polyrec id-only"][metric] == pytest.approx(again[metric], abs=1e-6)
    report = json.loads((Path(uninterrupted.artifact).parent / "metrics.json").read_text())
    assert set(report) == set(uninterrupted.test_metrics)


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        # A restarted worker may sum in another order (thread scheduling), hence a float tolerance.
        difference = (actual[name].double() - expected[name].double()).abs().max().item() if expected[name].numel() else 0.0
        assert difference < 1e-4, f"{name} differs by {difference}"


def test_resume_from_checkpoint_matches_uninterrupted_run_and_selects_anew_on_other_validation_rows(data_dir, tmp_path, uninterrupted):
    after_two_epochs = tmp_path / "after-two-epochs"
    shutil.copytree(next(checkpoint for checkpoint, metrics in uninterrupted.checkpoints if metrics["epoch"] == 2), after_two_epochs)
    saved = json.loads((after_two_epochs / TRAINER_STATE).read_text())
    # A best no epoch can beat, scored on all the validation rows: resuming on a sample of them must not compare with it.
    (after_two_epochs / TRAINER_STATE).write_text(json.dumps(saved | {"best": 1.0}))
    sample_rows = saved["validation_rows"] // 2
    resumed = run_training(sampled_config(data_dir, tmp_path / "resumed", epochs=3, resume_from=str(after_two_epochs), validation_sample_rows=sample_rows))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == uninterrupted.history[:2]  # carried over from the checkpoint, not re-run
    _assert_same_weights(_weights(resumed), _weights(uninterrupted))  # validation never touches the weights
    state = json.loads(Path(resumed.latest_checkpoint, TRAINER_STATE).read_text())
    assert (state["best_epoch"], state["best"], state["validation_rows"]) == (3, resumed.history[2]["validation/NDCG@10"], sample_rows)


def test_warm_start_carries_table_rows_over_by_id(data_dir, tmp_path, uninterrupted):
    # The same data with its items renumbered (reversed) and one id replaced by one the served model never saw.
    renumbered = tmp_path / "data"
    shutil.copytree(data_dir, renumbered)
    vocab = pq.read_table(renumbered / schema.ITEM_VOCAB_PATH)
    old_idx = vocab["item_idx"].to_numpy()
    new_idx = len(old_idx) + 1 - old_idx
    ids = vocab["item_id"].to_pylist()
    ids[0] = "never-served"
    pq.write_table(
        vocab.set_column(vocab.schema.get_field_index("item_id"), "item_id", pa.array(ids)).set_column(
            vocab.schema.get_field_index("item_idx"), "item_idx", pa.array(new_idx, vocab["item_idx"].type)
        ),
        renumbered / schema.ITEM_VOCAB_PATH,
    )
    rows = rows_by_id(uninterrupted.artifact, resolve(str(renumbered)))
    expected = np.full(len(old_idx) + 1, -1)
    expected[0], expected[new_idx[1:]] = 0, old_idx[1:]
    assert rows["item"].tolist() == expected.tolist()
    assert rows["user"].tolist() == list(range(len(rows["user"])))  # users unchanged

    inputs = load_training_inputs(data_dir, read_train_sequences(resolve(data_dir)))
    model = build_model(tiny_config(data_dir, tmp_path / "unused"), inputs)
    buffers_before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    warm_start(model, uninterrupted.artifact, rows, announce=False)
    served = load_artifact(uninterrupted.artifact).model.state_dict()
    carried = model.state_dict()
    item_rows = torch.from_numpy(rows["item"])
    known = item_rows >= 0
    for name in ("item_encoder.id_embedding.weight", "tasks.rating.item_bias.weight", "tasks.like.item_bias.weight"):
        torch.testing.assert_close(carried[name][known], served[name][item_rows[known]])
    assert carried["item_encoder.id_embedding.weight"][new_idx[0]].abs().sum() == 0  # the new id keeps its zero start
    for name in ("user_model.user_embedding.weight", "tasks.rating.user_bias.weight", "user_model.position_embedding.weight"):
        torch.testing.assert_close(carried[name], served[name])
    for name, buffer in model.named_buffers():  # this data's catalogue, not the served model's
        assert torch.equal(buffer, buffers_before[name]), name


def test_a_missing_start_point_is_refused_before_training(data_dir, tmp_path):
    for field in ("warm_start_from", "resume_from"):
        with pytest.raises(InputError, match=f"train.{field}: nowhere/artifact is not a folder"):
            run_training(tiny_config(data_dir, tmp_path / field, **{field: "nowhere/artifact"}))
        assert not (tmp_path / field).exists()


def test_worker_crash_recovers_from_latest_checkpoint(data_dir, tmp_path, monkeypatch, uninterrupted):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("POLYREC_FAIL_AFTER_EPOCH", "2")
    monkeypatch.setenv("POLYREC_FAIL_AFTER_EPOCH_MARKER", str(marker))
    crashed = run_training(sampled_config(data_dir, tmp_path / "crash", epochs=3, max_failures=1))
    assert marker.exists(), "the fault was not injected"
    assert [r["epoch"] for r in crashed.history] == [1, 2, 3]
    _assert_same_weights(_weights(crashed), _weights(uninterrupted))


def _train_rows(rows: list[tuple[int, list[int], list[int]]]) -> pa.Table:
    """TRAIN_SEQUENCE rows from (user, history, items); an item's rating is its index / 10, its like its parity."""
    return pa.Table.from_pylist(
        [
            {
                "user_idx": user,
                "items": items,
                "ratings": [i / 10 for i in items],
                "likes": [i % 2 for i in items],
                "timestamps": list(range(len(items))),
                "history": history,
                "history_ratings": [i / 10 for i in history],
            }
            for user, history, items in rows
        ],
        schema=schema.TRAIN_SEQUENCE,
    )


def test_training_windows_give_every_target_context_and_train_it_once():
    # max_history 3, 2 targets per window. User 1's row follows a row that ended with items 1, 2, 3: the window
    # [4, 5, 6, 7] trains 6 and 7 (5, whose input 4 has only 3 items before it here, is left as context), then
    # [2, 3, 4, 5] trains 4 and 5. User 2's row has no history: 1 starts it and is nobody's target.
    windows = training_windows(_train_rows([(1, [1, 2, 3], [4, 5, 6, 7]), (2, [], [1, 2, 3])]), max_history=3, window_targets=2)
    columns = windows.to_pydict()
    assert {name: columns[name] for name in ("user_idx", "items", "likes", "context")} == {
        "user_idx": [1, 1, 2],
        "items": [[4, 5, 6, 7], [2, 3, 4, 5], [1, 2, 3]],
        "likes": [[0, 1, 0, 1], [-1, -1, 0, 1], [1, 0, 1]],
        "context": [1, 1, 0],
    }
    assert [[round(r * 10) for r in ratings] for ratings in columns["ratings"]] == columns["items"]
    batch = training_batch(columns, max_history=3)
    assert batch["input_items"].tolist() == [[4, 5, 6], [2, 3, 4], [0, 1, 2]]
    assert batch["target_items"].tolist() == [[0, 6, 7], [0, 4, 5], [0, 2, 3]]
    assert batch["target_likes"].tolist() == [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]]
    assert torch.isnan(batch["target_ratings"][:, 0]).all()
    assert torch.allclose(batch["target_ratings"][:, 1:], torch.tensor([[0.6, 0.7], [0.4, 0.5], [0.2, 0.3]]))
    assert batch["input_ratings"][1].tolist() == pytest.approx([0.2, 0.3, 0.4])  # the history's ratings are inputs


def test_training_windows_cover_random_rows_exactly():
    generator = np.random.default_rng(7)
    for _ in range(200):
        max_history = int(generator.integers(1, 8))
        window_targets = int(generator.integers(1, 10))
        history = generator.integers(1, 100, int(generator.integers(0, max_history + 1))).tolist()
        items = generator.integers(100, 200, int(generator.integers(1, max_history + 2))).tolist()
        sequence, first = history + items, max(len(history), 1)
        windows = training_windows(_train_rows([(1, history, items)]), max_history, window_targets).to_pylist()
        trained = []  # (position in sequence of the target, items before it in its window)
        for window in windows:
            assert 2 <= len(window["items"]) <= max_history + 1
            begin = next(b for b in range(len(sequence)) if sequence[b : b + len(window["items"])] == window["items"])
            trained += [(begin + t, t) for t in range(window["context"] + 1, len(window["items"]))]
        assert sorted(position for position, _ in trained) == list(range(first, len(sequence)))  # each target once
        for position, before in trained:
            assert before >= min(position, max_history - min(window_targets, max_history) + 1)


def test_learning_rate_warms_up_then_decays_to_the_floor_at_the_last_configured_epoch():
    from train.trainer import _learning_rate_schedule

    config = TrainConfig(epochs=3, batch_size=16)
    config.scaling.num_workers = 2
    config.optimizer.warmup_steps, config.optimizer.min_lr_ratio = 2, 0.1
    # 40 windows on 2 workers in batches of 16: 2 steps per epoch, 6 in all.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = _learning_rate_schedule(config, num_train_windows=40)(optimizer)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert rates[3] > rates[4] > rates[5] > rates[6] == pytest.approx(0.1)
    assert rates[4] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: the cosine's midpoint


def test_a_second_run_into_the_same_output_starts_afresh(data_dir, tmp_path, uninterrupted):
    """A finished run's artifact is refused before any training; once it is moved away, a new run into the same
    output (here with another loss weighting, whose state would not even load into the old checkpoints) starts
    at epoch 1 instead of Ray Train restoring the earlier run from its folder. The finished run is a copy of the
    uninterrupted run's output folder (its artifact, checkpoints and Ray Train state), which spares a training."""
    first = uninterrupted
    shutil.copytree(Path(first.artifact).parent, tmp_path, dirs_exist_ok=True)
    first_run_folders = {folder.name for folder in (tmp_path / "ray_results").iterdir()}
    assert Path(first.latest_checkpoint).parent.name in first_run_folders
    uncertainty = tiny_config(data_dir, tmp_path, epochs=1, model__loss_weighting=LossWeightingConfig(method="uncertainty"))
    with pytest.raises(InputError, match=f"{tmp_path / 'artifact'}: an artifact is already there"):
        run_training(uncertainty)
    shutil.move(tmp_path / "artifact", tmp_path.parent / f"{tmp_path.name}-first-artifact")
    second = run_training(uncertainty)
    assert [record["epoch"] for record in first.history] == [1, 2, 3]
    assert [record["epoch"] for record in second.history] == [1]
    assert Path(second.latest_checkpoint).parent.parent == tmp_path / "ray_results"
    assert Path(second.latest_checkpoint).parent.name not in first_run_folders
    # Each run trained with its own config: static weights stay as configured, uncertainty weights move.
    assert first.history[-1]["train/weight_rating"] == pytest.approx(0.5)
    assert second.history[-1]["train/weight_rating"] != pytest.approx(0.5)


def test_the_rating_mean_counts_the_rated_training_interactions_only():
    rated = pa.table({"ratings": pa.array([[1.0, float("nan")], [3.0], []], pa.list_(pa.float32()))})
    assert _training_rating_mean(rated) == pytest.approx(2.0)
    assert _training_rating_mean(pa.table({"ratings": pa.array([[float("nan")]], pa.list_(pa.float32()))})) == 0.0
