"""The promotion gate of retraining: the candidate version against the serving one, on one evidence base.

Both versions' figures come from the same rows, the candidate's validation split (``train.evaluate.evaluate_on``
carries the serving model over to the candidate's vocabularies by id), so they can be compared directly. The
ranking metric decides; the other tasks are guardrails, so that a candidate which ranks as well but predicts
ratings or likes clearly worse is not promoted. A guardrail on a task either version does not have is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import Field

from common.config import StageConfig
from common.errors import InputError


class GateConfig(StageConfig):
    """How much worse than the serving version a candidate may be on each metric (the retrain config's ``gate``)."""

    #: Allowed drop of validation NDCG@10, the metric that decides.
    ndcg_tolerance: float = Field(0.005, ge=0)
    #: Allowed rise of the rating RMSE (raw rating scale).
    rmse_tolerance: float = Field(0.02, ge=0)
    #: Allowed drop of the like AUC.
    like_auc_tolerance: float = Field(0.01, ge=0)


@dataclass(frozen=True)
class _Criterion:
    metric: str  # a key of train.evaluate.evaluate's figures
    higher_is_better: bool
    tolerance_field: str  # the GateConfig field with the allowed change for the worse
    guardrail: bool  # skipped when a version lacks the metric; the ranking metric must be there


_CRITERIA = (
    _Criterion("NDCG@10", higher_is_better=True, tolerance_field="ndcg_tolerance", guardrail=False),
    _Criterion("rating/rmse", higher_is_better=False, tolerance_field="rmse_tolerance", guardrail=True),
    _Criterion("like/auc", higher_is_better=True, tolerance_field="like_auc_tolerance", guardrail=True),
)


@dataclass(frozen=True)
class GateCheck:
    """One metric's comparison; ``serving`` / ``candidate`` are None where a version lacks the metric."""

    metric: str
    serving: float | None
    candidate: float | None
    tolerance: float
    passed: bool  # a skipped guardrail passes
    skipped: bool = False


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and on which figures (JSON through ``dataclasses.asdict``)."""

    promoted: bool
    reason: str  # one line: the outcome, then every check with both figures
    serving: dict[str, float]
    candidate: dict[str, float]
    checks: list[GateCheck]


def _check(criterion: _Criterion, serving: Mapping[str, float], candidate: Mapping[str, float], config: GateConfig) -> GateCheck:
    tolerance = getattr(config, criterion.tolerance_field)
    before, after = serving.get(criterion.metric), candidate.get(criterion.metric)
    if before is None or after is None:
        if not criterion.guardrail:
            missing = "serving" if before is None else "candidate"
            raise InputError(f"gate: the {missing} version's figures have no {criterion.metric}, which decides promotion")
        return GateCheck(criterion.metric, _figure(before), _figure(after), tolerance, passed=True, skipped=True)
    worsening = before - after if criterion.higher_is_better else after - before
    # A change exactly at the tolerance passes, whatever the last bit of its floating-point difference says.
    passed = worsening <= tolerance or math.isclose(worsening, tolerance, rel_tol=1e-9, abs_tol=1e-12)
    return GateCheck(criterion.metric, float(before), float(after), tolerance, passed)


def _figure(value: float | None) -> float | None:
    return None if value is None else float(value)  # plain floats, for JSON


def _describe(criterion: _Criterion, check: GateCheck) -> str:
    if check.skipped:
        lacking = " and ".join(version for version, value in (("serving", check.serving), ("candidate", check.candidate)) if value is None)
        return f"{check.metric} skipped (the {lacking} version has none)"
    allowed = "drop" if criterion.higher_is_better else "rise"
    return (
        f"{check.metric} serving {check.serving:.4f}, candidate {check.candidate:.4f} (may {allowed} {check.tolerance:g}): {'pass' if check.passed else 'FAIL'}"
    )


def decide(serving: Mapping[str, float], candidate: Mapping[str, float], config: GateConfig) -> GateDecision:
    """Promote the candidate when no check fails: NDCG@10 has not dropped by more than its tolerance, and neither
    guardrail (rating RMSE, like AUC) has moved for the worse by more than its own. Both figure sets must come from
    the same split (``train.evaluate.evaluate_on``)."""
    checks = [_check(criterion, serving, candidate, config) for criterion in _CRITERIA]
    promoted = all(check.passed for check in checks)
    outcome = "promoted" if promoted else "kept the serving version"
    return GateDecision(
        promoted=promoted,
        reason=f"{outcome}: " + "; ".join(_describe(criterion, check) for criterion, check in zip(_CRITERIA, checks)),
        serving={name: float(value) for name, value in serving.items()},
        candidate={name: float(value) for name, value in candidate.items()},
        checks=checks,
    )
