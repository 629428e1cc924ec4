"""Task glue for verification: metrics before (the parent version) vs after (the new fused version) on the
request's forget and retain items, its neighbour probe set and the built-in general set, then the
thresholded verdict."""

from __future__ import annotations

from typing import Any

import torch

from service.domain.settings import Settings
from workers.context import WorkerContext
from workers.engine.config import LayerConfig
from workers.engine.data import Example


def operator_thresholds(settings: Settings):
    from workers.engine.verify import Thresholds

    return Thresholds().bounded(settings.thresholds)


def verify(
    ctx: WorkerContext, layer_cfg: LayerConfig, parent_maps: dict[str, torch.Tensor] | None,
    fused_maps: dict[str, torch.Tensor], forget: list[Example], retain: list[Example], params: dict[str, Any],
    neighbours: list[Example] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics {"before", "after", "relearn"?}, verdict dict). The base model itself is never modified.

    neighbours: the request's neighbour probe set (None: no neighbour check)."""
    from workers.engine.verify import evaluate, general_set, judge, relearn_probe
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
    metrics: dict[str, Any] = {"before": before, "after": after}
    if params.get("relearn_check"):
        metrics["relearn"] = relearn_probe(after_model, base.tokenizer, None, forget)
    thresholds = operator_thresholds(ctx.settings).bounded(params.get("thresholds"))
    verdict = judge(before, after, thresholds)
    return metrics, {"passed": verdict.passed, "reasons": verdict.reasons, "thresholds": verdict.thresholds,
                     "checks": verdict.checks}
