"""Large catalogues: the retrieval loss and the serving index chosen by the catalogue's size, a training step whose
tensors do not grow with the catalogue, and a service answering from an approximate (HNSW) index."""

from __future__ import annotations

import faiss
import httpx
import numpy as np
import pytest
import ray
import torch
from ray import serve
from torch.utils._python_dispatch import TorchDispatchMode

from serve.config import FeedbackLogConfig, IndexConfig, RankingConfig, RetrievalConfig, ServeConfig
from serve.model_runtime import ServingModel, build_index
from serve.runner import run_service
from tests.ports import free_port
from tests.serving_fixtures import build_random_artifact, build_training_data
from tests.test_serve import item_text
from train.config import ModelConfig, TaskConfig, TrainConfig
from train.evaluate import SCORE_CELLS_PER_BATCH, rows_per_batch
from train.model import CatalogFeatures, PolyrecModel
from train.trainer import TableOptimizer, make_tables_sparse

LARGE = 50_000


def test_auto_retrieval_loss_is_full_up_to_the_threshold_and_sampled_above():
    tasks = TaskConfig()
    assert tasks.retrieval_loss == "auto"
    assert not tasks.sampled_retrieval(tasks.full_softmax_max_items)
    assert tasks.sampled_retrieval(tasks.full_softmax_max_items + 1)
    assert not TaskConfig(retrieval_loss="full").sampled_retrieval(10**7)
    assert TaskConfig(retrieval_loss="sampled").sampled_retrieval(10)


def test_auto_index_is_exact_up_to_the_threshold_and_hnsw_above():
    index = IndexConfig()
    assert index.kind == "auto"
    assert not index.approximate(index.exact_max_items) and index.approximate(index.exact_max_items + 1)
    assert IndexConfig(kind="hnsw").approximate(10) and not IndexConfig(kind="flat").approximate(10**7)


def test_evaluation_ranks_a_large_catalogue_a_few_rows_at_a_time():
    assert rows_per_batch(256, 1_682) == 256
    rows = rows_per_batch(256, 1_000_000)
    assert 1 <= rows < 256 and rows * 1_000_001 <= SCORE_CELLS_PER_BATCH < (rows + 1) * 1_000_001
    assert rows_per_batch(256, 10 * SCORE_CELLS_PER_BATCH) == 1


