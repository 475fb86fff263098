"""The base of every stage's typed config (YAML → pydantic) and the ``ray:`` block they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import InputError


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, YAML errors name the file and field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **overrides: Any) -> Self:
        raw: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if path.is_dir():
                raise InputError(f"{path}: a folder, not a config file")
            if not path.is_file():
                raise InputError(f"config file not found: {path}")
            try:
                raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SettingsLoader) or {}
            except UnicodeDecodeError as err:
                raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            except yaml.YAMLError as err:
                raise InputError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
            if not isinstance(raw, dict):
                raise InputError(f"{path}: the top level must be a mapping of settings")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            where = path or "config"
            raise InputError(f"{where}: {validation_problems(err)}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _SettingsLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping: YAML keeps the last, silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, whose keys the mapping's own override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given a second time", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column), then what."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return str(err).replace("\n", " ")
    what = ", ".join(part for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def validation_problems(err: ValidationError) -> str:
    """A pydantic validation error as one line: each setting at fault, then what is wrong with it."""
    return "; ".join(_problem(error) for error in err.errors())


def _problem(error: dict[str, Any]) -> str:
    """One validation error as the user reads it: the setting, then what is wrong (a validator's own words without
    pydantic's "Value error, "; a validator of a whole section names its settings itself)."""
    raised = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
    message = str(raised) if raised is not None else error["msg"]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message


class RayConfig(StageConfig):
    """Where a stage runs: the ``ray:`` block of every stage's config."""

    address: str | None = None  # a running cluster ("auto", "ray://head:10001"); None: a local Ray instance
    num_cpus: int | None = None  # CPUs a local instance advertises; None: the machine's
