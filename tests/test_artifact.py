"""The serving artifact: save → load gives the same model, and only safetensors/JSON/Parquet load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from common.errors import InputError
from train.artifact import load_artifact, save_artifact
from train.backbone import default_backbone_path, pool
from train.config import ModelConfig
from train.model import CatalogFeatures, PolyrecModel

NUM_ITEMS, NUM_USERS, NUM_ATTRIBUTES = 12, 5, 3
TITLES = ["Alien", "Heat", "Fargo", "Brazil", "Clue", "Big", "Jaws", "Rocky", "Tron", "Speed", "Ran", "Up"]
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)


def tables(token_ids: list[list[int]]) -> tuple[pa.Table, pa.Table]:
    items = pa.table(
        {
            "item_idx": pa.array(range(1, NUM_ITEMS + 1), pa.int32()),
            "item_id": [f"m{i}" for i in range(1, NUM_ITEMS + 1)],
            "title": TITLES,
            "text": [f"{title}. A film." for title in TITLES],
            "input_ids": pa.array(token_ids, pa.list_(pa.int32())),
            "attributes": pa.array([[i % NUM_ATTRIBUTES + 1] for i in range(NUM_ITEMS)], pa.list_(pa.int32())),
            "is_cold": [i == NUM_ITEMS for i in range(1, NUM_ITEMS + 1)],
            "year": pa.array([1990] * NUM_ITEMS, pa.int32()),
        }
    )
    users = pa.table(
        {
            "user_id": [f"u{i}" for i in range(1, NUM_USERS + 1)],
            "user_idx": pa.array(range(1, NUM_USERS + 1), pa.int32()),
            "rating_offset": pa.array([0.0] * NUM_USERS, pa.float32()),
        }
    )
    return items, users


def trained_model(config: ModelConfig, items: pa.Table, pad_token_id: int) -> PolyrecModel:
    torch.manual_seed(0)
    catalog = CatalogFeatures.from_items_table(items, max_tokens=16, pad_token_id=pad_token_id, num_attributes=NUM_ATTRIBUTES)
    model = PolyrecModel(config, NUM_USERS, NUM_ITEMS, NUM_ATTRIBUTES, catalog, rating_mean=0.1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 0, 8, 9]])
    batch = {
        "input_items": inputs,
        "target_items": inputs % (NUM_ITEMS - 1) + 1,
        "user_idx": torch.tensor([1, 2, 3]),
        "target_ratings": torch.randn(3, 4),
        "target_likes": torch.randint(0, 2, (3, 4)),
    }
    for _ in range(5):
        optimizer.zero_grad()
        sum(model.calculate_loss(batch).values()).backward()
        optimizer.step()
    return model.eval()


def all_scores(model: PolyrecModel) -> dict[str, torch.Tensor]:
    history, users = torch.tensor([[0, 3, 7, 1], [2, 5, 9, 11]]), torch.tensor([1, 4])
    with torch.no_grad():
        scores = {
            "full_sort": model.full_sort_predict({"input_items": history, "user_idx": users}),
            "contributions": model.attention_contributions(history, users),
            "table": model.refresh_item_cache(),
        }
        candidates = model.score_candidates(history, users, torch.tensor([[1, 12, 4], [6, 0, 2]]))
        predicted = model.predict({"input_items": history, "user_idx": users, "target_items": torch.tensor([5, 8])})
    return {**scores, **{f"candidates/{k}": v for k, v in candidates.items()}, **{f"predict/{k}": v for k, v in predicted.items()}}


def save(model: PolyrecModel, items: pa.Table, users: pa.Table, out_dir: Path) -> Path:
    return save_artifact(
        model,
        out_dir,
        items=items,
        users=users,
        model_version="v7",
        data_manifest_hash="abc123",
        metrics={"test": {"recall@10": 0.5}},
        rating={"kind": "minmax", "shift": 3.0, "scale": 1.0},
    )


@pytest.fixture(scope="module")
def frozen_artifact(tmp_path_factory, tokenizer):
    token_ids = [tokenizer(f"{title}. A film.")["input_ids"] for title in TITLES]
    items, users = tables(token_ids)
    config = ModelConfig.model_validate({"user_model": {"hidden_size": 32, "num_layers": 1}, "towers": {"expert_hidden": 16}})
    model = trained_model(config, items, tokenizer.pad_token_id)
    expected = all_scores(model)
    path = save(model, items, users, tmp_path_factory.mktemp("artifacts") / "frozen")
    return path, expected, items


def test_frozen_artifact_round_trip(frozen_artifact, tokenizer):
    path, expected, items = frozen_artifact
    loaded = load_artifact(path)
    assert not loaded.model.training
    for name, value in all_scores(loaded.model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)

    # New item text goes through the artifact's own tokenizer and backbone.
    text = "Alien. A film."
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    encoded = loaded.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_item_text(encoded["input_ids"], encoded["attention_mask"])[0],
            loaded.model.item_encoder.projection(loaded.model.item_encoder.text_embeddings[1]),
        )

    metadata = json.loads((path / "artifact.json").read_text())
    assert metadata["format_version"] == 1 and metadata["model_version"] == loaded.model_version == "v7"
    assert (metadata["num_users"], metadata["num_items"], metadata["num_attributes"]) == (NUM_USERS, NUM_ITEMS, NUM_ATTRIBUTES)
    assert metadata["rating_mean"] == pytest.approx(0.1) and metadata["rating"] == {"kind": "minmax", "shift": 3.0, "scale": 1.0}
    assert metadata["data_manifest_hash"] == "abc123" and metadata["metrics"] == {"test": {"recall@10": 0.5}}
    assert ModelConfig.model_validate(metadata["model_config"]) == loaded.config
    assert loaded.items.column_names == ["item_idx", "item_id", "title", "text", "attributes", "year", "genres"]
    assert loaded.items.column("year").to_pylist() == [1990] * NUM_ITEMS  # given: kept
    assert loaded.items.column("genres").null_count == NUM_ITEMS  # not given: nulls of the declared type
    assert loaded.items.column("title").to_pylist() == TITLES
    assert loaded.users.column("user_id").to_pylist() == [f"u{i}" for i in range(1, NUM_USERS + 1)]
    torch.testing.assert_close(loaded.item_vectors, expected["table"])


def test_frozen_artifact_keeps_the_backbone_beside_the_state(frozen_artifact):
    path, _, _ = frozen_artifact
    with safe_open(path / "model.safetensors", "pt") as state:
        names = set(state.keys())
    assert "item_encoder.text_embeddings" in names
    assert not any(name.startswith("item_encoder.backbone.") for name in names)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in (path / "backbone").iterdir()}


def test_lora_artifact_round_trip_and_merged_backbone(tmp_path):
    items, users = tables([[1, 20 + i, 40 + i % 3, 60 + i] for i in range(1, NUM_ITEMS + 1)])
    config = ModelConfig.model_validate(
        {
            "backbone": {"random_init_config": TINY_LLAMA, "mode": "lora", "pooling": "last", "lora_r": 4},
            "user_model": {"hidden_size": 32, "num_layers": 1},
            "towers": {"expert_hidden": 16},
            "tasks": {"num_sampled_negatives": 4},
        }
    )
    model = trained_model(config, items, pad_token_id=0)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    expected = all_scores(model)
    path = save(model, items, users, tmp_path / "lora")

    loaded = load_artifact(path)
    for name, value in all_scores(loaded.model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5, msg=name)
    assert loaded.tokenizer is None

    # backbone/ alone (plain AutoModel, adapters merged) encodes text as the trained model does.
    plain = AutoModel.from_pretrained(path / "backbone", local_files_only=True).eval()
    encoder = model.item_encoder
    with torch.no_grad():
        merged = pool(plain(input_ids=encoder.input_ids[1:], attention_mask=encoder.attention_mask[1:]).last_hidden_state, encoder.attention_mask[1:], "last")
        torch.testing.assert_close(merged, encoder.pooled_text(encoder.input_ids[1:], encoder.attention_mask[1:]), rtol=0, atol=1e-5)


@pytest.fixture
def artifact_copy(frozen_artifact, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(frozen_artifact[0], copy)
    return copy


def test_unknown_and_pickled_files_are_refused(artifact_copy):
    (artifact_copy / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="notes.txt"):
        load_artifact(artifact_copy)
    (artifact_copy / "notes.txt").unlink()
    (artifact_copy / "backbone" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="pytorch_model.bin"):
        load_artifact(artifact_copy)


@pytest.mark.parametrize("name", ["users.parquet", "item_vectors.safetensors", "backbone/config.json"])
def test_missing_files_are_named(artifact_copy, name):
    (artifact_copy / name).unlink()
    with pytest.raises(InputError, match=name):
        load_artifact(artifact_copy)


def test_bad_metadata_and_contents_are_named(artifact_copy):
    metadata_file = artifact_copy / "artifact.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(InputError, match="artifact.json.*format_version"):
        load_artifact(artifact_copy)
    metadata_file.write_text(json.dumps({**metadata, "rating": {**metadata["rating"], "high": "five"}}))
    with pytest.raises(InputError, match=r"artifact.json: field 'rating': high: "):
        load_artifact(artifact_copy)
    metadata_file.write_text(json.dumps({**metadata, "num_items": NUM_ITEMS + 1}))
    with pytest.raises(InputError, match="model.safetensors"):
        load_artifact(artifact_copy)
    metadata_file.write_text(json.dumps(metadata))
    pq.write_table(pa.table({"user_id": ["u1"]}), artifact_copy / "users.parquet")
    with pytest.raises(InputError, match="users.parquet.*user_idx"):
        load_artifact(artifact_copy)
    (artifact_copy / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="model.safetensors"):
        load_artifact(artifact_copy)


def test_existing_artifact_is_never_overwritten(frozen_artifact):
    path, _, items = frozen_artifact
    before = (path / "model.safetensors").read_bytes()
    loaded = load_artifact(path)
    with pytest.raises(InputError, match="not empty"):
        save(loaded.model, items, loaded.users, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert not list(path.parent.glob(".*partial*"))


def test_a_trained_artifact_carries_what_people_are_shown_of_each_item(trained_run):
    """Year and genres travel in the artifact, so a service shows them without the training data at hand."""
    from data import schema

    data = {row["item_id"]: row for row in pq.read_table(Path(trained_run.data) / schema.ITEMS_DIR, columns=["item_id", "year", "genres"]).to_pylist()}
    items = load_artifact(trained_run.artifact).items.to_pylist()
    assert len(items) == len(data) and any(row["genres"] for row in items)
    for row in items:
        assert (row["year"], row["genres"]) == (data[row["item_id"]]["year"], data[row["item_id"]]["genres"])


def test_a_trainings_output_given_for_its_artifact_is_one_line_naming_the_artifact(trained_run, capsys):
    """`polyrec evaluate --model DIR` with the folder `polyrec train --output DIR` wrote, not DIR/artifact: with or
    without Ray Data, one error line that names the artifact inside it (it was a traceback, or a wrong complaint)."""
    from cluster.cli import main as polyrec

    output = Path(trained_run.artifact).parent
    for ray_data in ([], ["--ray-data"]):
        capsys.readouterr()
        assert polyrec(["evaluate", "--model", str(output), "--data", trained_run.data, *ray_data]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        hint = f"it is a training's output, whose artifact is {trained_run.artifact}"
        assert error == [f"polyrec evaluate: error: {output}: not a model artifact (artifact.json not found); {hint}"]
        assert not ray.is_initialized()  # refused before Ray Data started anything
