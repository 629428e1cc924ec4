"""Second unlearning-layer type: LoRA (via peft) on each FFN block's input projections.

For a projection y = x W^T (+ b) LoRA adds a rank-r update (Hu et al. 2021):

    y = x W^T + (x A^T B^T) * s,      A: (r, in), B: (out, r) = 0 at start, s = alpha / r

As a "linear map" for fusion that is y_delta = x @ D with D = (B A s)^T of shape (in, out) and no bias,
so the same closed-form regression that fuses bottleneck layers fuses LoRA deltas, and the fused
D* merges into the base weights (W += D*^T): zero serving overhead, a plain HF checkpoint.

The base is modified only while attached (peft swaps each projection for a wrapper holding the same
base module); `detach()` puts the original modules back, so the base weights are never copied or
changed. After `load_map_weights` the fused deltas are dense (rank up to min(in, out)) and live in
`DenseDelta` wrappers instead of peft's low-rank ones.

All projections of one block (Llama gate_proj and up_proj) read the same X = the block's input, so
`linear_maps()` returns the FFN block itself for each of them: fusion hooks the block once and shares
the Gram matrix between them.

peft is imported only when a layer is attached for training: serving and exporting a merged version
need none of it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..blocks import ffn_input_projections, find_ffn_blocks
from ..config import LayerConfig
from .base import MergeableLayerType, claim_model, release_model

KIND = "lora"
ADAPTER = "default"  # peft's adapter name


def lora_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """map name "blocks.{i}.{proj}" -> (FFN block, projection child name)."""
    targets: dict[str, tuple[nn.Module, str]] = {}
    for i, block in enumerate(find_ffn_blocks(model)):
        for proj_name in ffn_input_projections(block):
            targets[f"blocks.{i}.{proj_name}"] = (block, proj_name)
    return targets


def projection_shape(projection: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (in, out))."""
    if isinstance(projection, Conv1D):
        return projection.weight.shape[0], projection.weight.shape[1]
    return projection.in_features, projection.out_features


