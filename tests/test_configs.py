"""configs/<stage>.yaml is every stage's typed defaults written out: loading it gives the defaults, and it names
every setting (a knob added to a config class without its line here fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main, stage_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    paths = {prefix} if prefix else set()
    for key, value in node.items():
        paths |= _key_paths(value, f"{prefix}.{key}" if prefix else str(key))
    return paths


@pytest.mark.parametrize("stage", sorted(stage_configs()))
def test_the_stage_file_is_its_defaults_written_out(stage: str) -> None:
    config_class = stage_configs()[stage]
    path = CONFIGS / f"{stage}.yaml"
    assert config_class.from_yaml(path) == config_class()
    written = yaml.safe_load(path.read_text())
    assert _key_paths(written) == _key_paths(config_class().model_dump(mode="json"))


@pytest.mark.parametrize("stage", sorted(stage_configs()))
def test_polyrec_defaults_prints_what_the_stage_loads(stage: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["defaults", stage]) == 0
    printed = tmp_path / f"{stage}.yaml"
    printed.write_text(capsys.readouterr().out)
    assert stage_configs()[stage].from_yaml(printed) == stage_configs()[stage]()


def test_every_config_under_configs_loads() -> None:
    from train.config import TrainConfig

    for path in CONFIGS.glob("train*.yaml"):
        TrainConfig.from_yaml(path)


def test_a_setting_that_contradicts_another_is_refused_in_the_users_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A validator across settings names them in its message; nothing of pydantic's own wording is added."""
    bad = tmp_path / "train.yaml"
    bad.write_text("optimizer:\n  sparse_tables: true\ndeepspeed:\n  zero_stage: 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"polyrec train: error: {bad}: optimizer.sparse_tables: true needs deepspeed.zero_stage 0 and fp32 precision (here stage 2, fp32); use auto or false"
    )


OUT_OF_RANGE = [
    # (stage, YAML, what the error names after "<file>: ")
    ("train", "epochs: 0", "epochs: "),
    ("train", "batch_size: -4", "batch_size: "),
    ("train", "early_stopping_patience: 0", "early_stopping_patience: "),
    ("train", "checkpoints_to_keep: 0", "checkpoints_to_keep: "),
    ("train", "max_failures: -2", "max_failures: "),
    ("train", "seed: -1", "seed: "),
    ("train", "eval_ks: [0, -5]", "eval_ks.0: "),
    ("train", "eval_ks: [5, 20]", "eval_ks: [5, 20] must include 10"),
    ("train", "scaling: {num_workers: 0}", "scaling.num_workers: "),
    ("train", "scaling: {cpus_per_worker: -1}", "scaling.cpus_per_worker: "),
    ("train", "scaling: {use_gpu: true, gpus_per_worker: 0}", "scaling: use_gpu: true needs gpus_per_worker above 0"),
    ("train", "optimizer: {lr: -1}", "optimizer.lr: "),
    ("train", "optimizer: {backbone_lr: 0}", "optimizer.backbone_lr: "),
    ("train", "optimizer: {weight_decay: -0.1}", "optimizer.weight_decay: "),
    ("train", "optimizer: {betas: [0.9, 1.0]}", "optimizer.betas.1: "),
    ("train", "optimizer: {grad_clip: -1}", "optimizer.grad_clip: "),
    ("train", "optimizer: {warmup_steps: -1}", "optimizer.warmup_steps: "),
    ("train", "model: {backbone: {lora_r: 0}}", "model.backbone.lora_r: "),
    ("train", "model: {backbone: {lora_alpha: 0}}", "model.backbone.lora_alpha: "),
    ("train", "model: {backbone: {lora_dropout: 1.0}}", "model.backbone.lora_dropout: "),
    ("train", "model: {backbone: {text_batch_size: 0}}", "model.backbone.text_batch_size: "),
    ("train", "model: {user_model: {hidden_size: 0}}", "model.user_model.hidden_size: "),
    ("train", "model: {user_model: {num_layers: 0}}", "model.user_model.num_layers: "),
    ("train", "model: {user_model: {num_heads: 0}}", "model.user_model.num_heads: "),
    ("train", "model: {user_model: {num_heads: 3}}", "model.user_model: num_heads (3) must divide hidden_size (64)"),
    ("train", "model: {user_model: {dropout: 1}}", "model.user_model.dropout: "),
    ("train", "model: {item_encoder: {id_dropout: -0.1}}", "model.item_encoder.id_dropout: "),
    ("train", "model: {item_encoder: {use_text: false, use_id_embedding: false}}", "model.item_encoder: use_text and use_id_embedding cannot both be off"),
    (
        "train",
        "model: {user_model: {init_from_backbone: true}, item_encoder: {use_text: false}}",
        "model: user_model.init_from_backbone needs item_encoder.use_text",
    ),
    ("train", "model: {towers: {num_experts: 0}}", "model.towers.num_experts: "),
    ("train", "model: {towers: {expert_hidden: 0}}", "model.towers.expert_hidden: "),
    ("train", "model: {tasks: {temperature: 0}}", "model.tasks.temperature: "),
    ("train", "model: {loss_weighting: {static_weights: {retrieval: 1.0, rating: -1}}}", "model.loss_weighting.static_weights.rating: "),
    ("train", "model: {loss_weighting: {gradnorm_alpha: -1}}", "model.loss_weighting.gradnorm_alpha: "),
    ("preprocess", "clean: {min_value: 5, max_value: 1}", "clean: min_value (5.0) is above max_value (1.0)"),
    ("preprocess", "clean: {min_timestamp: 10, max_timestamp: 5}", "clean: min_timestamp (10) is above max_timestamp (5)"),
    ("preprocess", "clean: {max_events_per_user_per_day: 0}", "clean.max_events_per_user_per_day: "),
    ("preprocess", "split: {seed: -1}", "split.seed: "),
    ("preprocess", "ray: {num_partitions: 0}", "ray.num_partitions: "),
    ("preprocess", "source: {columns: {list_separator: ''}}", "source.columns.list_separator: "),
    (
        "preprocess",
        "features: {rating_normalisation: minmax}\nclean: {max_value: null}",
        "features.rating_normalisation: minmax needs clean.min_value < clean.max_value (here 1.0, None)",
    ),
    ("pretrain", "scaling: {num_workers: 0}", "scaling.num_workers: "),
    ("retrain", "train: {model: {user_model: {hidden_size: 48, num_heads: 5}}}", "train.model.user_model: num_heads (5) must divide hidden_size (48)"),
    ("retrain", "preprocess: {clean: {min_value: 5, max_value: 1}}", "preprocess.clean: min_value (5.0) is above max_value (1.0)"),
]


