"""Pass/fail verdict of an unlearning job from its before/after metrics (suite.evaluate outputs).

A job passes when forgetting went far enough and utility did not fall too far:
  forget_nll_ratio       = after.forget.nll / before.forget.nll             >= min_forget_nll_ratio
  forget_rougeL          = after.forget.rougeL (extraction + answer recall) <= max_forget_rougeL
  retain_ppl_increase    = after.retain.ppl / before.retain.ppl - 1         <= max_retain_ppl_increase
  general_ppl_increase   = after.general.ppl / before.general.ppl - 1       <= max_general_ppl_increase
  general_entropy_ratio  = after.general.token_entropy / before...          >= min_token_entropy_ratio
  neighbour_rougeL_drop  = 1 - after.neighbours.rougeL / before...rougeL     <= max_neighbour_drop
The neighbour check reads the request's neighbour probe set (other subjects of the same kind, never
trained on; neighbours.py): forgetting one person must not take the people like them along.
A check whose metric is absent on either side (no retain set, generation off) is skipped, except the
forget NLL check: without it nothing shows that anything was forgotten, so the verdict fails.
Thresholds come from operator settings; a request may override them only within BOUNDS, so no request
can make the verdict vacuous (e.g. accept "forgetting" with no NLL increase).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

BOUNDS: dict[str, tuple[float, float]] = {
    "min_forget_nll_ratio": (1.05, 100.0),
    "max_forget_rougeL": (0.0, 0.9),
    "max_retain_ppl_increase": (0.0, 2.0),
    "max_general_ppl_increase": (0.0, 2.0),
    "min_token_entropy_ratio": (0.5, 1.0),
    "max_neighbour_drop": (0.0, 0.6),
}


@dataclass(frozen=True)
class Thresholds:
    min_forget_nll_ratio: float = 1.25
    max_forget_rougeL: float = 0.4
    max_retain_ppl_increase: float = 0.25
    max_general_ppl_increase: float = 0.15
    min_token_entropy_ratio: float = 0.8
    # The product's goal. The default layer acts only on the sequences its recognisers know (layers/scope.py):
    # 0.00 on the probe set of the subjects measured (benchmarks/results/selectivity.md); applied to every
    # sequence the same layer dropped 0.26-0.44 (scope "all", where an operator may need to raise this).
    max_neighbour_drop: float = 0.1

    def __post_init__(self) -> None:
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                # ValueError, not TypeError: callers turn ValueError into a 422 naming the field
                raise ValueError(f"threshold {name} must be a number, got {value!r}")  # noqa: TRY004
            if not low <= value <= high:
                raise ValueError(f"threshold {name}={value} is outside its allowed bounds [{low}, {high}]")

    def bounded(self, overrides: Mapping[str, Any] | None) -> Thresholds:
        """These thresholds with a request's overrides.

        Unknown names and out-of-bounds values raise ValueError naming the field (and its bounds)."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown threshold(s) {unknown}; known: {sorted(BOUNDS)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def bounded(overrides: Mapping[str, Any] | None, base: Thresholds | None = None) -> Thresholds:
    """(base or default Thresholds).bounded(overrides)."""
    return (base or Thresholds()).bounded(overrides)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric(metrics: Mapping[str, Any], section: str, key: str) -> float | None:
    value = metrics.get(section, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ratio(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= 0:
        return None  # no baseline to compare against: the check is skipped
    return after / before


def _check(value: float | None, limit: float, at_least: bool) -> dict[str, Any] | None:
    if value is None:
        return None
    ok = value >= limit if at_least else value <= limit
    return {"value": value, "limit": limit, "ok": bool(ok)}


def _checks(
    before: Mapping[str, Any], after: Mapping[str, Any], t: Thresholds
) -> dict[str, dict[str, Any] | None]:
    def ratio(section: str, key: str) -> float | None:
        return _ratio(_metric(before, section, key), _metric(after, section, key))

    def increase(section: str, key: str) -> float | None:
        value = ratio(section, key)
        return None if value is None else value - 1.0

    def drop(section: str, key: str) -> float | None:
        value = ratio(section, key)
        return None if value is None else 1.0 - value

    return {
        "forget_nll_ratio": _check(ratio("forget", "nll"), t.min_forget_nll_ratio, at_least=True),
        "forget_rougeL": _check(_metric(after, "forget", "rougeL"), t.max_forget_rougeL, at_least=False),
        "retain_ppl_increase": _check(increase("retain", "ppl"), t.max_retain_ppl_increase, at_least=False),
        "general_ppl_increase": _check(
            increase("general", "ppl"), t.max_general_ppl_increase, at_least=False
        ),
        "general_entropy_ratio": _check(
            ratio("general", "token_entropy"), t.min_token_entropy_ratio, at_least=True
        ),
        "neighbour_rougeL_drop": _check(drop("neighbours", "rougeL"), t.max_neighbour_drop, at_least=False),
    }


def _reason(name: str, check: dict[str, Any]) -> str:
    relation = ">=" if name in ("forget_nll_ratio", "general_entropy_ratio") else "<="
    return f"{name} = {check['value']:.4g}, required {relation} {check['limit']:.4g}"


def judge(
    before: Mapping[str, Any], after: Mapping[str, Any], thresholds: Thresholds | None = None
) -> Verdict:
    """Verdict with every evaluated check ({value, limit, ok}) and a reason per failed one."""
    thresholds = thresholds or Thresholds()
    checks = {name: c for name, c in _checks(before, after, thresholds).items() if c is not None}
    reasons = [_reason(name, c) for name, c in checks.items() if not c["ok"]]
    if "forget_nll_ratio" not in checks:
        reasons.insert(0, "no forget-set NLL before and after: forgetting cannot be shown")
    return Verdict(not reasons, reasons, thresholds.to_dict(), checks)