class DenseDelta(nn.Module):
    """base(x) + x @ delta, delta (in, out) fp32: a fused, full-rank LoRA update kept beside the base."""

    def __init__(self, base_layer: nn.Module, delta: Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("delta", delta.float())
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        return (result.float() + x.to(self.delta.dtype) @ self.delta).to(result.dtype)


def lora_delta(wrapper: nn.Module) -> Tensor:
    """D = (B A s)^T, (in, out) fp32, of a peft LoRA wrapper."""
    a = wrapper.lora_A[ADAPTER].weight.detach().float()  # (r, in)
    b = wrapper.lora_B[ADAPTER].weight.detach().float()  # (out, r)
    return (a.t() @ b.t()) * wrapper.scaling[ADAPTER]


class LoraAttachedLayer:
    """LoRA on FFN input projections, with the attached-layer protocol.

    Each target projection is wrapped either by peft (low rank, trainable) or, after load_map_weights,
    by a DenseDelta."""

    kind = KIND

    def __init__(self, model: nn.Module, cfg: LayerConfig, seed: int = 0) -> None:
        self.model, self.cfg = model, cfg
        self.targets = lora_targets(model)
        claim_model(model, self)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._originals = {name: getattr(block, proj) for name, (block, proj) in self.targets.items()}
        try:
            self._inject(seed)
        except Exception:
            self.detach()
            raise

    def _inject(self, seed: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        module_names = {id(m): n for n, m in self.model.named_modules()}
        full_names = [f"{module_names[id(block)]}.{proj}" for block, proj in self.targets.values()]
        has_conv1d = any(isinstance(m, Conv1D) for m in self._originals.values())
        config = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=full_names,
            fan_in_fan_out=has_conv1d,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.model, adapter_name=ADAPTER)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        for param in self.trainable_parameters():
            param.data = param.data.float()  # fp32 adapters on a bf16 base (peft casts x to match)

    def _wrappers(self) -> dict[str, nn.Module]:
        return {name: getattr(block, proj) for name, (block, proj) in self.targets.items()}

    def detach(self) -> None:
        """Put the original projection modules back: the exact base, no weight ever copied."""
        for name, (block, proj) in self.targets.items():
            setattr(block, proj, self._originals[name])
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, False))
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        release_model(self.model)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Bypass the deltas (teacher passes). Flags are set directly: peft's enable_adapters would
        also flip requires_grad on the adapter weights mid-step."""
        wrappers = list(self._wrappers().values())
        previous = [self._is_enabled(w) for w in wrappers]
        for wrapper in wrappers:
            self._set_enabled(wrapper, False)
        try:
            yield
        finally:
            for wrapper, enabled in zip(wrappers, previous):
                self._set_enabled(wrapper, enabled)

    @staticmethod
    def _is_enabled(wrapper: nn.Module) -> bool:
        return wrapper.enabled if isinstance(wrapper, DenseDelta) else not wrapper._disable_adapters

    @staticmethod
    def _set_enabled(wrapper: nn.Module, enabled: bool) -> None:
        if isinstance(wrapper, DenseDelta):
            wrapper.enabled = enabled
        else:
            wrapper._disable_adapters = not enabled

    def trainable_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for wrapper in self._wrappers().values():
            if not isinstance(wrapper, DenseDelta):
                params += [wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight]
        return params

    def state_dict(self) -> dict[str, Tensor]:
        """"{map}.lora_A" (r, in) and "{map}.lora_B" (out, r) while low-rank; "{map}.delta" once dense."""
        state: dict[str, Tensor] = {}
        for name, wrapper in self._wrappers().items():
            if isinstance(wrapper, DenseDelta):
                state[f"{name}.delta"] = wrapper.delta.detach().clone()
            else:
                state[f"{name}.lora_A"] = wrapper.lora_A[ADAPTER].weight.detach().clone()
                state[f"{name}.lora_B"] = wrapper.lora_B[ADAPTER].weight.detach().clone()
        return state

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        if any(key.endswith(".delta") for key in tensors):
            self.load_map_weights({key.removesuffix(".delta"): t for key, t in tensors.items()})
            return
        expected = {f"{n}.lora_{ab}" for n in self.targets for ab in "AB"}
        if set(tensors) != expected:
            raise ValueError(f"LoRA state keys differ from {sorted(expected)[:4]}...")
        with torch.no_grad():
            for name, wrapper in self._wrappers().items():
                wrapper.lora_A[ADAPTER].weight.copy_(tensors[f"{name}.lora_A"])
                wrapper.lora_B[ADAPTER].weight.copy_(tensors[f"{name}.lora_B"])

    def linear_maps(self) -> dict[str, nn.Module]:
        """name -> the FFN block: its forward input is X for every projection of that block."""
        return {name: block for name, (block, _) in self.targets.items()}

    def map_weights(self) -> dict[str, Tensor]:
        """name -> D (in, out) fp32, the dense delta (B A s)^T; no bias row."""
        return {
            name: wrapper.delta.detach().clone() if isinstance(wrapper, DenseDelta) else lora_delta(wrapper)
            for name, wrapper in self._wrappers().items()
        }

    def load_map_weights(self, maps: dict[str, Tensor]) -> None:
        """Replace every projection's update by the given dense delta (in, out)."""
        if set(maps) != set(self.targets):
            raise ValueError(f"map names differ from {sorted(self.targets)[:3]}...")
        for name, (block, proj) in self.targets.items():
            original = self._originals[name]
            expected = projection_shape(original)
            if tuple(maps[name].shape) != expected:
                raise ValueError(f"{name}: delta shape {tuple(maps[name].shape)} != {expected}")
            delta = maps[name].to(device=original.weight.device, dtype=torch.float32)
            setattr(block, proj, DenseDelta(original, delta))


