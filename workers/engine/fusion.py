"""Closed-form fusion of unlearning layers (EUL sec. "Fusing unlearning layers", Chen & Yang 2023,
arXiv 2310.20150; the same regression as RegMean, Jin et al. 2023).

For one linear map (y = X W) with per-request weights W_i trained on request i and inputs X_i captured
on request i's data, the fused weights minimise

    sum_i || X_i W - X_i W_i ||^2 + lambda ||W||^2
    =>  W* = (sum_i G_i + lambda I)^-1  sum_i G_i W_i,      G_i = X_i^T X_i

Maps with a bias use X_aug = [X, 1] and W_aug = [W^T; b] (layers/bottleneck.py), so the bias is fused too.
lambda = ridge * mean(diag(sum_i G_i)) (FusionConfig): relative to the activation scale.

Only the running sums sum G_i and sum G_i W_i are kept (FusionState), so fusing request N+1 costs the
same as fusing request 2, and no earlier request's data is needed (their raw payload is deleted).
Withdrawing request k subtracts its own terms (`contribution`, kept sealed by the service) and solves again.

A request's recogniser (layers/scope.py: which sequences the layer acts on) is not regressed: the state keeps
one per request, and the fused maps carry them all (SCOPE_KEY) when every fused request has one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import FusionConfig
from .layers.base import AttachedLayerProtocol, model_device
from .layers.scope import SCOPE_KEY

META_KEY = "__meta__"  # uint8 JSON tensor: request ids and gram sharing survive any tensor store
RECOGNISER_PREFIX = "recogniser."


@dataclass
class FusionState:
    """Running sums over all fused requests, per map name: sum G_i (in', in') and sum G_i W_i (in', out)."""

    gram_sum: dict[str, Tensor] = field(default_factory=dict)
    gram_w_sum: dict[str, Tensor] = field(default_factory=dict)
    n_requests: int = 0
    request_ids: list[str] = field(default_factory=list)
    recognisers: dict[str, Tensor] = field(default_factory=dict)  # request id -> (2d + 1,), those that have one


class _GramAccumulator:
    """Forward pre-hook on one module: accumulates [X, 1]^T [X, 1] in float64 over unmasked tokens."""

    def __init__(self) -> None:
        self.gram: Tensor | None = None  # (in+1, in+1), last row/col = ones column
        self.mask: Tensor | None = None  # (B, T) bool for the batch being run

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0]  # (B, T, in)
        rows = x.reshape(-1, x.shape[-1])  # (B*T, in)
        if self.mask is not None:
            rows = rows[self.mask.reshape(-1)]  # padding positions dropped
        rows = rows.double()
        x_aug = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)  # (N, in+1)
        gram = x_aug.t() @ x_aug
        self.gram = gram if self.gram is None else self.gram + gram