class LongestDimension(TorchDispatchMode):
    """Records the longest dimension of every tensor an operation allocates (views of existing tensors and in-place
    updates, which return a tensor they were given, allocate nothing; a sparse tensor allocates its stored rows)."""

    longest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        given = {id(arg) for arg in [*args, *(kwargs or {}).values()] if isinstance(arg, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and id(tensor) not in given:
                shape = (tensor._nnz(), *tensor.shape[tensor.sparse_dim() :]) if tensor.is_sparse else tensor.shape
                self.longest = max(self.longest, *shape)
        return out


def large_catalogue_model(retrieval_loss: str) -> PolyrecModel:
    """An id-only model over ``LARGE`` items, 4 users."""
    config = ModelConfig()
    config.item_encoder.use_text = False
    config.user_model.hidden_size = 16
    config.towers.expert_hidden = 16
    config.tasks.retrieval_loss = retrieval_loss
    config.tasks.num_sampled_negatives = 64
    attributes = torch.zeros(LARGE + 1, 4)
    attributes[1:, 1] = 1.0
    catalog = CatalogFeatures.placeholder(LARGE, 3, 4)
    catalog.attributes = attributes
    return PolyrecModel(config, num_users=4, num_items=LARGE, num_attributes=3, catalog=catalog, rating_mean=3.5)


def a_training_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(1, LARGE + 1, (4, 11), generator=generator)
    return {
        "input_items": items[:, :-1].contiguous(),
        "target_items": items[:, 1:].contiguous(),
        "target_ratings": torch.randn(4, 10, generator=generator),
        "target_likes": torch.randint(0, 2, (4, 10), generator=generator),
        "user_idx": torch.arange(1, 5),
    }


@pytest.mark.parametrize(("retrieval_loss", "sparse_tables"), [("auto", "auto"), ("auto", False), ("full", "auto")])
def test_a_training_step_on_a_large_catalogue_builds_no_catalogue_sized_tensor_with_the_sampled_softmax(retrieval_loss, sparse_tables, one_thread):
    """Forward, backward and the tables' optimizer step, as the trainer chooses them (``optimizer.sparse_tables``),
    after a first step, which allocates the optimizer's moments once."""
    model = large_catalogue_model(retrieval_loss).train()
    config = TrainConfig(optimizer={"sparse_tables": sparse_tables})
    tables = make_tables_sparse(model, config)
    assert model.sampled_retrieval == (retrieval_loss == "auto") and bool(tables) == (sparse_tables == "auto" and model.sampled_retrieval)
    optimizer = TableOptimizer(tables, config, num_train_windows=100) if tables else None

    def step() -> dict[str, torch.Tensor]:
        losses = model.calculate_loss(a_training_batch())
        assert all(torch.isfinite(loss) for loss in losses.values())
        model.zero_grad()
        sum(losses.values()).backward()
        if optimizer is not None:
            optimizer.step()
        return losses

    step()
    with LongestDimension() as watch:
        step()
    if not tables:  # the watch sees the catalogue when it is there: the full softmax's logits, or a dense table's gradient
        assert watch.longest == LARGE + 1
        return
    # The step's own items (40 inputs, 40 targets) and the 64 negatives, and gradients as long as the longest dense
    # parameter (none grows with the catalogue): nothing as long as the catalogue.
    in_tables = {id(table.weight) for table in tables}
    longest_dense = max(max(param.shape) for param in model.parameters() if id(param) not in in_tables)
    assert watch.longest <= max(4 * 10 * 2 + 64, longest_dense) < LARGE
    touched = model.item_encoder.id_embedding.weight.grad.coalesce().indices()[0]
    assert 0 < len(touched) <= 4 * 11 + 64


def test_hnsw_index_finds_the_exact_top_10_and_takes_registered_items():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(20_000, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    ids = np.arange(1, len(keys) + 1)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    exact = build_index(keys, ids, IndexConfig(kind="flat"))
    approximate = build_index(keys, ids, IndexConfig(kind="hnsw"))
    assert isinstance(faiss.downcast_index(approximate.index), faiss.IndexHNSWFlat)
    _, exact_top = exact.search(queries, 10)
    _, approximate_top = approximate.search(queries, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact_top, approximate_top)])
    assert recall >= 0.9

    registered = keys[:3] * -1.0  # far from every catalogue key's neighbourhood of itself
    approximate.add_with_ids(registered, np.array([len(keys) + 1, len(keys) + 2, len(keys) + 3]))
    _, found = approximate.search(registered * 10, 1)
    assert found[:, 0].tolist() == [len(keys) + 1, len(keys) + 2, len(keys) + 3]


def test_a_serving_model_with_a_forced_hnsw_index_retrieves_as_the_exact_one(tmp_path):
    artifact = str(build_random_artifact(tmp_path / "model", num_users=30, seed=0, model_version="random-0"))
    exact, approximate = ServingModel(artifact, IndexConfig(kind="flat")), ServingModel(artifact, IndexConfig(kind="hnsw"))
    assert isinstance(faiss.downcast_index(approximate.index.index), faiss.IndexHNSWFlat)
    assert isinstance(faiss.downcast_index(exact.index.index), faiss.IndexFlatIP)
    queries = np.asarray(exact.keys[1:21] * 10)
    assert np.array_equal(exact.index.search(queries, 10)[1], approximate.index.search(queries, 10)[1])  # small: the graph is exhaustive


@pytest.fixture(scope="module")
def hnsw_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("hnsw-serve")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        config = ServeConfig(
            graph="colocated",
            model=str(build_random_artifact(root / "model", num_users=30, seed=0, model_version="random-0")),
            training_data=build_training_data(root / "data", num_users=30),
            state_dir=str(root / "state"),
            feedback=FeedbackLogConfig(path=str(root / "feedback")),
            retrieval=RetrievalConfig(index=IndexConfig(kind="hnsw")),
            ranking=RankingConfig(weights={"retrieval": 1.0, "like": 0.0, "rating": 0.0}),
            port=free_port(),
            api_key_env=None,
        )
        yield run_service(config, blocking=False)
        serve.shutdown()
    finally:
        ray.shutdown()


def test_a_service_with_an_hnsw_index_recommends_unseen_catalogue_and_registered_items(hnsw_service):
    with httpx.Client(base_url=hnsw_service.url, timeout=120) as client:
        answer = client.post("/v1/recommend", json={"user_id": "1", "k": 10, "history": ["50"]})
        assert answer.status_code == 200, answer.text
        items = [item["item_id"] for item in answer.json()["items"]]
        assert len(items) == len(set(items)) == 10 and "50" not in items
        assert all(client.get(f"/v1/items/{item}").json()["registered"] is False for item in items)
        text = "Robots Sing in Space. Genres: Musical, Sci-Fi."
        assert client.post("/v1/items", json={"item_id": "robot-musical", "title": "Robots Sing", "text": text}).status_code == 201
        found = client.post("/v1/recommend", json={"user_id": "nobody", "k": 3, "interests": text}).json()["items"]
        assert found[0]["item_id"] == "robot-musical"
        by_text = client.post("/v1/recommend", json={"user_id": "nobody-2", "k": 3, "interests": item_text("50")}).json()["items"]
        assert by_text[0]["item_id"] == "50"
