"""EUL unlearning layer: a bottleneck adapter after the feed-forward block of every transformer layer.

Chen & Yang 2023, "Unlearn What You Want to Forget: Efficient Unlearning for LLMs" (arXiv 2310.20150):

    F'(h) = h + W_up act(W_down h + b_down) + b_up,     W_down: (r, d), W_up: (d, r), W_up = 0 at start

so an attached, untrained layer leaves the base model's function unchanged. The base is never
modified: the layer lives in forward hooks, so the base's state_dict keys and weights stay exactly as
they were, and `detach()` gives back the bit-identical base.

Not mergeable: the adapter is a nonlinear residual branch that no weight of a stock Llama/GPT-2 block can
express (with the identity activation it can: the `linear` kind, layers/linear.py), so a bottleneck version
is served (and only served) with the unlearn runtime. For serving, `fold_for_serving` moves each adapter into
its block's output projection where that is exact (FoldedProjection: the adapter as three ops on the
projection's output), which costs far less per step than a forward hook and three extra modules, and nothing
on a forward where no sequence is in the layer's scope.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.activations import ACT2FN

from ..blocks import find_ffn_blocks
from ..config import LayerConfig
from .base import LayerType, claim_model, model_device, release_model
from .scope import SequenceScope

KIND = "bottleneck"
ALL_ROWS, SOME_ROWS, NO_ROWS = "all", "some", "none"  # AttachedLayer.rows_on: which rows of a forward are in scope


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream = the FFN block's output width."""
    return model.get_input_embeddings().embedding_dim


def make_activation(name: str) -> nn.Module:
    if name in ("identity", "none"):
        return nn.Identity()
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACT2FN)} or 'identity'")
    return ACT2FN[name]


def linear_to_augmented(linear: nn.Linear) -> Tensor:
    """W_aug = [W^T; b], (in+1, out) fp32, so that linear(x) = [x, 1] @ W_aug."""
    weight_t = linear.weight.detach().float().t()  # (in, out)
    bias = linear.bias.detach().float().unsqueeze(0)  # (1, out)
    return torch.cat([weight_t, bias], dim=0)


