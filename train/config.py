"""The training stage's typed configuration (YAML → pydantic). Every default runs on a 2-core CPU."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from common.config import RayConfig, StageConfig

#: The K of the validation metric that selects the best checkpoint and stops early (``train.trainer.SELECTION_METRIC``).
SELECTION_K = 10


class BackboneConfig(StageConfig):
    #: A Hugging Face model folder; None: the packaged all-MiniLM-L6-v2.
    name_or_path: str | None = None
    #: Build a randomly initialised model from this config dict instead of loading weights
    #: (tests: tiny BERT / Llama / Qwen2 configs). Keys as in ``transformers.AutoConfig.for_model``.
    random_init_config: dict | None = None
    mode: Literal["frozen", "lora", "full"] = "frozen"
    pooling: Literal["mean", "last", "cls"] = "mean"
    gradient_checkpointing: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | None = None  # None: peft's default for the architecture
    text_batch_size: int = Field(256, ge=1)  # items per forward pass when (re)computing the item table


class UserModelConfig(StageConfig):
    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(2, ge=1)
    #: Attention heads; each gets hidden_size / num_heads dimensions. With ``init_from_backbone`` the backbone's.
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    #: Longest history (items) the learned position embeddings cover.
    max_positions: int = Field(256, ge=1)
    #: Initialise the user transformer from the backbone's first layers (same width required).
    init_from_backbone: bool = False
    #: The ratings of the history are input too (a user's recent ratings say more about their next
    #: one than their average does); positions without a rating (clicks, views) get none.
    rating_input: bool = True
    #: Share of the history's ratings hidden in training, so that a history of clicks alone, as
    #: served feedback often is, is not new to the model.
    rating_dropout: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_split_the_width(self) -> UserModelConfig:
        if not self.init_from_backbone and self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class ItemEncoderConfig(StageConfig):
    use_text: bool = True
    use_id_embedding: bool = True
    id_dropout: float = Field(0.1, ge=0, lt=1)  # share of id embeddings zeroed in training: text alone must work

    @model_validator(mode="after")
    def _some_item_input(self) -> ItemEncoderConfig:
        if not (self.use_text or self.use_id_embedding):
            raise ValueError("use_text and use_id_embedding cannot both be off")
        return self


class TowerConfig(StageConfig):
    kind: Literal["mmoe", "shared_bottom"] = "mmoe"
    num_experts: int = Field(4, ge=1)
    expert_hidden: int = Field(128, ge=1)


class TaskConfig(StageConfig):
    retrieval: bool = True
    rating: bool = True
    like: bool = True
    attributes: bool = True
    #: "full": softmax over the whole catalogue; "sampled": sampled softmax with logQ correction (the batch's
    #: targets plus ``num_sampled_negatives`` uniform negatives), whose step touches only the items it samples;
    #: "auto": full up to ``full_softmax_max_items`` catalogue items, sampled above (see ``sampled_retrieval``).
    retrieval_loss: Literal["auto", "full", "sampled"] = "auto"
    #: The largest catalogue "auto" trains with the full softmax. A full-softmax step costs time and memory in
    #: proportion to the catalogue (every item's vector with gradients, [targets, items] logits, the history mask),
    #: a sampled one does not: on ml-100k's shape of interactions bench/scale.py measured a full step at several times
    #: a sampled one from 5k items on, 27x at 100k (bench/RESULTS.md, "Scale: catalogues"). Up to this the full
    #: softmax is affordable, and it keeps the quality every benchmark on ml-100k (1.7k items) measured with it.
    full_softmax_max_items: int = Field(5_000, ge=0)
    num_sampled_negatives: int = Field(512, ge=1)
    temperature: float = Field(0.1, gt=0)
    #: The retrieval loss leaves out items already in the history before each target (the target
    #: itself stays), as evaluation masks them: the model is not taught to push down what the user
    #: just watched, which on catalogues without repeats costs it the items most like their taste.
    mask_history: bool = True
    #: The rating task's user bias follows the user's recent ratings (a time-aware b_u, as in Koren's
    #: timeSVD++): the history's rating residuals, weighted by a learned decay per step back.
    rating_recency: bool = True

    def sampled_retrieval(self, num_items: int) -> bool:
        """Whether the retrieval loss over a catalogue of ``num_items`` items is the sampled softmax."""
        if self.retrieval_loss == "auto":
            return num_items > self.full_softmax_max_items
        return self.retrieval_loss == "sampled"


class LossWeightingConfig(StageConfig):
    # Static by default: uncertainty weighting drives each weight to 1 / loss, so the main task, retrieval (a softmax
    # over the whole catalogue, by far the largest loss), gets the smallest weight and ranking quality drops with it
    # (bench/RESULTS.md has the comparison).
    method: Literal["static", "uncertainty", "gradnorm"] = "static"
    static_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: {"retrieval": 1.0, "rating": 0.5, "like": 0.5, "attributes": 0.1})
    gradnorm_alpha: float = Field(1.5, ge=0)


class ModelConfig(StageConfig):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    item_encoder: ItemEncoderConfig = Field(default_factory=ItemEncoderConfig)
    user_model: UserModelConfig = Field(default_factory=UserModelConfig)
    towers: TowerConfig = Field(default_factory=TowerConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    loss_weighting: LossWeightingConfig = Field(default_factory=LossWeightingConfig)

    @model_validator(mode="after")
    def _backbone_layers_need_text(self) -> ModelConfig:
        if self.user_model.init_from_backbone and not self.item_encoder.use_text:
            raise ValueError("user_model.init_from_backbone needs item_encoder.use_text (the backbone is loaded only for text)")
        return self


class OptimizerConfig(StageConfig):
    lr: float = Field(2e-3, gt=0)
    backbone_lr: float = Field(2e-5, gt=0)  # for lora / full modes
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)
    grad_clip: float = Field(1.0, ge=0)  # the largest gradient norm; 0: no clipping
    warmup_steps: int = Field(50, ge=0)
    #: After the warm-up: "constant", or "cosine" decay to ``min_lr_ratio`` × lr at the last configured epoch.
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    #: The per-item and per-user tables (id embeddings, biases) get sparse gradients and a row-wise Adam
    #: (``torch.optim.SparseAdam``, on the same learning-rate schedule) that updates only the rows a step touched.
    #: A dense AdamW zeroes, fills and updates every row each step: from 1.7k to 1M items the sampled step grew 6.7x with
    #: dense tables, 1.1x with sparse ones (bench/RESULTS.md, "Scale: catalogues"). The tables get no weight decay then. "auto": on with the sampled
    #: retrieval loss (a full softmax touches every item's row each step anyway), where DeepSpeed reduces sparse
    #: gradients: ZeRO stage 0 in fp32, i.e. CPU training (on a GPU the dense update is cheap). true: always, false: never.
    sparse_tables: Literal["auto"] | bool = "auto"


class DeepSpeedConfig(StageConfig):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False
    #: Extra keys merged into the generated DeepSpeed config (production tuning).
    extra: dict = Field(default_factory=dict)


class ScalingConfig(StageConfig):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)  # 0: the workers reserve no CPU (Ray's way for GPU workers)
    gpus_per_worker: float = Field(1.0, ge=0)  # with use_gpu

    @model_validator(mode="after")
    def _gpu_workers_get_gpus(self) -> ScalingConfig:
        if self.use_gpu and self.gpus_per_worker == 0:
            raise ValueError("use_gpu: true needs gpus_per_worker above 0")
        return self

    def for_ray_train(self) -> ray.train.ScalingConfig:  # noqa: F821 (imported here: configs load without Ray Train)
        import ray.train

        resources = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker} if self.use_gpu else {"CPU": self.cpus_per_worker}
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=resources)


class TrackingConfig(StageConfig):
    """Where training and retraining runs are tracked (MLflow): parameters, per-epoch metrics, plots and reports."""

    enabled: bool = True
    #: An MLflow tracking URI (http://, sqlite://, databricks), or a folder for a local store (its ``mlflow.db`` and
    #: ``artifacts/``); None: ``mlruns`` in the run folder, the folder that holds the training output (and, when
    #: retraining, the retrain output): ``runs/default/mlruns`` for the defaults.
    uri: str | None = None
    experiment: str = "polyrec"
    #: The registry's model that each version retraining promotes becomes a version of, with the gate's decision.
    registered_model: str = "polyrec"


class TrainConfig(StageConfig):
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    data: str = "runs/default/data"  # preprocessing output (path or URI)
    output: str = "runs/default/model"  # checkpoints, artifact, plots (path or URI)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker, in training windows
    #: Each training window holds at most max_history + 1 items and trains the next-item targets of its last
    #: ``window_targets`` positions (at most max_history), so every target has at least max_history -
    #: window_targets + 1 items before it; fewer targets per window: more context, more windows per epoch.
    window_targets: int = Field(25, ge=1)
    early_stopping_patience: int = Field(10, ge=1)  # epochs without a better validation NDCG@10; the cosine decay pays off late
    #: Each epoch's validation (which selects the best checkpoint and stops early) scores this many rows of the
    #: validation split, the same random sample every epoch and run, when the split has more; None: every row. At
    #: 20,000 the standard error of NDCG@10 is at most 0.0035 (a row's NDCG lies in [0, 1]), while the 162,000 rows
    #: of an ML-25M-sized split made every epoch's validation eight times as long. The artifact's validation figures
    #: are the sample's; the test split, and ``polyrec evaluate``, score every row.
    validation_sample_rows: int | None = Field(20_000, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)  # the best by validation NDCG@10; the latest is always kept too
    max_failures: int = Field(1, ge=-1)  # worker crashes recovered from the latest checkpoint; -1: no limit (Ray's)
    resume_from: str | None = None  # a checkpoint path to start from
    #: A model artifact to initialise weights from (retraining); its per-item and per-user rows are matched by id.
    warm_start_from: str | None = None
    #: The K of HR@K, NDCG@K and MRR@K; 10 must be one of them, as validation NDCG@10 selects the best checkpoint.
    eval_ks: list[PositiveInt] = Field(default_factory=lambda: [10, 20])
    #: Variants trained after the model with the same settings and evaluated beside it on the test split:
    #: "id_only" switches item text off (the ablation that shows what the language model adds).
    ablations: list[Literal["id_only"]] = Field(default_factory=list)
    seed: int = Field(0, ge=0)
    run_name: str = "polyrec"  # prefix of this run's folder under <output>/ray_results (a new folder per run)
    model_version: str | None = None  # None: a timestamp
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        if self.deepspeed.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.deepspeed.precision

    @property
    def sparse_tables_supported(self) -> bool:
        """Whether DeepSpeed reduces sparse gradients in this setting: ZeRO stage 0 and fp32 (its other optimizers
        flatten every gradient into dense buffers)."""
        return self.deepspeed.zero_stage == 0 and self.precision == "fp32"

    @field_validator("eval_ks")
    @classmethod
    def _selection_metric_evaluated(cls, ks: list[int]) -> list[int]:
        if SELECTION_K not in ks:
            raise ValueError(f"{ks} must include {SELECTION_K} (validation NDCG@{SELECTION_K} selects the best checkpoint)")
        return ks

    @model_validator(mode="after")
    def _sparse_tables_fit(self) -> TrainConfig:
        if self.optimizer.sparse_tables is True and not self.sparse_tables_supported:
            raise ValueError(
                f"optimizer.sparse_tables: true needs deepspeed.zero_stage 0 and fp32 precision (here stage "
                f"{self.deepspeed.zero_stage}, {self.precision}); use auto or false"
            )
        return self
