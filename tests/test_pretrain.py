"""`polyrec pretrain`: each objective lowers its loss on a toy catalogue, masked-LM training predicts held-out masked
tokens better, and the CLI writes a Hugging Face folder that `polyrec train`'s backbone config and artifact accept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from cluster.cli import main as polyrec
from data.manifest import load_manifest
from tests.serving_fixtures import GENRES, MAX_TEXT_TOKENS, TINY_BERT, movielens_tables
from train.artifact import read_metadata, save_artifact
from train.backbone import PRETRAIN_PROVENANCE_FILE, default_backbone_path, load_backbone, pretraining_provenance
from train.config import BackboneConfig, ModelConfig
from train.model import CatalogFeatures, PolyrecModel
from train.pretrain import PretrainConfig, PretrainCorpus, load_language_model, make_loader, objective_loss, train_epoch

TINY_DECODERS = {
    "gpt2": {"model_type": "gpt2", "vocab_size": 30522, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
    "llama": {
        "model_type": "llama",
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
}
#: Genres that go together: a toy catalogue where the text has structure to learn and co-consumption follows it.
GENRE_PAIRS = [("comedy", "romance"), ("action", "thriller"), ("horror", "mystery"), ("drama", "war")]
TITLES = ["red", "blue", "green", "river", "stone", "night", "city", "summer", "winter", "ghost", "star", "road", "house", "king", "girl", "dog"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)


def toy_texts(titles: list[str]) -> list[tuple[str, int]]:
    """(text, genre pair) for every title and genre pair: the second genre always follows from the first."""
    return [(f"{title} ({1980 + i}). genres: {first}, {second}.", g) for i, title in enumerate(titles) for g, (first, second) in enumerate(GENRE_PAIRS)]


@pytest.fixture(scope="module")
def toy_corpus(tokenizer) -> PretrainCorpus:
    items = toy_texts(TITLES)
    genre = np.array([g for _, g in items])
    rng = np.random.default_rng(0)
    # Consecutively consumed items share their genres, as co-consumption in a real catalogue follows its content.
    anchors = rng.integers(0, len(items), 512)
    positives = np.array([rng.choice(np.flatnonzero(genre == genre[a])) for a in anchors])
    return PretrainCorpus(
        texts=[tokenizer(text)["input_ids"] for text, _ in items],
        pairs=np.stack([anchors, positives], axis=1) + 1,  # item_idx: 1-based
        tokenizer=tokenizer,
        data_hash="toy",
    )


HEAD_CLASSES = {"mlm": AutoModelForMaskedLM, "clm": AutoModelForCausalLM, "contrastive": AutoModel}


def saved_random_model(folder: Path, settings: dict, model_class: type) -> Path:
    settings = dict(settings)
    hf_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model_class.from_config(hf_config).save_pretrained(folder)
    return folder


def fixed_batches(corpus: PretrainCorpus, objective: str, config: PretrainConfig) -> list[dict]:
    torch.manual_seed(123)  # the same masks before and after training
    return list(make_loader(corpus, objective, config, epoch=0))


def mean_loss(model, batches: list[dict], objective: str, config: PretrainConfig) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([float(objective_loss(model, batch, objective, config)) for batch in batches]))


def pretrain(model, corpus: PretrainCorpus, objective: str, config: PretrainConfig) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for epoch in range(config.epochs):
        train_epoch(model, make_loader(corpus, objective, config, epoch), optimizer, scheduler, objective, config, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("objective", "backbone"), [("mlm", TINY_BERT), ("clm", TINY_DECODERS["gpt2"]), ("clm", TINY_DECODERS["llama"]), ("contrastive", TINY_BERT)]
)
def test_each_objective_lowers_its_loss_on_a_toy_catalogue(objective, backbone, toy_corpus, tmp_path, one_thread) -> None:
    config = PretrainConfig(objective=objective, epochs=6, batch_size=16, lr=3e-3, pairs_per_epoch=128, temperature=0.1)
    model = load_language_model(saved_random_model(tmp_path / "source", backbone, HEAD_CLASSES[objective]), objective)
    batches = fixed_batches(toy_corpus, objective, config)
    before = mean_loss(model, batches, objective, config)
    pretrain(model, toy_corpus, objective, config)
    after = mean_loss(model, batches, objective, config)
    assert after < 0.7 * before, (before, after)


def test_masked_language_modelling_predicts_held_out_masked_tokens_better(tokenizer, toy_corpus, tmp_path, one_thread) -> None:
    """The second genre of titles never seen in training, masked: its probability rises, as the training texts
    teach which genres there are and which follows which."""
    config = PretrainConfig(objective="mlm", epochs=12, batch_size=16, lr=3e-3)
    model = load_language_model(saved_random_model(tmp_path / "source", TINY_BERT, AutoModelForMaskedLM), "mlm")
    held_out = [text for text, _ in toy_texts(["paper", "lake", "moon", "train"])]
    encoded = tokenizer(held_out, return_tensors="pt", padding=True)
    second_genres = [tokenizer.convert_tokens_to_ids(second) for _, second in GENRE_PAIRS] * 4
    positions = [row.tolist().index(token) for row, token in zip(encoded["input_ids"], second_genres)]
    masked = encoded["input_ids"].clone()
    masked[torch.arange(len(masked)), positions] = tokenizer.mask_token_id

    def true_token_log_probability() -> float:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=masked, attention_mask=encoded["attention_mask"]).logits
        log_probs = logits[torch.arange(len(masked)), positions].log_softmax(-1)
        return float(log_probs[torch.arange(len(masked)), second_genres].mean())

    before = true_token_log_probability()
    pretrain(model, toy_corpus, "mlm", config)
    after = true_token_log_probability()
    assert before < math.log(0.001)  # a random model: no better than a guess among thousands of tokens
    assert after > before + math.log(100), (before, after)  # at least a hundred times as probable


def test_masked_lm_collation_masks_no_special_token(tokenizer, toy_corpus) -> None:
    torch.manual_seed(0)
    batch = next(iter(make_loader(toy_corpus, "mlm", PretrainConfig(mlm_probability=0.5, batch_size=64), epoch=0)))
    labelled = batch["labels"] != -100
    special = torch.isin(torch.where(labelled, batch["labels"], 0), torch.tensor(tokenizer.all_special_ids))
    assert labelled.any() and not (labelled & special).any()


def test_polyrec_pretrain_writes_a_backbone_that_training_accepts(trained_run, tmp_path, capsys) -> None:
    source = saved_random_model(tmp_path / "source", TINY_BERT, AutoModel)  # a pooler and no MLM head, as the packaged MiniLM
    config = PretrainConfig(name_or_path=str(source), objective="auto", epochs=2, batch_size=32, lr=1e-3)
    (tmp_path / "pretrain.yaml").write_text(config.to_yaml())
    output = tmp_path / "pretrained"
    started_ray = not ray.is_initialized()
    try:
        assert polyrec(["pretrain", "--config", str(tmp_path / "pretrain.yaml"), "--data", trained_run.data, "--output", str(output)]) == 0
        assert polyrec(["pretrain", "--config", str(tmp_path / "pretrain.yaml"), "--data", trained_run.data, "--output", str(output)]) == 2
    finally:
        if started_ray:
            ray.shutdown()
    assert "is not empty" in capsys.readouterr().err

    manifest = load_manifest(trained_run.data)
    provenance = json.loads((output / PRETRAIN_PROVENANCE_FILE).read_text())
    assert provenance["objective"] == "mlm"  # auto: BERT has a masked-LM head class
    assert provenance["source"] == str(source)
    assert provenance["data_manifest_hash"] == manifest.content_hash
    assert provenance["steps"] == 2 * math.ceil(manifest.num_items / 32)
    assert len(provenance["epoch_losses"]) == 2 and provenance["final_loss"] == provenance["epoch_losses"][-1]
    assert (output / "model.safetensors").is_file() and not any(output.glob("*.bin"))
    assert isinstance(AutoModel.from_pretrained(output, local_files_only=True), type(AutoModel.from_config(AutoConfig.from_pretrained(source))))

    # polyrec train's backbone config loads it, with the data's tokenizer beside it; the artifact records where it came from.
    backbone_config = BackboneConfig(name_or_path=str(output))
    backbone, backbone_tokenizer = load_backbone(backbone_config)
    assert backbone_tokenizer is not None and len(backbone_tokenizer) == manifest.tokenizer.vocab_size
    untouched = AutoModel.from_pretrained(source, local_files_only=True)
    assert not torch.equal(backbone.embeddings.word_embeddings.weight, untouched.embeddings.word_embeddings.weight)  # trained
    assert torch.equal(backbone.pooler.dense.weight, untouched.pooler.dense.weight)  # what MLM does not train, as it was
    assert pretraining_provenance(backbone_config) == provenance

    items, users, ratings = movielens_tables(num_users=10)
    model_config = ModelConfig(backbone=backbone_config)
    model_config.user_model.hidden_size = model_config.towers.expert_hidden = 32
    catalog = CatalogFeatures.from_items_table(items, MAX_TEXT_TOKENS, backbone_tokenizer.pad_token_id, num_attributes=len(GENRES))
    model = PolyrecModel(model_config, num_users=users.num_rows, num_items=items.num_rows, num_attributes=len(GENRES), catalog=catalog, rating_mean=3.5)
    artifact = save_artifact(
        model,
        tmp_path / "artifact",
        items=items,
        users=users,
        model_version="v",
        data_manifest_hash="h",
        metrics={},
        rating={"kind": "none", "shift": 0.0, "scale": 1.0},
    )
    assert read_metadata(artifact)["backbone_pretraining"] == provenance


def test_polyrec_pretrain_refuses_a_folder_without_a_model(tmp_path, capsys) -> None:
    config = tmp_path / "pretrain.yaml"
    config.write_text(PretrainConfig(name_or_path=str(tmp_path)).to_yaml())
    assert polyrec(["pretrain", "--config", str(config), "--data", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "no Hugging Face model folder (config.json)" in capsys.readouterr().err
