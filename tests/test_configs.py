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