def load_augmented(linear: nn.Linear, w_aug: Tensor) -> None:
    expected = (linear.in_features + 1, linear.out_features)
    if tuple(w_aug.shape) != expected:
        raise ValueError(f"map shape {tuple(w_aug.shape)} != {expected}")
    with torch.no_grad():
        w_aug = w_aug.to(device=linear.weight.device, dtype=linear.weight.dtype)
        linear.weight.copy_(w_aug[:-1].t())
        linear.bias.copy_(w_aug[-1])


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))), computed in fp32 whatever the base dtype; up starts at zero.

    gated (layers/gated.py): h -> h + sigmoid(gate(u)) * up(act(down(h))), u the block's input (the normed
    residual stream, which says far more about what is being read than the FFN output h does); the gate a
    linear probe (d -> 1) that the trainer teaches to open on the request's data and stay shut elsewhere.
    Its last values are kept in `gate_values` (B, T, 1) for that loss.
    """

    def __init__(self, dim: int, bottleneck_dim: int, activation: str, gated: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim, bias=True)
        self.act = make_activation(activation)
        self.up = nn.Linear(bottleneck_dim, dim, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = nn.Linear(dim, 1, bias=True) if gated else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.gate_values: Tensor | None = None

    def forward(self, hidden: Tensor, block_input: Tensor | None = None, row_scale: Tensor | None = None
                ) -> Tensor:  # (B, T, d) -> (B, T, d)
        x = hidden.to(self.down.weight.dtype)
        branch = self.up(self.act(self.down(x)))  # (B, T, d)
        if self.gate is not None:
            u = x if block_input is None else block_input.to(x.dtype)
            self.gate_values = torch.sigmoid(self.gate(u))  # (B, T, 1)
            branch = self.gate_values * branch
        return (x + scaled_rows(branch, row_scale)).to(hidden.dtype)


def scaled_rows(branch: Tensor, row_scale: Tensor | None) -> Tensor:
    """branch (B, T, d) with row b times row_scale[b] (layers/scope.py: 1 in scope, 0 not); None = all on."""
    if row_scale is None:
        return branch
    return branch * row_scale.to(branch.dtype).view(-1, *([1] * (branch.dim() - 1)))


class UnlearningLayer(nn.Module):
    """One Bottleneck per FFN block; adapters[i] follows block i."""

    def __init__(self, adapters: list[Bottleneck]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)

    @classmethod
    def create(cls, model: nn.Module, cfg: LayerConfig, seed: int = 0, gated: bool = False) -> UnlearningLayer:
        """fp32 adapters on the model's device; same (model shape, cfg, seed) gives the same init."""
        dim, blocks = hidden_size(model), find_ffn_blocks(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapters = [Bottleneck(dim, cfg.bottleneck_dim, cfg.activation, gated) for _ in blocks]
        return cls(adapters).to(device=model_device(model), dtype=torch.float32)


class AttachedLayer:
    """A bottleneck UnlearningLayer hooked onto a model's FFN outputs."""

    def __init__(self, model: nn.Module, layer: UnlearningLayer, kind: str = KIND) -> None:
        self.kind = kind  # layers/linear.py trains this same layer, linear, as its own kind
        blocks = find_ffn_blocks(model)
        if len(blocks) != len(layer.adapters):
            raise ValueError(f"layer has {len(layer.adapters)} adapters, model has {len(blocks)} FFN blocks")
        claim_model(model, self)
        self.model, self.layer = model, layer
        self._enabled = True
        self.row_scale = None  # (B,) set per forward by a SequenceScope; None = every row
        self.scope: SequenceScope | None = None
        self._folded: list[tuple[nn.Module, str, nn.Linear]] = []  # (block, attribute, original projection)
        self._handles: list[RemovableHandle | None] = [
            block.register_forward_hook(self._hook_for(adapter))
            for block, adapter in zip(blocks, layer.adapters)
        ]

    @property
    def row_scale(self) -> Tensor | None:
        return self._row_scale

    @row_scale.setter
    def row_scale(self, scale: Tensor | None) -> None:
        """Also summarises it once per forward (`rows_on`), so each folded block reads a Python flag instead of
        reducing the tensor itself (30 reductions, and on a GPU 30 syncs, per decode step)."""
        self._row_scale = scale
        if scale is None or bool(scale.all()):
            self.rows_on = ALL_ROWS
        else:
            self.rows_on = SOME_ROWS if bool(scale.any()) else NO_ROWS

    def _hook_for(self, adapter: Bottleneck):
        def hook(_module: nn.Module, args: Any, output: Any) -> Any:
            if not self._enabled:
                return None  # None keeps the block's own output
            block_input = args[0] if args and adapter.gate is not None else None
            if isinstance(output, tuple):  # MoE blocks also return router logits
                return (adapter(output[0], block_input, self.row_scale),) + output[1:]
            return adapter(output, block_input, self.row_scale)

        return hook

    def limit_to_sequences(self, recognisers: Tensor, block: int) -> None:
        """From now on, act only on the sequences the recognisers know (layers/scope.py)."""
        if self.scope is not None:
            raise RuntimeError("this layer already has a sequence scope")
        self.scope = SequenceScope(self.model, self, recognisers, block)

    def detach(self) -> None:
        """Remove the hooks: the model computes exactly what the base computed before attach."""
        if self.scope is not None:
            self.scope.remove()
            self.scope = None
        for handle in self._handles:
            if handle is not None:
                handle.remove()
        self._handles = []
        for block, name, projection in self._folded:
            setattr(block, name, projection)
        self._folded = []
        release_model(self.model)

    def fold_for_serving(self) -> int:
        """Serving copies only (the layer is not trained any more, and `disabled()` no longer bypasses a
        folded block): fold adapter i into block i's output projection wherever the block's output is that
        projection's output, checked numerically on a random input; other blocks keep their hook. Returns
        how many blocks were folded; `detach()` still gives back the exact base."""
        folded = 0
        for i, (block, adapter) in enumerate(zip(find_ffn_blocks(self.model), self.layer.adapters)):
            found = output_projection(block)
            if found is None or self._handles[i] is None or adapter.gate is not None or not act_at_one(adapter.act):
                continue  # a gate reads the block's input, which the output projection never sees
            name, projection = found
            x = torch.randn(1, 3, hidden_size(self.model), device=projection.weight.device)  # (B, T, d)
            with torch.no_grad():
                with self.disabled():
                    expected = adapter(_first(block(x)))
                setattr(block, name, FoldedProjection(projection, adapter, self))
                self._handles[i].remove()
                self._handles[i] = None
                if torch.allclose(_first(block(x)), expected, rtol=1e-4, atol=1e-5):
                    self._folded.append((block, name, projection))
                    folded += 1
                    continue
                setattr(block, name, projection)  # the block does more after its projection: keep the hook
                self._handles[i] = block.register_forward_hook(self._hook_for(adapter))
        return folded

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Bypass the adapters (teacher passes on the same model object)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.layer.parameters())

    @property
    def has_gates(self) -> bool:
        return any(adapter.gate is not None for adapter in self.layer.adapters)

    def gate_loss(self, target: float, mask: Tensor) -> Tensor | None:
        """Binary cross-entropy of every gate's last values against `target` (1: open, 0: shut), mean over
        the gates and the tokens where mask (B, T) is true; None for an ungated layer."""
        values = [a.gate_values for a in self.layer.adapters if a.gate is not None]
        if not values or any(v is None for v in values):
            return None
        gates = torch.stack([v.squeeze(-1) for v in values])  # (L, B, T)
        weight = mask.to(device=gates.device, dtype=gates.dtype).expand_as(gates)  # (L, B, T)
        bce = nn.functional.binary_cross_entropy(gates, torch.full_like(gates, target), reduction="none")
        return (bce * weight).sum() / weight.sum().clamp(min=1.0)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.layer.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.layer.load_state_dict(tensors, strict=True)

    def linear_maps(self) -> dict[str, nn.Module]:
        """name -> module whose forward input is that map's X."""
        maps: dict[str, nn.Module] = {}
        for i, adapter in enumerate(self.layer.adapters):
            maps[f"blocks.{i}.down"] = adapter.down
            maps[f"blocks.{i}.up"] = adapter.up
            if adapter.gate is not None:
                maps[f"blocks.{i}.gate"] = adapter.gate
        return maps

    def map_weights(self) -> dict[str, Tensor]:
        """name -> W_aug (in+1, out) fp32 with y = [x, 1] @ W_aug."""
        return {name: linear_to_augmented(linear) for name, linear in self.linear_maps().items()}

    def load_map_weights(self, maps: dict[str, Tensor]) -> None:
        own = self.linear_maps()
        if set(maps) != set(own):
            raise ValueError(f"map names differ: missing {sorted(set(own) - set(maps))[:3]}, "
                             f"unexpected {sorted(set(maps) - set(own))[:3]}")
        for name, linear in own.items():
            load_augmented(linear, maps[name])