@pytest.mark.parametrize(("stage", "text", "named"), OUT_OF_RANGE, ids=[f"{stage}:{text}" for stage, text, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_is_refused_at_load_naming_the_file_and_setting(stage: str, text: str, named: str, tmp_path: Path) -> None:
    from common.errors import InputError

    path = tmp_path / f"{stage}.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as refused:
        stage_configs()[stage].from_yaml(path)
    assert str(refused.value).startswith(f"{path}: {named}")
    assert "\n" not in str(refused.value)


AT_THE_BOUNDARY = [
    # Each rule across settings at the value it still accepts, and the values that mean "off" or "auto".
    ("train", "model: {user_model: {hidden_size: 48, num_heads: 48}}"),
    ("train", "model: {user_model: {hidden_size: 48, num_heads: 3}}"),
    ("train", "model: {user_model: {num_heads: 3, init_from_backbone: true}}"),  # the backbone's heads are used
    ("train", "model: {item_encoder: {use_text: false}}"),
    ("train", "model: {item_encoder: {use_id_embedding: false}}"),
    ("train", "scaling: {use_gpu: false, gpus_per_worker: 0, cpus_per_worker: 0}"),
    ("train", "scaling: {use_gpu: true, gpus_per_worker: 0.5}"),
    ("train", "eval_ks: [10]"),
    ("train", "epochs: 1\nbatch_size: 1\nearly_stopping_patience: 1\ncheckpoints_to_keep: 1\nmax_failures: -1\nseed: 0"),
    ("train", "optimizer: {grad_clip: 0, warmup_steps: 0, weight_decay: 0, betas: [0, 0.999]}"),
    ("train", "model: {user_model: {dropout: 0}, item_encoder: {id_dropout: 0}, backbone: {lora_dropout: 0, lora_r: 1}, tasks: {temperature: 0.01}}"),
    ("train", "model: {loss_weighting: {static_weights: {retrieval: 1.0, rating: 0, like: 0, attributes: 0}, gradnorm_alpha: 0}}"),
    ("preprocess", "clean: {min_value: 3, max_value: 3, min_timestamp: 5, max_timestamp: 5}"),
    ("preprocess", "clean: {min_value: 5, max_value: null, min_timestamp: null, max_timestamp: -1}"),
    ("preprocess", "clean: {max_events_per_user_per_day: 1}\nsplit: {seed: 0}\nray: {num_partitions: 1}"),
    ("preprocess", "features: {rating_normalisation: minmax}\nclean: {min_value: 0, max_value: 0.5}"),
    ("preprocess", "features: {rating_normalisation: user_center}\nclean: {min_value: null, max_value: null}"),
]


@pytest.mark.parametrize(("stage", "text"), AT_THE_BOUNDARY, ids=[f"{stage}:{text}" for stage, text in AT_THE_BOUNDARY])
def test_a_value_at_the_boundary_of_its_range_is_accepted(stage: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / f"{stage}.yaml"
    path.write_text(text + "\n")
    stage_configs()[stage].from_yaml(path)


def test_an_assignment_out_of_range_is_refused() -> None:
    """validate_assignment: a config changed in code is held to the same ranges as one loaded from a file."""
    from pydantic import ValidationError

    from train.config import TrainConfig

    config = TrainConfig()
    with pytest.raises(ValidationError, match="num_heads \\(3\\) must divide hidden_size \\(64\\)"):
        config.model.user_model.num_heads = 3
    config.model.user_model.hidden_size = 48
    config.model.user_model.num_heads = 3
