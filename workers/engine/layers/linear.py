"""Mergeable EUL layer: the bottleneck adapter with no nonlinearity, merged into each FFN output projection.

Chen & Yang 2023 (arXiv 2310.20150) put a bottleneck h + W_up act(W_down h + b_down) + b_up after every
feed-forward block (layers/bottleneck.py). With act = identity the branch is linear, and so is the adapted
block output:

    F(h) = h + W_up (W_down h + b_down) + b_up = M h + c,    M = I + W_up W_down (d, d),  c = W_up b_down + b_up

and since h = W x + b is the block's output projection, F(h) = (M W) x + (M b + c): the adapter merges into
that projection. A version is served with no extra module or matmul, and exported as a stock Hugging Face
checkpoint (a Llama-like model whose projections have no bias gets `mlp_bias=True` for c; the gate/up biases
it adds are zero).

Training and fusion are the bottleneck's, with the activation forced to identity: same map names and shapes,
so the closed-form fusion of the maps fuses the merged layers too (a linear branch fused map by map stays
linear).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..blocks import UnsupportedModelError, find_ffn_blocks
from ..config import LayerConfig
from .base import MergeableLayerType, claim_model, release_model
from .bottleneck import OUTPUT_PROJECTION_NAMES, AttachedLayer, UnlearningLayer, hidden_size

KIND = "linear"
PROJECTION_NAMES = (*OUTPUT_PROJECTION_NAMES, "c_proj")  # + GPT-2's Conv1D


def linear_cfg(cfg: LayerConfig) -> LayerConfig:
    return replace(cfg, kind=KIND, activation="identity")


def merge_target(block: nn.Module, dim: int) -> tuple[str, nn.Module]:
    """(attribute, module) of the nn.Linear or Conv1D whose output is the FFN block's output, checked on a
    random input of width `dim` (a block that does more after its projection cannot take the merge)."""
    for name in PROJECTION_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, (nn.Linear, Conv1D)) and _writes_block_output(block, module, dim):
            return name, module
    raise UnsupportedModelError(f"{type(block).__name__}: no output projection named one of {PROJECTION_NAMES} "
                                "writes the block's output, so the linear layer cannot be merged into it")


def _writes_block_output(block: nn.Module, projection: nn.Module, dim: int) -> bool:
    seen: list[Tensor] = []
    handle = projection.register_forward_hook(lambda _module, _args, output: seen.append(output))
    x = torch.randn(1, 3, dim, device=projection.weight.device, dtype=projection.weight.dtype)  # (B, T, d)
    try:
        with torch.no_grad():
            output = block(x)
    finally:
        handle.remove()
    output = output[0] if isinstance(output, tuple) else output
    return len(seen) == 1 and torch.equal(output, seen[0])


def merged_projection(projection: nn.Module, down_aug: Tensor, up_aug: Tensor) -> nn.Module:
    """A new projection (same type, dtype, device; always with a bias) computing F(projection(x)).

    down_aug (d+1, r) = [W_down^T; b_down] and up_aug (r+1, d) = [W_up^T; b_up], the bottleneck's fused maps.
    """
    with torch.no_grad():
        down_t, b_down = down_aug[:-1].float(), down_aug[-1].float()  # (d, r), (r,)
        up_t, b_up = up_aug[:-1].float(), up_aug[-1].float()  # (r, d), (d,)
        m_row = torch.eye(down_t.shape[0]) + down_t @ up_t  # (d, d): F(h) = h @ m_row + c for a row h
        c = b_down @ up_t + b_up  # (d,)
        weight = projection.weight.detach().float().cpu()
        bias = projection.bias.detach().float().cpu() if projection.bias is not None else torch.zeros(m_row.shape[0])
        if isinstance(projection, Conv1D):  # y = x @ W + b, W (in, d)
            merged = Conv1D(weight.shape[1], weight.shape[0])
            merged.weight.copy_(weight @ m_row)
        else:  # y = x @ W^T + b, W (d, in)
            merged = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
            merged.weight.copy_(m_row.t() @ weight)
        merged.bias.copy_(bias @ m_row + c)
    return merged.to(device=projection.weight.device, dtype=projection.weight.dtype).requires_grad_(False)


def _maps_of(maps: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor]:
    return maps[f"blocks.{i}.down"], maps[f"blocks.{i}.up"]


class MergedLinear:
    """Fused linear maps merged into the FFN output projections, with the attached-layer protocol.

    Each merged block gets a new projection module; the original is kept, so detach() and disabled() put
    the exact base back."""

    kind = KIND

    def __init__(self, model: nn.Module, maps: dict[str, Tensor]) -> None:
        self.model = model
        self.blocks = find_ffn_blocks(model)
        expected = {f"blocks.{i}.{part}" for i in range(len(self.blocks)) for part in ("down", "up")}
        if set(maps) != expected:
            raise ValueError(f"map names differ from {sorted(expected)[:3]}...")
        self.maps = {name: t.detach().float().cpu() for name, t in maps.items()}
        self.originals = [merge_target(block, hidden_size(model)) for block in self.blocks]
        self.merged = [merged_projection(proj, *_maps_of(self.maps, i)) for i, (_, proj) in enumerate(self.originals)]
        claim_model(model, self)
        self._install(self.merged)

    def _install(self, projections: list[nn.Module]) -> None:
        for block, (name, _), projection in zip(self.blocks, self.originals, projections):
            setattr(block, name, projection)

    def detach(self) -> None:
        self._install([proj for _, proj in self.originals])
        release_model(self.model)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self._install([proj for _, proj in self.originals])
        try:
            yield
        finally:
            self._install(self.merged)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.clone() for name, t in self.maps.items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.load_map_weights(tensors)

    def linear_maps(self) -> dict[str, nn.Module]:
        raise NotImplementedError("a merged layer is served, not fused: fuse the trained (attached) layers")

    def map_weights(self) -> dict[str, Tensor]:
        return self.state_dict()

    def load_map_weights(self, maps: dict[str, Tensor]) -> None:
        self.detach()
        self.__init__(self.model, maps)


def give_mlp_bias(model: nn.Module) -> None:
    """A stock Llama-like class only has biases in its MLP with `config.mlp_bias`, and then on every
    projection: set it, and give the other projections zero biases so the checkpoint loads as saved."""
    if not hasattr(model.config, "mlp_bias"):
        raise UnsupportedModelError(f"{type(model).__name__}: its FFN output projection has no bias and its "
                                    "config has no mlp_bias, so a stock checkpoint cannot hold the merged layer")
    model.config.mlp_bias = True
    for block in find_ffn_blocks(model):
        for child in block.children():
            if isinstance(child, nn.Linear) and child.bias is None:
                child.bias = nn.Parameter(child.weight.new_zeros(child.out_features), requires_grad=False)


class LinearType(MergeableLayerType):
    kind = KIND
    scopable = True

    def attach(self, model: nn.Module, cfg: LayerConfig, seed: int = 0) -> AttachedLayer:
        """The bottleneck, linear: trained and fused as one."""
        return AttachedLayer(model, UnlearningLayer.create(model, linear_cfg(cfg), seed), kind=KIND)

    def merge(self, model: nn.Module, fused_maps: dict[str, Tensor]) -> MergedLinear:
        return MergedLinear(model, fused_maps)

    def merged_copy(self, model: nn.Module, fused_maps: dict[str, Tensor]) -> nn.Module:
        merged = copy.deepcopy(model)
        layer = MergedLinear(merged, fused_maps)  # kept merged for good: the copy is the exported model
        release_model(merged)
        if any(projection.bias is None for _, projection in layer.originals):
            give_mlp_bias(merged)
        return merged


__all__ = ["KIND", "LinearType", "MergedLinear", "merged_projection"]