OUTPUT_PROJECTION_NAMES = ("down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2")


def output_projection(block: nn.Module) -> tuple[str, nn.Linear] | None:
    """(attribute, module) of the fp32 nn.Linear that writes an FFN block's output, if it has a known one."""
    for name in OUTPUT_PROJECTION_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
            return name, module
    return None


def act_at_one(act: Callable[[Tensor], Tensor]) -> float:
    """act(1), or 0.0 where that is not a finite non-zero number (FoldedProjection cannot carry b_up then)."""
    value = float(act(torch.ones(1)))
    return value if math.isfinite(value) and value != 0.0 else 0.0


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


SQRT_HALF = math.sqrt(0.5)


def gelu_by_erf(z: Tensor) -> Tensor:
    """z (1 + erf(z)) in two ops: GELU(x) = x/2 (1 + erf(x/sqrt 2)) = sqrt(1/2) g(x sqrt(1/2)), g(z) this.
    A CPU op has a fixed cost, and aten's exact gelu pays several times erf's on a decode step's few units."""
    return torch.addcmul(z, z, torch.erf(z))


def is_exact_gelu(act: nn.Module) -> bool:
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        return bool(torch.allclose(act(probe), 0.5 * probe * (1 + torch.erf(probe * SQRT_HALF)), atol=1e-6))


