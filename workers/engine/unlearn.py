"""The narrow facade the worker calls: train one request's layer, fuse it, build the served model.

No db, no web: plain tensors and dataclasses in, plain tensors and dataclasses out.

    trained = train_request(base, forget, retain, layer_cfg, train_cfg, on_progress, should_stop)
    store.stage(job_id, *trained_tensors(trained))           # survives a worker restart
    state, fused = fuse(parent_state, trained, request_id, FusionConfig())
    served = served_model(base, layer_cfg, fused)             # generate with base.model; served.detach()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .batching import collate, encode, pad_id
from .config import FusionConfig, LayerConfig, TrainConfig
from .data import Example
from .fusion import FusionState, collect_grams, fuse_request
from .layers import AttachedLayerProtocol, attach_fused, create_attached, get_layer
from .layers.base import model_device
from .layers.gated import is_gate_map
from .layers.scope import fit_recogniser, scope_block
from .loading import LoadedModel
from .neighbours import free_text_negatives, other_subject_prompts
from .objectives.base import token_nll
from .trainer import Progress, train

MAP_PREFIX, GRAM_PREFIX, RECOGNISER_KEY = "map.", "gram.", "recogniser"


@dataclass
class TrainedLayer:
    """One request's trained layer, as fusion needs it: W_i per linear map and G_i = X_i^T X_i on its
    forget data (EUL fuses each layer weighted by the inputs it was trained to change); a gated layer's gates
    on its forget and retain data (layers/gated.py)."""

    layer_cfg: LayerConfig
    train_cfg: TrainConfig
    maps: dict[str, Tensor]  # name -> W_aug (in+1, out) or LoRA delta (in, out), fp32, CPU
    grams: dict[str, Tensor]  # name -> Gram (in', in'), fp64, CPU (LoRA maps of one block share one)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    recogniser: Tensor | None = None  # (2d + 1,) fp32: which sequences the layer acts on (layers/scope.py)


def gram_batches(tokenizer, examples: Sequence[Example], cfg: TrainConfig) -> list[dict[str, Tensor]]:
    """Every example once, in order, in batches of cfg.batch_size (the Gram pass)."""
    encoded, pad = encode(tokenizer, examples, cfg.max_length), pad_id(tokenizer)
    return [collate(encoded[i:i + cfg.batch_size], pad) for i in range(0, len(encoded), cfg.batch_size)]


@torch.no_grad()
def mean_answer_nll(model: nn.Module, tokenizer, examples: Sequence[Example], max_length: int = 128,
                    batch_size: int = 8) -> float:
    """Mean over examples of each one's mean token NLL on its scored (answer) tokens: a quick check."""
    encoded, pad, device = encode(tokenizer, examples, max_length), pad_id(tokenizer), model_device(model)
    per_example: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], pad)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        nll, mask = token_nll(out.logits, batch["labels"].to(device))  # (B, T-1)
        per_example += (nll.sum(dim=1) / mask.sum(dim=1).clamp_min(1)).tolist()
    return sum(per_example) / max(len(per_example), 1)


def train_request(
    base: LoadedModel,
    forget: Sequence[Example],
    retain: Sequence[Example],
    layer_cfg: LayerConfig,
    train_cfg: TrainConfig,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainedLayer:
    """Attach a fresh layer to base.model, train it, read out maps and forget-data Grams, detach.

    The base model is clean (no layer attached) when this returns or raises (Cancelled included). With
    layer_cfg.scope "sequence" (a scopable kind), the request's recogniser is fitted first, on the base.
    """
    recogniser = None  # without retain items nothing says what the layer must leave alone: it acts everywhere
    if layer_cfg.scope == "sequence" and get_layer(layer_cfg.kind).scopable and retain:
        recogniser = fit_recogniser(base.model, base.tokenizer, forget, [*retain, *free_text_negatives(forget)],
                                    scope_block(base.model, layer_cfg.scope_block), train_cfg.max_length,
                                    other_prompts=other_subject_prompts(forget))
    attached = create_attached(base.model, layer_cfg, seed=train_cfg.seed)
    try:
        result = train(base.model, base.tokenizer, attached, forget, retain, train_cfg, on_progress, should_stop)
        maps = {name: w.detach().float().cpu() for name, w in attached.map_weights().items()}
        grams = collect_grams(base.model, attached, gram_batches(base.tokenizer, forget, train_cfg))
        gates = [name for name in maps if is_gate_map(name)]
        if gates:  # a gate is fitted on both sides: fused on forget rows only, it would open on the retain ones
            kept = collect_grams(base.model, attached, gram_batches(base.tokenizer, retain, train_cfg))
            grams |= {name: grams[name] + kept[name] for name in gates}
    finally:
        attached.detach()
    return TrainedLayer(layer_cfg, train_cfg, maps, grams, result.losses, result.seconds, recogniser)


def fuse(
    parent: FusionState | None, trained: TrainedLayer, request_id: str, cfg: FusionConfig | None = None
) -> tuple[FusionState, dict[str, Tensor]]:
    """Add the request to the running sums and solve W* = (sum G_i + lambda I)^-1 sum G_i W_i; its
    recogniser joins the version's (fusion.solve)."""
    return fuse_request(parent, trained.grams, trained.maps, request_id, cfg or FusionConfig(), trained.recogniser)


def served_model(base: LoadedModel, layer_cfg: LayerConfig, fused_maps: dict[str, Tensor],
                 merge: bool = True) -> AttachedLayerProtocol:
    """base.model serving the fused layer (layers.attach_fused); `.detach()` gives back the exact base."""
    return attach_fused(base.model, layer_cfg, fused_maps, merge)


# ---- staging a trained layer (ModelStore.stage takes a tensor dict + JSON meta) --------------------


def trained_tensors(trained: TrainedLayer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """("map.{name}" and "gram.{name}" tensors, meta). A Gram shared by several maps is stored once."""
    tensors = {f"{MAP_PREFIX}{name}": w.contiguous() for name, w in trained.maps.items()}
    stored: dict[int, str] = {}
    gram_of: dict[str, str] = {}
    for name, gram in trained.grams.items():
        if id(gram) not in stored:
            stored[id(gram)] = f"{GRAM_PREFIX}{name}"
            tensors[stored[id(gram)]] = gram.contiguous()
        gram_of[name] = stored[id(gram)]
    if trained.recogniser is not None:
        tensors[RECOGNISER_KEY] = trained.recogniser.contiguous()
    meta = {
        "layer_cfg": trained.layer_cfg.to_dict(),
        "train_cfg": trained.train_cfg.to_dict(),
        "losses": list(trained.losses),
        "seconds": trained.seconds,
        "gram_of": gram_of,
    }
    return tensors, json.loads(json.dumps(meta))  # plain JSON types only


def trained_from_tensors(tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainedLayer:
    maps = {key.removeprefix(MAP_PREFIX): t for key, t in tensors.items() if key.startswith(MAP_PREFIX)}
    gram_of = meta["gram_of"]
    grams = {name: tensors[key] for name, key in gram_of.items()}  # shared key -> same tensor object
    return TrainedLayer(
        layer_cfg=LayerConfig.from_dict(meta["layer_cfg"]),
        train_cfg=TrainConfig.from_dict(meta["train_cfg"]),
        maps=maps,
        grams=grams,
        losses=[float(x) for x in meta.get("losses", [])],
        seconds=float(meta.get("seconds", 0.0)),
        recogniser=tensors.get(RECOGNISER_KEY),
    )