def attach_lora(model: nn.Module, cfg: LayerConfig, seed: int = 0) -> LoraAttachedLayer:
    """Inject LoRA (B = 0: identity at start) into every FFN input projection of model."""
    return LoraAttachedLayer(model, cfg, seed)


def merge_into_base(model: nn.Module, maps: dict[str, Tensor]) -> nn.Module:
    """W += D^T for every map, IN PLACE on a plain (not attached) model; returns it.

    The result is a stock HF model with zero adapter overhead. Pass a copy if the base is needed later.
    """
    targets = lora_targets(model)
    if set(maps) != set(targets):
        raise ValueError(f"map names differ from {sorted(targets)[:3]}...")
    with torch.no_grad():
        for name, (block, proj) in targets.items():
            projection = getattr(block, proj)
            if hasattr(projection, "base_layer"):  # a peft wrapper or a DenseDelta: a layer is attached
                raise RuntimeError("merge_into_base needs a plain model: detach the layer first")
            weight = projection.weight
            delta = maps[name].to(device=weight.device, dtype=torch.float32)  # (in, out)
            update = delta if isinstance(projection, Conv1D) else delta.t()  # weight layout
            weight.copy_((weight.float() + update).to(weight.dtype))
    return model


def lora_parameter_count(model: nn.Module, cfg: LayerConfig) -> int:
    """r * (in + out) per targeted projection."""
    total = 0
    for block, proj in lora_targets(model).values():
        fan_in, fan_out = projection_shape(getattr(block, proj))
        total += cfg.lora_rank * (fan_in + fan_out)
    return total


class MergedLora:
    """Fused LoRA deltas merged into the base weights, with the attached-layer protocol.

    The original weights of the merged projections are kept (on CPU) so that detach() and disabled()
    restore them bit for bit; merging again recomputes W + D^T from them, also bit for bit.
    """

    kind = KIND

    def __init__(self, model: nn.Module, maps: dict[str, Tensor]) -> None:
        self.model = model
        self.targets = lora_targets(model)
        self.maps = {name: t.detach().float().cpu() for name, t in maps.items()}
        self.originals = {name: getattr(block, proj).weight.detach().cpu().clone()
                          for name, (block, proj) in self.targets.items()}
        claim_model(model, self)
        try:
            merge_into_base(self.model, self.maps)
        except Exception:
            release_model(model)
            raise

    def _restore(self) -> None:
        with torch.no_grad():
            for name, (block, proj) in self.targets.items():
                weight = getattr(block, proj).weight
                weight.copy_(self.originals[name].to(weight.device))

    def detach(self) -> None:
        self._restore()
        release_model(self.model)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self._restore()
        try:
            yield
        finally:
            merge_into_base(self.model, self.maps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{name}.delta": t.clone() for name, t in self.maps.items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.load_map_weights({key.removesuffix(".delta"): t for key, t in tensors.items()})

    def linear_maps(self) -> dict[str, nn.Module]:
        return {name: block for name, (block, _) in self.targets.items()}

    def map_weights(self) -> dict[str, Tensor]:
        return {name: t.clone() for name, t in self.maps.items()}

    def load_map_weights(self, maps: dict[str, Tensor]) -> None:
        if set(maps) != set(self.targets):
            raise ValueError(f"map names differ from {sorted(self.targets)[:3]}...")
        self._restore()
        self.maps = {name: t.detach().float().cpu() for name, t in maps.items()}
        merge_into_base(self.model, self.maps)


class LoraType(MergeableLayerType):
    kind = KIND

    def attach(self, model: nn.Module, cfg: LayerConfig, seed: int = 0) -> LoraAttachedLayer:
        return attach_lora(model, cfg, seed)

    def merge(self, model: nn.Module, fused_maps: dict[str, Tensor]) -> MergedLora:
        return MergedLora(model, fused_maps)

    def merged_copy(self, model: nn.Module, fused_maps: dict[str, Tensor]) -> nn.Module:
        return merge_into_base(copy.deepcopy(model), fused_maps)
