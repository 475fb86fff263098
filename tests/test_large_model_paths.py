"""The fine-tuning paths through Ray Train + DeepSpeed on 2 CPU workers: LoRA on the packaged MiniLM under ZeRO-3
with uncertainty weighting, then resumed from its Ray Train checkpoint; full fine-tuning of a small random decoder
under ZeRO-2 with GradNorm; ZeRO-1 on the frozen default. Each exported artifact serves, and its item vectors are the
trained backbone's encoding of the catalogue. Beside them, without Ray, the pieces these runs rest on: ranks in
lockstep under ZeRO-3, the backbone's learning rate, evaluation and serving on the model's device."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel

from common.errors import InputError
from common.storage import read_table, resolve
from data import schema
from data.pipeline import run_preprocess
from serve.messages import RetrievalRequest
from serve.model_runtime import ServingModel, serving_device
from tests.serving_fixtures import GENRES, MAX_TEXT_TOKENS, TINY_BERT, movielens_tables
from tests.tiny import tiny_config, tiny_preprocess_config
from train.artifact import load_artifact
from train.backbone import default_backbone_path, pool
from train.config import BackboneConfig, LossWeightingConfig, ModelConfig, TrainConfig
from train.evaluate import evaluate
from train.model import CatalogFeatures, PolyrecModel
from train.trainer import TrainingModule, _parameter_groups, absolute_start_points, run_training, validation_sample
from train.weighting import LossWeighting

pytestmark = pytest.mark.slow


# --- the pieces, without Ray -------------------------------------------------------------------


def _tiny_model(mode: str = "lora") -> PolyrecModel:
    items, users, ratings = movielens_tables(4)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)
    config = ModelConfig(backbone=BackboneConfig(random_init_config=TINY_BERT, mode=mode, text_batch_size=8))
    config.user_model.hidden_size = config.towers.expert_hidden = 32
    catalog = CatalogFeatures.from_items_table(items, MAX_TEXT_TOKENS, tokenizer.pad_token_id, num_attributes=len(GENRES))
    torch.manual_seed(0)
    return PolyrecModel(config, num_users=users.num_rows, num_items=items.num_rows, num_attributes=len(GENRES), catalog=catalog, rating_mean=3.5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_backbone_trains_at_backbone_lr_and_the_rest_at_lr(mode):
    model = _tiny_model(mode)
    module = TrainingModule(model, LossWeighting(model.config.loss_weighting, model.task_names))
    config = TrainConfig()
    config.optimizer.lr, config.optimizer.backbone_lr = 1e-3, 1e-5
    rates = {group["lr"]: {id(param) for param in group["params"]} for group in _parameter_groups(module, config)}
    backbone = {id(param) for param in model.item_encoder.backbone.parameters() if param.requires_grad}
    assert backbone and rates[1e-5] == backbone  # LoRA: the adapters alone
    assert rates[1e-3] == {id(param) for param in module.parameters() if param.requires_grad} - backbone


def test_under_zero3_every_rank_runs_as_many_backbone_passes_as_the_busiest(monkeypatch):
    """ZeRO-3 all-gathers the backbone's weights in every pass: a rank that ran fewer passes than another would wait
    in a collective the other never issues (the hang of issue #20). Here another rank needs 4 chunks, this one 2."""
    encoder = _tiny_model().item_encoder.eval()  # no dropout: the two encodings compare
    items = torch.arange(1, 17)  # 2 chunks of text_batch_size 8
    plain = encoder.pooled_text(encoder.input_ids[items], encoder.attention_mask[items])

    def busiest_rank_has_four(tensor, op):
        tensor.fill_(max(int(tensor), 4))

    monkeypatch.setattr(torch.distributed, "all_reduce", busiest_rank_has_four)
    passes = []
    first_query = next(module for name, module in encoder.backbone.named_modules() if name.endswith("layer.0.attention.self.query"))  # LoRA-adapted
    first_query.register_forward_hook(lambda *_: passes.append("forward"))
    first_query.register_full_backward_hook(lambda *_: passes.append("backward"))
    encoder.lockstep_ranks = True
    pooled = encoder.pooled_text(encoder.input_ids[items], encoder.attention_mask[items])
    pooled.sum().backward()
    assert passes.count("forward") == 4 and passes.count("backward") == 4  # the padding passes' backward runs too
    torch.testing.assert_close(pooled, plain)  # and adds nothing


def test_gradnorm_under_zero3_is_refused_before_training(tmp_path):
    config = tiny_config("nowhere", tmp_path / "run", deepspeed__zero_stage=3, model__loss_weighting=LossWeightingConfig(method="gradnorm"))
    with pytest.raises(InputError, match="train.model.loss_weighting.method: gradnorm does not run under deepspeed.zero_stage 3"):
        run_training(config)
    assert not (tmp_path / "run").exists()


class _MetaScorer(torch.nn.Module):
    """A torch scorer whose weights live on another device than the CPU (``meta``): it records where its inputs are."""

    def __init__(self, num_items: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.num_items = num_items
        self.input_devices: set[torch.device] = set()

    def full_sort_predict(self, batch):
        self.input_devices |= {tensor.device for tensor in batch.values()}
        return torch.zeros(len(batch["user_idx"]), self.num_items + 1)

    def predict(self, batch):
        self.input_devices |= {tensor.device for tensor in batch.values()}
        return {}


def test_evaluation_hands_a_scorer_its_inputs_on_its_own_device():
    """Per-epoch validation runs on the model where DeepSpeed placed it (a GPU in production)."""
    rows = [
        {"user_idx": user, "history": [1, 2, user], "history_ratings": [0.5, 0.1, 0.2], "seen_items": [1, 2, user], "target_item": 7,
         "target_rating": 0.3, "target_rating_raw": 4.0, "target_like": 1, "target_timestamp": 0, "is_cold_target": False}
        for user in (3, 4)
    ]  # fmt: skip
    scorer = _MetaScorer(num_items=9)
    evaluate(scorer, pa.Table.from_pylist(rows, schema=schema.EVAL_SEQUENCE), ks=[10], num_items=9, max_history=5, batch_size=16)
    assert scorer.input_devices == {torch.device("meta")}


def test_a_replica_with_a_gpu_serves_from_it(monkeypatch):
    assert serving_device() == torch.device("cpu")  # this machine has none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serving_device() == torch.device("cuda")


def test_a_relative_backbone_folder_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """``configs/train-llm-8b.yaml`` names its backbone relative to where `polyrec train` runs; the workers run elsewhere."""
    config = TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / "train-llm-8b.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="name_or_path: runs/models/llm-8b is not a folder"):
        absolute_start_points(config)
    (tmp_path / config.model.backbone.name_or_path).mkdir(parents=True)
    absolute = config.model_copy(update=absolute_start_points(config))
    assert absolute.model.backbone.name_or_path == str(tmp_path / "runs/models/llm-8b")
    assert absolute.model.backbone.mode == "lora" and absolute.model.user_model == config.model.user_model


# --- the runs ----------------------------------------------------------------------------------


MAX_HISTORY = 10


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A smaller slice than the other training tests' (12 users, histories of 10, texts of 6 tokens): every item a
    step touches goes through the language model, forward and backward, on the CPU."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    config = tiny_preprocess_config(tmp_path_factory.mktemp("small-data"), num_users=12, max_history=MAX_HISTORY)
    config.features.max_text_tokens = 6
    run_preprocess(config)
    yield config.output
    ray.shutdown()


def _two_workers(data: str, output: Path, **overrides) -> TrainConfig:
    config = tiny_config(data, output, scaling__num_workers=2, scaling__cpus_per_worker=0.5, **overrides)
    config.optimizer.backbone_lr = 1e-3  # a few steps must move the backbone visibly
    config.optimizer.warmup_steps = 0  # an epoch is 2 to 4 steps here
    return config


@pytest.fixture(scope="module")
def lora_minilm_zero3(small_data, tmp_path_factory):
    """One epoch of LoRA on the real MiniLM under ZeRO-3 with uncertainty weighting, then a second from its checkpoint. Large
    batches of few negatives keep the item encodings (the cost on a CPU) few; chunks of 64 texts give the ranks
    different numbers of backbone passes."""
    root = tmp_path_factory.mktemp("lora-zero3")

    def config(epochs: int, output: str, resume_from: str | None = None) -> TrainConfig:
        config = _two_workers(
            small_data,
            root / output,
            epochs=epochs,
            batch_size=32,
            resume_from=resume_from,
            deepspeed__zero_stage=3,
            model__loss_weighting=LossWeightingConfig(method="uncertainty"),
        )
        config.model.backbone = BackboneConfig(mode="lora", text_batch_size=64)
        config.model.tasks.num_sampled_negatives = 16
        return config

    first = run_training(config(1, "first"))
    return first, run_training(config(2, "resumed", resume_from=first.latest_checkpoint))


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory) -> Path:
    """A small random Llama saved as a Hugging Face folder with the tokenizer that made the data's token ids."""
    folder = tmp_path_factory.mktemp("decoder")
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path(), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_decoder_zero2(small_data, decoder_folder, tmp_path_factory):
    """Two epochs of full fine-tuning of the decoder under ZeRO-2 with GradNorm; the backbone is named
    relative to the driver's folder, as configs/train-llm-8b.yaml names its own."""
    config = _two_workers(
        small_data,
        tmp_path_factory.mktemp("full-zero2"),
        epochs=2,
        deepspeed__zero_stage=2,
        model__loss_weighting=LossWeightingConfig(method="gradnorm"),
    )
    config.model.backbone = BackboneConfig(name_or_path=os.path.relpath(decoder_folder), mode="full", pooling="last")
    return run_training(config)


def _retrieval_losses(result) -> list[float]:
    return [record["train/loss_retrieval"] for record in result.history]


TASKS = ("retrieval", "rating", "like", "attributes")


def test_lora_under_zero3_learns_resumes_and_weights_by_uncertainty(lora_minilm_zero3):
    first, resumed = lora_minilm_zero3
    assert [record["epoch"] for record in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # carried over from the checkpoint, not re-run
    losses = _retrieval_losses(resumed)
    assert losses[1] < losses[0], losses
    assert all(resumed.history[-1][f"train/weight_{task}"] != pytest.approx(1.0, abs=1e-4) for task in TASKS)  # exp(-s), s learned from 0


def test_full_fine_tuning_under_zero2_learns_and_weights_by_gradnorm(full_decoder_zero2):
    losses = _retrieval_losses(full_decoder_zero2)
    assert losses[1] < losses[0], losses
    weights = [full_decoder_zero2.history[-1][f"train/weight_{task}"] for task in TASKS]
    assert sum(weights) == pytest.approx(4.0, abs=1e-4)  # GradNorm keeps the weights summing to the number of tasks
    assert max(abs(weight - 1.0) for weight in weights) > 1e-3, weights  # and moves them from where they start


def _pooled_catalogue(backbone: torch.nn.Module, artifact) -> torch.Tensor:
    encoder = artifact.model.item_encoder
    with torch.no_grad():
        hidden = backbone(input_ids=encoder.input_ids, attention_mask=encoder.attention_mask).last_hidden_state
    return pool(hidden, encoder.attention_mask, artifact.config.backbone.pooling)


@pytest.mark.parametrize("run", ["lora_minilm_zero3", "full_decoder_zero2"])
def test_the_artifact_holds_the_trained_backbone_and_its_encoding_of_the_catalogue(run, request, decoder_folder):
    result = request.getfixturevalue(run)
    result = result[1] if isinstance(result, tuple) else result
    artifact = load_artifact(result.artifact)
    # The backbone folder is a plain Hugging Face model (LoRA merged): AutoModel alone loads it, without adapters.
    exported = AutoModel.from_pretrained(Path(result.artifact) / "backbone", local_files_only=True).eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    original = AutoModel.from_pretrained(default_backbone_path() if run == "lora_minilm_zero3" else decoder_folder, local_files_only=True).eval()
    trained_text, original_text = _pooled_catalogue(exported, artifact), _pooled_catalogue(original, artifact)
    assert (trained_text - original_text)[1:].abs().max() > 1e-3  # the backbone moved ...

    encoder = artifact.model.item_encoder
    every_item = torch.arange(artifact.model.num_items + 1)
    with torch.no_grad():
        expected = (encoder.projection(trained_text) + encoder.id_embedding(every_item)) * (every_item != 0).unsqueeze(-1)
    torch.testing.assert_close(artifact.item_vectors, expected, atol=2e-4, rtol=1e-3)  # ... and the item table is its encoding


@pytest.mark.parametrize("run", ["lora_minilm_zero3", "full_decoder_zero2"])
def test_the_fine_tuned_artifact_serves(run, request):
    result = request.getfixturevalue(run)
    result = result[1] if isinstance(result, tuple) else result
    served = ServingModel(result.artifact)
    user_id = next(iter(served.user_index))
    history = list(served.item_index)[:5]
    request = RetrievalRequest(
        model=result.artifact, user_id=user_id, history=history, history_ratings=[4.0] * 5, interests="a funny film", num_candidates=10, registry_version=0
    )
    candidates = served.retrieve([request], history_length=MAX_HISTORY, interests_weight=0.3)[0]
    ranked = served.rank([candidates], {"retrieval": 1.0, "like": 1.0, "rating": 0.1})[0]
    assert candidates.mode == "personal" and len(candidates.item_ids) == 10
    assert ranked.item_ids == candidates.item_ids and torch.isfinite(torch.as_tensor(ranked.score)).all()


def test_zero1_trains_and_exports_the_frozen_default_validating_on_a_fixed_sample(small_data, tmp_path):
    validation = read_table(resolve(small_data), f"{schema.SEQUENCES_DIR}/validation")
    limit = validation.num_rows // 2 + 1
    result = run_training(_two_workers(small_data, tmp_path, epochs=1, deepspeed__zero_stage=1, validation_sample_rows=limit))
    artifact = load_artifact(result.artifact)

    def ndcg(rows: pa.Table) -> float:
        return evaluate(artifact.model, rows, ks=[10, 20], num_items=artifact.model.num_items, max_history=MAX_HISTORY, batch_size=64)["NDCG@10"]

    # The epoch's validation scored `limit` of the split's rows, the same ones whenever they are drawn.
    sample = validation_sample(validation, limit)
    assert sample.num_rows == limit and sample.equals(validation_sample(validation, limit))
    keys = ("user_idx", "target_item")
    assert set(zip(*(sample[key].to_pylist() for key in keys))) < set(zip(*(validation[key].to_pylist() for key in keys)))
    assert ndcg(sample) == pytest.approx(result.best_validation["validation/NDCG@10"], abs=1e-6)
    assert ndcg(validation) != pytest.approx(result.best_validation["validation/NDCG@10"], abs=1e-6)
