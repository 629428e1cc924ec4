"""Task glue for verification: metrics before (the parent version) vs after (the new fused version) on the
request's forget and retain items, its neighbour probe set and the built-in general set, then the
thresholded verdict (its forget checks against the base model); the forget checks on the new version as
its quantized export holds it; and every earlier request of the lineage re-checked on the new version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.domain.probes import Lineage, OpenedProbe
from service.domain.settings import Settings
from workers.context import WorkerContext
from workers.engine.config import LayerConfig
from workers.engine.data import Example


@dataclass(frozen=True)
class Verification:
    metrics: dict[str, Any]  # {"before", "after", "relearn"?, "earlier_requests"}: the job's evidence
    verdict: dict[str, Any]  # passed, reasons, thresholds, checks (the earlier-requests check among them)
    # request id -> its re-check on the new version; per tenant in the audit trail, never in another's job
    earlier: dict[str, dict[str, Any]]

    @property
    def passed(self) -> bool:
        return bool(self.verdict["passed"])


def operator_thresholds(settings: Settings):
    from workers.engine.verify import Thresholds

    return Thresholds().bounded(settings.thresholds)


def verify(
    ctx: WorkerContext, layer_cfg: LayerConfig, parent_maps: dict[str, torch.Tensor] | None,
    fused_maps: dict[str, torch.Tensor], forget: list[Example], retain: list[Example], params: dict[str, Any],
    neighbours: list[Example] | None = None, lineage: Lineage | None = None,
) -> Verification:
    """The base model itself is never modified.

    neighbours: the request's neighbour probe set (None: no neighbour check). lineage: the earlier requests
    the new version carries (their sealed probes, service/domain/probes.py); one that came back fails it."""
    from workers.engine.layers.scope import scope_evidence
    from workers.engine.verify import evaluate, evaluate_forget, general_set, judge, relearn_probe
    from workers.engine.versions import build_serving_model

    base = ctx.base
    general = general_set()
    # non-members for membership inference: the request's own retain items when it gave some (closest in
    # kind to its forget items), else the built-in general set. With the latter the AUC partly measures
    # a difference of kind, not of membership: read PrivLeak (change vs before) rather than the raw AUC.
    holdout = retain if len(retain) >= 2 else general
    before_model = base.model if parent_maps is None else build_serving_model(base.model, layer_cfg, parent_maps)
    before = evaluate(before_model, base.tokenizer, forget, retain, general, holdout, reference_model=base.model,
                      neighbours=neighbours)
    del before_model
    after_model = build_serving_model(base.model, layer_cfg, fused_maps)
    after = evaluate(after_model, base.tokenizer, forget, retain, general, holdout, reference_model=base.model,
                     neighbours=neighbours)
    # the forget checks measure against the base model, not the parent version: earlier requests can have
    # moved this request's items on the parent already (crosstalk), and a request's evidence must not
    # depend on what happened to be fused before it. The sealed probe keeps this baseline for re-checks.
    base_forget = before["forget"] if parent_maps is None else evaluate_forget(base.model, base.tokenizer, forget)
    metrics: dict[str, Any] = {"before": before, "after": after, "base": {"forget": base_forget},
                               "scope": scope_evidence(after_model, base.tokenizer,
                                                       {"forget": forget, "neighbours": neighbours or []})}
    if params.get("relearn_check"):
        metrics["relearn"] = relearn_probe(after_model, base.tokenizer, None, forget)
    thresholds = operator_thresholds(ctx.settings).bounded(params.get("thresholds"))
    verdict = judge({**before, "forget": base_forget}, after, thresholds).to_dict()
    if ctx.settings.quantized_check != "off":
        verdict = check_quantized(ctx.settings, after_model, base.tokenizer, forget, base_forget,
                                  thresholds, metrics, verdict)
    return _with_rechecks(after_model, base.tokenizer, lineage, metrics, verdict)


def check_quantized(settings: Settings, model: nn.Module, tokenizer: Any, forget: list[Example],
                    before_forget: dict[str, Any], thresholds: Any, metrics: dict[str, Any],
                    verdict: dict[str, Any]) -> dict[str, Any]:
    """The forget checks on the quantized new version, in metrics["quantized"]; the verdict fails on them
    only where the operator requires it (UNLEARN_QUANTIZED_MUST_FORGET)."""
    from workers.engine.verify import quantized_forget

    result = quantized_forget(model, tokenizer, forget, before_forget, thresholds, settings.quantized_check)
    metrics["quantized"] = result
    if not settings.quantized_must_forget:
        return verdict
    checks = {**verdict["checks"], "quantized_forgotten": {"value": int(result["forgotten"]), "limit": 1,
                                                            "ok": result["forgotten"]}}
    reasons = list(verdict["reasons"]) + [f"{result['format']}-quantized model: {reason}"
                                          for reason in result["reasons"]]
    return {**verdict, "passed": not reasons, "reasons": reasons, "checks": checks}


def verify_withdrawal(
    ctx: WorkerContext, layer_cfg: LayerConfig, parent_maps: dict[str, torch.Tensor],
    fused_maps: dict[str, torch.Tensor], withdrawn: OpenedProbe, lineage: Lineage,
) -> Verification:
    """A version without request `withdrawn`: its items measured on the served version and on the new one
    (evidence that its unlearning is gone: metrics.withdrawn), and every remaining request re-checked (the
    verdict: none may come back)."""
    from workers.engine.data import parse_examples
    from workers.engine.verify import evaluate_forget
    from workers.engine.versions import build_serving_model

    base, items = ctx.base, parse_examples(withdrawn.items)
    served = evaluate_forget(build_serving_model(base.model, layer_cfg, parent_maps), base.tokenizer, items)
    after_model = build_serving_model(base.model, layer_cfg, fused_maps)
    after = evaluate_forget(after_model, base.tokenizer, items)
    before = withdrawn.baseline["before"]
    metrics: dict[str, Any] = {"withdrawn": {
        "before_unlearning": _headline(before), "served": _headline(served), "after": _headline(after),
        "nll_ratio_to_before_unlearning": after["nll"] / before["nll"] if before.get("nll") else None,
    }}
    verdict = {"passed": True, "reasons": [], "thresholds": {}, "checks": {}}
    return _with_rechecks(after_model, base.tokenizer, lineage, metrics, verdict)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("nll", "rougeL") if k in metrics}


def _with_rechecks(model: nn.Module, tokenizer: Any, lineage: Lineage | None, metrics: dict[str, Any],
                   verdict: dict[str, Any]) -> Verification:
    """Every other request of the new version re-checked on it; one that came back fails the verdict. The
    job keeps only the counts: each result belongs to its own tenant (publishing.record_rechecks)."""
    lineage = lineage or Lineage()
    earlier = {probe.request_id: reverify(model, tokenizer, probe) for probe in lineage.opened}
    came_back = sorted(request_id for request_id, result in earlier.items() if not result["passed"])
    metrics["earlier_requests"] = {"checked": len(earlier), "came_back": len(came_back),
                                   "not_reverifiable": len(lineage.unverifiable)}
    checks, reasons = dict(verdict["checks"]), list(verdict["reasons"])
    if earlier:
        checks["earlier_requests_came_back"] = {"value": len(came_back), "limit": 0, "ok": not came_back}
    if came_back:
        reasons.append(f"{len(came_back)} of {len(earlier)} earlier requests in this version came back "
                       "(their forget checks fail on it; the audit trail of their tenants has the details)")
    return Verification(metrics, {**verdict, "passed": not reasons, "reasons": reasons, "checks": checks}, earlier)


def reverify(model: nn.Module, tokenizer: Any, probe: OpenedProbe) -> dict[str, Any]:
    """An earlier request's forget checks on `model`, against what it was accepted on: its forget metrics on
    the base model and its own thresholds (the NLL ratio and ROUGE-L checks of the verdict)."""
    from workers.engine.data import parse_examples
    from workers.engine.verify import Thresholds, evaluate_forget, judge

    after = evaluate_forget(model, tokenizer, parse_examples(probe.items))
    thresholds = Thresholds(**probe.baseline["thresholds"])
    verdict = judge({"forget": probe.baseline["before"]}, {"forget": after}, thresholds)
    return {"tenant": probe.tenant, "passed": verdict.passed, "reasons": verdict.reasons, "checks": verdict.checks,
            "forget_after": {k: after[k] for k in ("nll", "rougeL") if k in after}}
