"""What every kind of unlearning layer implements, and the model helpers the kinds share.

A kind (bottleneck.py, linear.py, lora.py, gated.py; registry in __init__.py) is a LayerType: it attaches a fresh,
identity-initialised layer to a model (training), and says whether its fused maps can be merged into the
base weights (zero serving overhead, a plain Hugging Face export) or must stay attached at serving time.

An attached layer (AttachedLayerProtocol) is what the trainer, fusion, store and server see. Fusion
(fusion.py) only uses `linear_maps()` / `map_weights()` / `load_map_weights()`: each "linear map" is one
y = [x, 1] @ W_aug (bias row last) or y = x @ W (no bias) whose input x can be captured with a forward
pre-hook on the module `linear_maps()[name]`. The fused maps of a version are that same dict, so the
served model of a version is "attach the kind, load the fused maps" (or merge them, where the kind can).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..config import LayerConfig

_ATTACHED_FLAG = "_unlearn_attached_layer"


@runtime_checkable
class AttachedLayerProtocol(Protocol):
    """What the trainer, fusion, store and server need from an attached unlearning layer."""

    kind: str

    def detach(self) -> None: ...
    def disabled(self) -> AbstractContextManager[None]: ...
    def trainable_parameters(self) -> list[nn.Parameter]: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, tensors: dict[str, Tensor]) -> None: ...
    def linear_maps(self) -> dict[str, nn.Module]: ...
    def map_weights(self) -> dict[str, Tensor]: ...
    def load_map_weights(self, maps: dict[str, Tensor]) -> None: ...


class LayerType(ABC):
    """One kind of unlearning layer. `mergeable` kinds also implement MergeableLayerType."""

    kind: ClassVar[str]
    mergeable: ClassVar[bool] = False
    scopable: ClassVar[bool] = False  # its attached layer can act per sequence (limit_to_sequences, scope.py)

    @abstractmethod
    def attach(self, model: nn.Module, cfg: LayerConfig, seed: int = 0) -> AttachedLayerProtocol:
        """A fresh layer on `model` that leaves its function unchanged until trained; same seed, same init."""


class MergeableLayerType(LayerType):
    """A kind whose fused maps fold into the base weights: served with no extra modules, exported as a
    stock checkpoint."""

    mergeable: ClassVar[bool] = True

    @abstractmethod
    def merge(self, model: nn.Module, fused_maps: dict[str, Tensor]) -> AttachedLayerProtocol:
        """The maps merged into `model`'s weights in place; `.detach()` restores the base bit for bit."""

    @abstractmethod
    def merged_copy(self, model: nn.Module, fused_maps: dict[str, Tensor]) -> nn.Module:
        """A copy of `model` with the maps merged in for good: a stock model of its class (what `unlearn
        export` saves); `model` itself is not changed."""


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def claim_model(model: nn.Module, owner: Any) -> None:
    """Only one unlearning layer may be attached to a model at a time."""
    if getattr(model, _ATTACHED_FLAG, None) is not None:
        raise RuntimeError("an unlearning layer is already attached to this model; detach it first")
    setattr(model, _ATTACHED_FLAG, owner)


def release_model(model: nn.Module) -> None:
    if hasattr(model, _ATTACHED_FLAG):
        delattr(model, _ATTACHED_FLAG)