def collect_grams(
    model: nn.Module, attached: AttachedLayerProtocol, batches: Iterable[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Gram matrix of every linear map's input over `batches` (input_ids, attention_mask), float64, CPU.

    (in+1, in+1) for maps whose weight has a bias row (map_weights()[name] has in+1 rows), else (in, in).
    Maps that share an input module (LoRA gate/up) get the same tensor object.
    """
    linear_maps, weights = attached.linear_maps(), attached.map_weights()
    accumulators: dict[int, _GramAccumulator] = {}
    handles = []
    for module in linear_maps.values():
        if id(module) not in accumulators:
            accumulators[id(module)] = _GramAccumulator()
            handles.append(module.register_forward_pre_hook(accumulators[id(module)]))
    device = model_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                for acc in accumulators.values():
                    acc.mask = mask.bool()
                model(input_ids=input_ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return _grams_by_map(linear_maps, weights, accumulators)


def _grams_by_map(linear_maps, weights, accumulators) -> dict[str, Tensor]:
    grams: dict[str, Tensor] = {}
    views: dict[tuple[int, bool], Tensor] = {}
    for name, module in linear_maps.items():
        gram_aug = accumulators[id(module)].gram
        if gram_aug is None:
            raise RuntimeError(f"map {name!r}: its input module never ran; were the batches empty?")
        has_bias = weights[name].shape[0] == gram_aug.shape[0]
        key = (id(module), has_bias)
        if key not in views:
            views[key] = (gram_aug if has_bias else gram_aug[:-1, :-1]).cpu().contiguous()
        grams[name] = views[key]
    return grams


def accumulate(
    state: FusionState | None, grams: dict[str, Tensor], maps: dict[str, Tensor], request_id: str,
    recogniser: Tensor | None = None,
) -> FusionState:
    """New state with request `request_id` (its grams G_i, map weights W_i, recogniser) added; input unchanged."""
    state = state or FusionState()
    if request_id in state.request_ids:
        raise ValueError(f"request {request_id!r} is already fused into this state")
    if state.n_requests and set(grams) != set(state.gram_sum):
        raise ValueError("map names differ from the state's: was the layer kind or shape changed?")
    if set(grams) != set(maps):
        raise ValueError("grams and maps name different linear maps")
    gram_sum, shared = {}, {}
    for name, gram in grams.items():
        previous = state.gram_sum.get(name)
        key = (id(previous), id(gram))  # shared grams stay shared (LoRA gate/up)
        if key not in shared:
            shared[key] = gram.double() if previous is None else previous + gram.double()
        gram_sum[name] = shared[key]
    gram_w_sum = {}
    for name, gram in grams.items():
        gram_w = gram.double() @ maps[name].to(device=gram.device, dtype=torch.float64)  # (in', out)
        previous = state.gram_w_sum.get(name)
        gram_w_sum[name] = gram_w if previous is None else previous + gram_w
    recognisers = dict(state.recognisers)
    if recogniser is not None:
        recognisers[request_id] = recogniser.detach().float().cpu()
    return FusionState(gram_sum, gram_w_sum, state.n_requests + 1, [*state.request_ids, request_id], recognisers)


def contribution(grams: dict[str, Tensor], maps: dict[str, Tensor], request_id: str) -> FusionState:
    """One request's own terms (G_i, G_i W_i): what `remove` takes out of the sums again (withdrawal)."""
    return accumulate(None, grams, maps, request_id)


def remove(state: FusionState, part: FusionState) -> FusionState:
    """New state without the request(s) of `part` (a `contribution`): sum G - G_k, sum G W - G_k W_k.

    The solve over the remaining requests is the one that never saw request k (up to float rounding), so a
    withdrawn request is gone from every map, with no retraining and no other request's data."""
    missing = [r for r in part.request_ids if r not in state.request_ids]
    if missing:
        raise ValueError(f"request(s) {missing} are not fused into this state")
    if set(part.gram_sum) != set(state.gram_sum):
        raise ValueError("map names differ from the state's: was the layer kind or shape changed?")
    remaining = [r for r in state.request_ids if r not in part.request_ids]
    keep = 1.0 if remaining else 0.0  # none left: exact zeros, not rounding residue
    gram_sum, shared = {}, {}
    for name, gram in state.gram_sum.items():
        key = (id(gram), id(part.gram_sum[name]))  # shared grams stay shared (LoRA gate/up)
        if key not in shared:
            shared[key] = (gram.double() - part.gram_sum[name].double()) * keep
        gram_sum[name] = shared[key]
    gram_w_sum = {name: (gw.double() - part.gram_w_sum[name].double()) * keep
                  for name, gw in state.gram_w_sum.items()}
    recognisers = {r: t for r, t in state.recognisers.items() if r in remaining}
    return FusionState(gram_sum, gram_w_sum, len(remaining), remaining, recognisers)


def solve(state: FusionState, cfg: FusionConfig = FusionConfig()) -> dict[str, Tensor]:
    """W* = (sum G_i + lambda I)^-1 sum G_i W_i per map, in float64 (Cholesky); returned as fp32, with the
    requests' recognisers stacked in request order under SCOPE_KEY when every request has one.

    A state whose requests were all removed (withdrawn) solves to zero maps: a layer that changes nothing."""
    if state.n_requests == 0:
        if not state.gram_w_sum:
            raise ValueError("nothing to fuse: the state holds no request")
        return {name: torch.zeros_like(gram_w, dtype=torch.float32) for name, gram_w in state.gram_w_sum.items()}
    factors: dict[int, Tensor] = {}
    fused = {}
    for name, gram in state.gram_sum.items():
        if id(gram) not in factors:
            factors[id(gram)] = _regularised_cholesky(gram, cfg.ridge, name)
        weights = torch.cholesky_solve(state.gram_w_sum[name].double(), factors[id(gram)])
        fused[name] = weights.float()
    if set(state.recognisers) == set(state.request_ids):
        fused[SCOPE_KEY] = torch.stack([state.recognisers[r] for r in state.request_ids])  # (R, 2d + 1)
    return fused


def _regularised_cholesky(gram: Tensor, ridge: float, name: str) -> Tensor:
    gram = gram.double()
    lam = ridge * gram.diagonal().mean()
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise ValueError(f"map {name!r}: Gram + lambda I is not positive definite; raise FusionConfig.ridge")
    return factor


def fuse_request(
    state: FusionState | None,
    grams: dict[str, Tensor],
    maps: dict[str, Tensor],
    request_id: str,
    cfg: FusionConfig = FusionConfig(),
    recogniser: Tensor | None = None,
) -> tuple[FusionState, dict[str, Tensor]]:
    """accumulate + solve: the new running state and the fused map weights for the next version."""
    new_state = accumulate(state, grams, maps, request_id, recogniser)
    return new_state, solve(new_state, cfg)


def state_to_tensors(state: FusionState, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Flat tensors for safetensors: "gram.{k}" (stored once even when shared), "gram_w.{name}",
    "recogniser.{request id}", and META_KEY (JSON: request ids, count, which gram each map uses)."""
    tensors: dict[str, Tensor] = {}
    gram_keys: dict[int, str] = {}
    gram_of: dict[str, str] = {}
    for name, gram in state.gram_sum.items():
        if id(gram) not in gram_keys:
            gram_keys[id(gram)] = f"gram.{name}"
            tensors[f"gram.{name}"] = gram.to(dtype).contiguous()
        gram_of[name] = gram_keys[id(gram)]
    for name, gram_w in state.gram_w_sum.items():
        tensors[f"gram_w.{name}"] = gram_w.to(dtype).contiguous()
    for request_id, recogniser in state.recognisers.items():
        tensors[f"{RECOGNISER_PREFIX}{request_id}"] = recogniser.float().contiguous()
    meta = {"request_ids": state.request_ids, "n_requests": state.n_requests, "gram_of": gram_of}
    tensors[META_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return tensors


def state_from_tensors(tensors: dict[str, Tensor]) -> FusionState:
    meta = json.loads(bytes(tensors[META_KEY].tolist()).decode())
    grams = {key: tensors[key].double() for key in set(meta["gram_of"].values())}
    gram_sum = {name: grams[key] for name, key in meta["gram_of"].items()}
    gram_w_sum = {key.removeprefix("gram_w."): t.double() for key, t in tensors.items()
                  if key.startswith("gram_w.")}
    recognisers = {key.removeprefix(RECOGNISER_PREFIX): t.float() for key, t in tensors.items()
                   if key.startswith(RECOGNISER_PREFIX)}
    return FusionState(gram_sum, gram_w_sum, int(meta["n_requests"]), list(meta["request_ids"]), recognisers)


def save_state(state: FusionState, path: Path) -> None:
    """One safetensors file; the request ids are also in its header metadata, for people reading it."""
    save_file(state_to_tensors(state), str(path), metadata={"request_ids": json.dumps(state.request_ids)})


def load_state(path: Path) -> FusionState:
    return state_from_tensors(load_file(str(path)))