class FoldedProjection(nn.Module):
    """An FFN output projection followed by its adapter, computed in a few ops on the projection's output:

        h = W x + b                                              # the base projection's own weights, as it does
        a = act([h, 1] @ D)       D = [[A^T, 0], [b_down, 1]]    # (B*T, r + 1): the adapter's down map, plus c
        out = h + (row_scale * a) @ U   U = [W_up^T; b_up / c]   # addmm accumulating into h

    = Bottleneck(h) on in-scope rows, up to float rounding (fewer ops than the hook). h is computed exactly as
    the base projection computes it, so a row out of the layer's scope (row_scale 0) gets what the base model
    computes for it in the same batch, next to rows in scope; a forward where no row is in scope skips the
    adapter. The projection is kept, not changed (a submodule, so copies such as quantized_copy round its
    weight as a file would), and the adapter's weights are copies: `detach()` restores the block as it was.

    Why this shape (issue 14: the default layer's cost, benchmarks/results/serving.md): decoding on a CPU
    streams every weight from memory once per step, and each op and each module call has a fixed cost that
    outweighs a bottleneck's arithmetic, so the adapter costs what it reads plus what it launches. The down
    map reads the d-wide h, not the FFN-wide x; the up bias rides in the up matmul as one more unit whose
    pre-activation is the constant 1 (c = act(1)); the projection is called as F.linear (one module call per
    block, as before the fold); the exact GELU (the default activation) runs as gelu_by_erf with its two
    sqrt(1/2) factors folded into D and U. Rows are scaled only in a batch that mixes rows in and out of scope.
    """

    def __init__(self, projection: nn.Linear, adapter: Bottleneck, owner: AttachedLayer) -> None:
        super().__init__()
        self._owner = [owner]  # its row_scale (a list: not a submodule, not in any state_dict)
        self.projection = projection
        self.act = gelu_by_erf if is_exact_gelu(adapter.act) else adapter.act
        scale = SQRT_HALF if self.act is gelu_by_erf else 1.0  # act(x) = scale * self.act(scale * x)
        with torch.no_grad():
            down = adapter.down.weight.detach().float() * scale  # (r, d)
            constant = act_at_one(self.act)
            if not constant:
                raise ValueError("act(1) must be finite and non-zero to carry the up bias")
            down_t = torch.cat([down.t(), down.new_zeros(down.shape[1], 1)], dim=1)  # (d, r + 1)
            down_bias = torch.cat([adapter.down.bias.detach().float() * scale, down.new_ones(1)])  # (r + 1,)
            up_bias = adapter.up.bias.detach().float() / constant  # (d,)
            up_t = torch.cat([adapter.up.weight.detach().float().t() * scale, up_bias[None]])  # (r + 1, d)
            self.down_t = nn.Parameter(down_t.contiguous(), requires_grad=False)
            self.down_bias = nn.Parameter(down_bias, requires_grad=False)
            self.up_t = nn.Parameter(up_t.contiguous(), requires_grad=False)
        self.out_features = projection.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:  # (B, T, in) -> (B, T, d)
        h = nn.functional.linear(x, self.projection.weight, self.projection.bias)  # (B, T, d)
        owner = self._owner[0]
        if owner.rows_on == NO_ROWS:
            return h
        rows = h.view(-1, self.out_features)  # (B*T, d)
        a = self.act(torch.addmm(self.down_bias, rows, self.down_t))  # (B*T, r + 1)
        if owner.rows_on == SOME_ROWS:
            a = scaled_rows(a.view(*h.shape[:-1], -1), owner.row_scale).view(a.shape)
        return torch.addmm(rows, a, self.up_t).view(h.shape)


def attach(model: nn.Module, layer: UnlearningLayer) -> AttachedLayer:
    """Hook `layer` onto `model` (output of FFN block i -> adapters[i](output))."""
    return AttachedLayer(model, layer)


class BottleneckType(LayerType):
    kind = KIND
    scopable = True

    def attach(self, model: nn.Module, cfg: LayerConfig, seed: int = 0) -> AttachedLayer:
        return attach(model, UnlearningLayer.create(model, cfg, seed))
