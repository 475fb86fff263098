"""One loaded model version as the serving graph uses it.

``ServingModel`` wraps a ``train.artifact`` artifact: item id ↔ index maps, the inner-product index
over the retrieval keys (exact, or HNSW for large catalogues: ``serve.config.IndexConfig``), the items registered at run time (encoded from
their text by the model's item encoder), and batched calls of the model's public methods. The replicas
that retrieve and rank (Retriever and Ranker, or the colocated graph's Recommender) each hold a few of
them (``ModelCache``), keyed by artifact path, so that a request keeps one version from retrieval to
ranking while a new version is swapped in.

The messages (``serve.messages``) carry item indices: 0 is padding, 1..N the catalogue. A registered item has index N + its registration
number in the Retriever's index; in messages to the Ranker it becomes N + 1 + j, the j-th row of
the request's ``extra_vectors``, which ``PolyrecModel.score_with_queries`` takes as extra items.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers.utils import logging as transformers_logging

from common.errors import InputError
from data.features import rating_offsets_by_index
from data.schema import PAD_INDEX
from serve.config import IndexConfig
from serve.messages import Candidates, Mode, Ranked, RetrievalRequest
from serve.state import RegisteredItem
from train.artifact import artifact_rating, load_artifact
from train.batching import left_pad


def limit_threads(threads: int) -> None:
    """Replicas hold fractions of a few cores; more threads than that only contend."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    transformers_logging.disable_progress_bar()  # one bar per model load in the replica logs


def serving_device() -> torch.device:
    """A replica's GPU when Ray gave it one (``ray_actor_options.num_gpus``, e.g. the GPU overlay's Ranker: Ray
    then makes exactly that GPU visible), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --- a loaded version ------------------------------------------------------------------------


def build_index(keys: np.ndarray, ids: np.ndarray, config: IndexConfig) -> faiss.IndexIDMap2:
    """An inner-product index of ``keys`` [n, d] under ``ids``, exact or HNSW as ``config`` says for n items; more
    items can be added under their ids (``add_with_ids``), none removed (serving never removes one)."""
    width = keys.shape[1]
    if config.approximate(len(keys)):
        graph = faiss.IndexHNSWFlat(width, config.hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = config.hnsw_ef_construction
        graph.hnsw.efSearch = config.hnsw_ef_search
        index = faiss.IndexIDMap2(graph)
    else:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(width))
    index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), ids.astype(np.int64))
    return index


#: The tasks whose scores ranking mixes (``RankingConfig.weights``), besides the retrieval logit the candidates bring.
RANKING_TASKS = ("like", "rating")


def _objects(values: list) -> np.ndarray:
    """A 1-d object array of ``values`` (lists stay elements, not a second dimension)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _optional_column(table: pa.Table, name: str) -> list:
    """A column an older artifact may lack (``train.artifact.ITEM_DISPLAY_FIELDS``), None for each row there."""
    return table[name].to_pylist() if name in table.column_names else [None] * len(table)


