"""Operator settings + a request's params -> the engine's dataclass configs."""

from __future__ import annotations

from typing import Any

from service.domain.settings import Settings
from workers.engine.config import FusionConfig, LayerConfig, TrainConfig


def layer_config(settings: Settings, params: dict[str, Any]) -> LayerConfig:
    return LayerConfig(kind=params.get("layer") or settings.layer, scope=settings.layer_scope)


def train_config(settings: Settings, method: str, params: dict[str, Any]) -> TrainConfig:
    overrides = {k: params[k] for k in ("lr", "seed") if params.get(k) is not None}
    return TrainConfig(method=method, steps=params.get("steps") or settings.train_steps, **overrides)


def fusion_config(settings: Settings) -> FusionConfig:
    return FusionConfig(ridge=settings.fusion_ridge)
