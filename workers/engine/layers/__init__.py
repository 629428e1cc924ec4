"""Unlearning layers, one module per kind (base.py says what a kind implements), looked up by name.

    attached = create_attached(model, cfg, seed)        # fresh, identity at start: train it
    served = attach_fused(model, cfg, fused_maps)       # a version's fused maps on model; served.detach()

Kind names are written once, in config.LAYER_KINDS; the registry is checked against them.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import LAYER_KINDS, LayerConfig
from .base import AttachedLayerProtocol, LayerType
from .bottleneck import BottleneckType
from .gated import GatedType
from .linear import LinearType
from .lora import LoraType
from .scope import scope_block, split_scope

LAYERS: dict[str, LayerType] = {
    layer.kind: layer for layer in (BottleneckType(), LoraType(), LinearType(), GatedType())
}
assert tuple(LAYERS) == LAYER_KINDS, "config.LAYER_KINDS and the layer registry must list the same kinds"


def get_layer(kind: str) -> LayerType:
    if kind not in LAYERS:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {list(LAYER_KINDS)}")
    return LAYERS[kind]


def create_attached(model: nn.Module, cfg: LayerConfig, seed: int = 0) -> AttachedLayerProtocol:
    """A fresh, identity-initialised layer of kind cfg.kind attached to model."""
    return get_layer(cfg.kind).attach(model, cfg, seed)


def attach_fused(model: nn.Module, cfg: LayerConfig, fused_maps: dict[str, Tensor],
                 merge: bool = True) -> AttachedLayerProtocol:
    """`model` (in place) serving a version's fused maps; `.detach()` gives back the exact base.

    The one place fused maps become a served model. A mergeable kind (merge=True) folds them into the
    base weights: zero serving overhead. Otherwise (or merge=False) a layer of the kind is attached and
    loaded with them: for LoRA the same function as merged, with one extra matmul per projection.
    """
    layer = get_layer(cfg.kind)
    maps, recognisers = split_scope(fused_maps)
    scoped = recognisers is not None and cfg.scope == "sequence" and layer.scopable
    if merge and layer.mergeable and not scoped:
        return layer.merge(model, maps)
    attached = layer.attach(model, cfg, seed=0)
    try:
        attached.load_map_weights(maps)
        if scoped:
            attached.limit_to_sequences(recognisers, scope_block(model, cfg.scope_block))
    except Exception:
        attached.detach()
        raise
    return attached


__all__ = ["LAYERS", "AttachedLayerProtocol", "LayerType", "attach_fused", "create_attached", "get_layer"]