class ServingModel:
    """A model artifact ready to retrieve and rank; thread-safe for reads; ``add_registered`` on one thread."""

    def __init__(self, path: str, index: IndexConfig | None = None):
        artifact = load_artifact(path)
        self.path = path
        self.metadata = artifact.metadata
        self.version: str = artifact.model_version
        self.device = serving_device()
        self.model = artifact.model.to(self.device)
        if "retrieval" not in self.model.tasks:
            raise InputError(f"{path}: the model has no retrieval task, so it cannot be served")
        self.tokenizer = artifact.tokenizer
        if self.tokenizer is not None:
            self.tokenizer.padding_side = "right"  # encode_item_text reads right-padded ids
        token_ids = getattr(self.model.item_encoder, "input_ids", None)
        self.max_tokens = token_ids.shape[1] if token_ids is not None else 64
        self.num_items = self.model.num_items

        items = artifact.items.sort_by("item_idx")
        self.item_ids: list[str] = ["", *items["item_id"].to_pylist()]
        self.titles: list[str] = ["", *(title or "" for title in items["title"].to_pylist())]
        self.attributes: list[list[int]] = [[], *(list(a or ()) for a in items["attributes"].to_pylist())]
        self.years: list[int | None] = [None, *_optional_column(items, "year")]
        self.genres: list[list[str]] = [[], *(list(names or ()) for names in _optional_column(items, "genres"))]
        self.item_index = {item_id: idx for idx, item_id in enumerate(self.item_ids) if idx}
        self._groups = _objects(self.attributes)
        self.user_index = dict(zip(artifact.users["user_id"].to_pylist(), artifact.users["user_idx"].to_pylist()))
        self.rating_offsets = rating_offsets_by_index(artifact.users)
        self.rating = artifact_rating(self.metadata)

        with torch.inference_mode():
            self.keys = self.model.retrieval_keys().float().cpu().numpy()  # [N+1, d] unit vectors
        self.index = build_index(self.keys[1:], np.arange(1, self.num_items + 1), index or IndexConfig())

        self.registry_version = 0
        self.registered_ids: list[str] = []  # registration j+1 → item id
        self.registered_titles: list[str] = []
        self.registered_vectors = np.zeros((0, self.keys.shape[1]), dtype=np.float32)
        self.registered_index: dict[str, int] = {}  # item id → N + registration number
        self._index_lookups()

    # --- items -------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Item vectors [n, d] of free texts, from the model's text encoder."""
        if self.tokenizer is None:
            raise InputError(f"{self.path}: the artifact has no tokenizer, so it cannot encode text")
        tokens = self.tokenizer(list(texts), max_length=self.max_tokens, truncation=True, padding=True, return_tensors="pt")
        with torch.inference_mode():
            return self.model.encode_item_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float().cpu()

    def encode_registered(self, items: Sequence[RegisteredItem]) -> np.ndarray:
        """Item vectors [n, d] of registered items (seconds for thousands): changes nothing, so it runs in a
        thread while the replica serves. An id-only model cannot place an item known by its text alone: zeros."""
        if self.tokenizer is None or not items:
            return np.zeros((len(items), self.registered_vectors.shape[1]), dtype=np.float32)
        return self.encode_texts([item.text for item in items]).numpy()

    def add_registered(self, items: Sequence[RegisteredItem], vectors: np.ndarray) -> None:
        """Add registered items (in registration order, from at most ``registry_version + 1``) and their
        ``encode_registered`` vectors to the index; the ones added since they were read are skipped. Called on the
        replica's event loop, where retrieval reads the index too, so that no read sees half of an addition.
        An id the catalogue already has (a later model trained on it) keeps its catalogue entry."""
        fresh = [i for i, item in enumerate(items) if item.seq > self.registry_version]
        if not fresh:
            return
        items, vectors = [items[i] for i in fresh], vectors[fresh]
        if items[0].seq != self.registry_version + 1:
            raise RuntimeError(f"registered items skipped: have {self.registry_version}, got {items[0].seq}")
        new = [] if self.tokenizer is None else [(i, item) for i, item in enumerate(items) if item.item_id not in self.item_index]
        if new:
            keys = F.normalize(torch.from_numpy(vectors[[i for i, _ in new]]), dim=-1).numpy()
            self.index.add_with_ids(keys, np.array([self.num_items + item.seq for _, item in new], dtype=np.int64))
        self.registered_index.update({item.item_id: self.num_items + item.seq for _, item in new})
        self.registered_ids += [item.item_id for item in items]
        self.registered_titles += [item.title for item in items]
        self.registered_vectors = np.concatenate([self.registered_vectors, vectors])
        self.registry_version = items[-1].seq
        self._index_lookups()

    def _index_lookups(self) -> None:
        """The candidates' fields by item index (the catalogue's, then the registrations'), as arrays: a batch's
        are picked with one fancy index instead of a Python loop per candidate."""
        registered = len(self.registered_ids)
        self._ids = _objects([*self.item_ids, *self.registered_ids])
        self._titles = _objects([*self.titles, *self.registered_titles])
        self._years = _objects([*self.years, *[None] * registered])
        self._genres = _objects([*self.genres, *[[]] * registered])
        self._index_of = {**self.item_index, **self.registered_index}  # a catalogue id keeps its catalogue entry

    def knows(self, item_id: str) -> bool:
        return item_id in self._index_of

    def describe_item(self, item_id: str) -> dict | None:
        if item_id in self.item_index:
            idx = self.item_index[item_id]
            return {"item_id": item_id, "title": self.titles[idx], "registered": False, "attributes": self.attributes[idx]}
        if item_id in self.registered_index:
            j = self.registered_index[item_id] - self.num_items - 1
            return {"item_id": item_id, "title": self.registered_titles[j], "registered": True, "attributes": []}
        return None

    # --- retrieval ---------------------------------------------------------------------------

    def resolve_history(self, request: RetrievalRequest, length: int) -> tuple[list[int], list[str], list[float]]:
        """Catalogue indices of the last ``length`` usable items, the ids the model does not know, and
        the usable items' raw ratings (NaN where none). Registered items are known but have no learned
        position in the user model, so they only count as seen."""
        usable = [(self.item_index[item_id], rating) for item_id, rating in zip(request.history, request.history_ratings) if item_id in self.item_index][
            -length:
        ]
        ignored = [item_id for item_id in dict.fromkeys(request.history) if not self.knows(item_id)]
        return [idx for idx, _ in usable], ignored, [rating for _, rating in usable]

    def _rating_offset(self, user_idx: int) -> float:
        return self.rating_offsets[user_idx] if user_idx < len(self.rating_offsets) else 0.0

    def retrieve(self, requests: Sequence[RetrievalRequest], history_length: int, interests_weight: float) -> list[Candidates]:
        """Candidates for a batch of requests: one user-model pass and one index search."""
        resolved = [self.resolve_history(request, history_length) for request in requests]
        user_idx = [self.user_index.get(request.user_id, PAD_INDEX) for request in requests]
        modes: list[Mode | None] = []
        for request, (history, *_), user in zip(requests, resolved, user_idx):
            if history or user != PAD_INDEX:
                modes.append("personal")
            elif request.interests:
                modes.append("interests")
            else:
                modes.append("popular" if request.popular is not None else None)

        searched = [i for i, mode in enumerate(modes) if mode in ("personal", "interests")]
        personal = [i for i in searched if modes[i] == "personal"]
        retrieval_task = self.model.tasks["retrieval"]
        with torch.inference_mode():
            # One user-model pass for the whole batch: ranking reuses its task queries and attention.
            width = max([1, *(len(history) for history, *_ in resolved)])
            inputs = left_pad([history for history, *_ in resolved], width)
            ratings = left_pad(
                [self.rating.apply(np.array(raw, dtype=np.float64), self._rating_offset(user)) for (*_, raw), user in zip(resolved, user_idx)],
                width,
                pad_value=float("nan"),
                dtype=torch.float32,
            )
            users = torch.tensor(user_idx, device=self.device)
            task_queries, contributions = self.model.queries_and_contributions(inputs.to(self.device), users, ratings.to(self.device))
            task_queries, contributions = {name: query.cpu() for name, query in task_queries.items()}, contributions.cpu()
            queries = np.zeros((len(requests), self.keys.shape[1]), dtype=np.float32)
            queries[personal] = retrieval_task.query_embedding(task_queries["retrieval"][personal]).float().numpy()
            task_queries = {name: query.float().numpy() for name, query in task_queries.items()}
            contributions = contributions.float().numpy()
            with_interests = [i for i in searched if requests[i].interests]
            if with_interests:
                interest_queries = retrieval_task.query_embedding(self.encode_texts([requests[i].interests for i in with_interests])).numpy()
                weights = np.array([interests_weight if modes[i] == "personal" else 1.0 for i in with_interests], dtype=np.float32)[:, None]
                queries[with_interests] = (1 - weights) * queries[with_interests] + weights * interest_queries

        # The items a request excludes are searched past, so that num_candidates others come back.
        index_of = self._index_of
        excluded = [np.array([index_of[item_id] for item_id in request.exclude if item_id in index_of], dtype=np.int64) for request in requests]
        top = max((requests[i].num_candidates + len(excluded[i]) for i in searched), default=0)
        scores, found = self.index.search(queries[searched], min(top, self.index.ntotal)) if searched and top else (None, None)
        answers = []
        for i, request in enumerate(requests):
            if modes[i] in ("personal", "interests"):
                row = searched.index(i)
                keep = (found[row] >= 0) & ~np.isin(found[row], excluded[i])
                idx, logits = found[row][keep][: request.num_candidates], scores[row][keep][: request.num_candidates]
            elif modes[i] == "popular":
                skip = set(request.exclude)
                chosen = [(index_of[item_id], count) for item_id, count in request.popular or () if item_id in index_of and item_id not in skip][
                    : request.num_candidates
                ]
                idx = np.array([idx for idx, _ in chosen], dtype=np.int64)
                counts = np.array([count for _, count in chosen], dtype=np.float32)
                logits = counts / max(1.0, float(counts.max(initial=0)))
            else:
                idx, logits = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            pass_of_request = ({name: query[i] for name, query in task_queries.items()}, contributions[i, inputs.shape[1] - len(resolved[i][0]) :])
            answers.append(self._candidates(request, modes[i], user_idx[i], resolved[i], idx, logits, pass_of_request))
        return answers

    def _candidates(
        self,
        request: RetrievalRequest,
        mode: Mode | None,
        user: int,
        resolved: tuple[list[int], list[str], list[float]],
        idx: np.ndarray,
        logits: np.ndarray,
        user_pass: tuple[dict[str, np.ndarray], np.ndarray],
    ) -> Candidates:
        registered = idx > self.num_items
        registration = idx[registered] - self.num_items - 1  # rows of registered_vectors
        local_idx = idx.copy()
        local_idx[registered] = self.num_items + 1 + np.arange(int(registered.sum()))
        return Candidates(
            model=self.path,
            model_version=self.version,
            mode=mode,
            user_idx=user,
            history=resolved[0],
            ignored_history=resolved[1],
            item_idx=local_idx,
            item_ids=self._ids[idx].tolist(),
            titles=self._titles[idx].tolist(),
            years=self._years[idx].tolist(),
            genres=self._genres[idx].tolist(),
            retrieval=logits.astype(np.float32),
            extra_vectors=self.registered_vectors[registration],
            queries=user_pass[0],
            contributions=user_pass[1],
        )

    # --- ranking -----------------------------------------------------------------------------

    def rank(self, batch: Sequence[Candidates], weights: dict[str, float]) -> list[Ranked]:
        """Multi-task scores of a batch of candidate lists, from the user model's pass in retrieval."""
        width = max([1, *(len(c.item_idx) for c in batch)])
        users = torch.tensor([c.user_idx for c in batch], device=self.device)
        queries = {name: torch.from_numpy(np.stack([c.queries[name] for c in batch])).to(self.device) for name in self.model.task_names}
        offsets = np.cumsum([0, *(len(c.extra_vectors) for c in batch)])
        candidates = torch.zeros((len(batch), width), dtype=torch.long)
        for row, c in enumerate(batch):
            shifted = np.where(c.item_idx > self.num_items, c.item_idx + offsets[row], c.item_idx)
            candidates[row, : len(shifted)] = torch.from_numpy(shifted)
        extra = torch.from_numpy(np.concatenate([c.extra_vectors for c in batch])) if offsets[-1] else None
        with torch.inference_mode():
            # The retrieval logit came with the candidates; the attributes task is no part of the score.
            on_device = self.model.score_with_queries(
                queries, users, candidates.to(self.device), extra.to(self.device) if extra is not None else None, tasks=RANKING_TASKS
            )
            scores = {name: value.float().cpu().numpy() for name, value in on_device.items()}
            extra_keys = F.normalize(extra, dim=-1).numpy() if extra is not None else np.zeros((0, self.keys.shape[1]), np.float32)
        all_keys = np.concatenate([self.keys, extra_keys])

        ranked = []
        for row, c in enumerate(batch):
            count = len(c.item_idx)
            keys = all_keys[candidates[row, :count].numpy()]
            p_like = scores["like"][row, :count] if "like" in scores else None
            rating = self.rating.invert(scores["rating"][row, :count], self._rating_offset(c.user_idx)) if "rating" in scores else None
            if c.mode == "popular":
                final = c.retrieval
            else:
                final = weights.get("retrieval", 0.0) * c.retrieval
                final = final + (weights.get("like", 0.0) * p_like if p_like is not None else 0.0)
                final = final + (weights.get("rating", 0.0) * rating if rating is not None else 0.0)
            ranked.append(
                Ranked(
                    model_version=self.version,
                    mode=c.mode,
                    item_ids=c.item_ids,
                    titles=c.titles,
                    years=c.years,
                    genres=c.genres,
                    score=np.asarray(final, dtype=np.float32),
                    p_like=p_like,
                    rating=rating,
                    keys=keys,
                    groups=self._groups[np.where(c.item_idx <= self.num_items, c.item_idx, 0)].tolist(),
                    history_ids=[self.item_ids[i] for i in c.history],
                    history_titles=[self.titles[i] for i in c.history],
                    history_keys=self.keys[c.history],
                    contributions=c.contributions,
                )
            )
        return ranked

    def describe(self) -> dict:
        return {
            "model_version": self.version,
            "path": self.path,
            "metrics": self.metadata.get("metrics", {}),
            "data_manifest_hash": self.metadata.get("data_manifest_hash"),
            "created_at": self.metadata.get("created_at"),
            "num_items": self.num_items,
            "registered_items": self.registry_version,
        }


