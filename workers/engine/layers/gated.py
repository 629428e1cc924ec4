"""Gated EUL layer: the bottleneck adapter behind a learned gate that opens only on the request's data.

GRUN (Ren et al. 2025, "A General Framework to Enhance Fine-tuning-based LLM Unlearning", arXiv 2502.17823)
puts a soft gate in front of the suppression module, so that a model unlearns by first *recognising* the
target data and only then changing what it generates. Here the suppression module is EUL's bottleneck
(Chen & Yang 2023, layers/bottleneck.py) on the FFN output h, and the gate a linear probe of the block's
input u (the normed residual stream):

    F(h) = h + sigmoid(w_g . u + b_g) (W_up act(W_down h + b_down) + b_up)

trained with the request's objective plus a gate loss (trainer.py):

    L = L_objective + lambda_gate * mean( BCE(g, 1) on the forget answers, BCE(g, 0) on the retain answers )

each BCE a mean over the gates of all blocks and the positions that predict an answer token. The retain
side holds the request's neighbourhood (workers/engine/neighbours.py), so the gate learns "this subject",
not "a person". The gates start as fitted probes (`fit_gates`). The gate is one more
linear map to the closed-form fusion (`blocks.{i}.gate`), whose Gram holds the request's retain inputs too
(unlearn.train_request): fitted on forget rows only, the fused gate would drift open on everything else.
Served with its hooks (the output projection never sees u, so nothing folds); not mergeable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import LayerConfig
from .base import LayerType
from .bottleneck import AttachedLayer, UnlearningLayer

KIND = "gated"


def is_gate_map(name: str) -> bool:
    """The fused-map names of gates ("blocks.{i}.gate", layers/bottleneck.AttachedLayer.linear_maps)."""
    return name.endswith(".gate")


class GatedType(LayerType):
    kind = KIND
    scopable = True

    def attach(self, model: nn.Module, cfg: LayerConfig, seed: int = 0) -> AttachedLayer:
        return AttachedLayer(model, UnlearningLayer.create(model, cfg, seed, gated=True), kind=KIND)


@torch.no_grad()
def _gate_inputs(model: nn.Module, gates: list[nn.Linear], batch: dict[str, Tensor], positions: Tensor
                 ) -> list[Tensor]:
    """Each gate's input (the block input u) at `positions` (B, T) of one batch: a list of (N, d) per gate."""
    captured: list[Tensor] = []
    handles = [gate.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for gate in gates]
    device = next(model.parameters()).device
    try:
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    keep = positions.to(device).reshape(-1)
    return [u.reshape(-1, u.shape[-1])[keep].float() for u in captured]


def fit_gates(model: nn.Module, attached: AttachedLayer, labelled: list[tuple[dict[str, Tensor], Tensor, float]],
              l2: float = 1e-4, iterations: int = 100) -> None:
    """Start every gate as a logistic-regression probe of the untrained model's block inputs: target 1 at the
    forget answers' positions, 0 at the retain ones (class-balanced, L2-penalised, L-BFGS). The objective
    then trains a gate that already tells the request's subject from its neighbours, instead of one at 0.5
    that 40 steps of the objective barely move. `labelled`: (batch, predicting positions (B, T), target)."""
    gates = [a.gate for a in attached.layer.adapters if a.gate is not None]
    features: list[list[Tensor]] = [[] for _ in gates]
    targets: list[Tensor] = []
    for batch, positions, target in labelled:
        for store, u in zip(features, _gate_inputs(model, gates, batch, positions)):
            store.append(u)
        targets.append(torch.full((int(positions.sum()),), target))
    y = torch.cat(targets)  # (N,)
    weight = torch.where(y > 0.5, 0.5 / y.sum().clamp(min=1), 0.5 / (1 - y).sum().clamp(min=1))  # (N,)
    for gate, parts in zip(gates, features):
        x = torch.cat(parts).cpu()  # (N, d)
        w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

        def closure(x=x, w=w, b=b, optimizer=optimizer) -> Tensor:
            optimizer.zero_grad()
            loss = (weight * nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
            loss = loss + l2 * w.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            gate.weight.copy_(w.detach().unsqueeze(0).to(gate.weight))
            gate.bias.copy_(b.detach().to(gate.bias))