class ModelCache:
    """The versions a replica holds, keyed by artifact path, least recently used dropped first.
    Loading (seconds) happens outside the lock that guards the dict, so lookups never wait for it."""

    def __init__(self, capacity: int, model_root: str | None, index: IndexConfig | None = None):
        self.capacity = capacity
        self.index = index
        self.model_root = Path(model_root).resolve() if model_root else None
        self.models: OrderedDict[str, ServingModel] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def checked_path(self, path: str) -> str:
        """``path`` made absolute (a URI stays as it is, and is outside any local ``model_root``); InputError if it
        leaves ``model_root``."""
        if "://" in path:
            if self.model_root is not None:
                raise InputError(f"model: {path} is outside model_root {self.model_root}")
            return path
        resolved = Path(path).expanduser().resolve()
        if self.model_root is not None and not resolved.is_relative_to(self.model_root):
            raise InputError(f"model: {path} is outside model_root {self.model_root}")
        return str(resolved)

    def loaded(self, path: str) -> ServingModel | None:
        with self._lock:
            model = self.models.get(path)
            if model is not None:
                self.models.move_to_end(path)
            return model

    def get(self, path: str) -> ServingModel:
        """The version at ``path``, loading it if needed (blocking)."""
        model = self.loaded(path)
        if model is not None:
            return model
        with self._load_lock:
            model = self.loaded(path)
            if model is None:
                model = ServingModel(self.checked_path(path), self.index)
                with self._lock:
                    self.models[path] = model
                    while len(self.models) > self.capacity:
                        self.models.popitem(last=False)
        return model

    def keep_only(self, paths: Sequence[str]) -> None:
        """Load ``paths`` (the versions a reconfigure names) and drop every other version."""
        for path in paths:
            self.get(path)
        with self._lock:
            for path in [path for path in self.models if path not in paths]:
                del self.models[path]
