"""Dataclass configs for the unlearning engine (nanoGPT style: plain, typed, defaulted)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

# The one place method and layer names are written; the objective and layer registries check against them.
METHODS = ("eul", "ga_kl", "me_gd", "idk_ap", "npo", "undial", "simnpo", "whp", "rmu")
# The objective a request trains with unless it names one: eul, the method the product is built on (docs/DESIGN.md
# section 5, from the project's contract). Measured against the others (benchmarks/results/README.md): npo forgets
# more on TOFU (4 authors: forget quality 0.822 vs 0.001) and on the selectivity subjects, and since the recognisers
# see free sentences as negatives it passes its verdict where it once failed (Mount Kilimanjaro: general perplexity
# +0.0%, was +33.5%); rmu forgets most there, by turning the answers into noise (and over-forgets on TOFU). eul
# passes every check on every subject measured; on TOFU it under-forgets. Choosing another default is a product
# decision, not a tuning one.
DEFAULT_METHOD = "eul"
LAYER_KINDS = ("bottleneck", "lora", "linear", "gated")
LayerKind = Literal[LAYER_KINDS]
LAYER_SCOPES = ("sequence", "all")  # where a layer acts: sequences its requests' recognisers know, or all
LayerScope = Literal[LAYER_SCOPES]
QUANT_TYPES = ("q8_0", "q4_0", "q4_1")  # GGML block quantizations that the export writes (quantized.py)


@dataclass(frozen=True)
class LayerConfig:
    """Shape of one request's unlearning layer.

    bottleneck: EUL adapter after every feed-forward block, h + up(act(down(h))).
    lora: peft LoRA on the feed-forward input projections, fused and merged into the base.
    linear: the bottleneck with the identity activation, merged into each FFN output projection.
    gated: the bottleneck behind a learned gate that opens on the request's data (GRUN; layers/gated.py).

    scope "sequence": the layer acts only on sequences whose prompt a recogniser fitted per request knows
    (layers/scope.py; bottleneck, linear and gated kinds); "all": on every sequence (LoRA always).
    """

    kind: LayerKind = "bottleneck"
    bottleneck_dim: int = 32  # 2*d*r per block; r=32 on SmolLM2-135M (d=576, 30 blocks) ~ 0.8% of base
    activation: str = "gelu"
    lora_rank: int = 8
    lora_alpha: int = 16
    scope: LayerScope = "sequence"
    scope_block: int = 2  # the recognisers read this FFN block's input (the last block on shallower models)

    def __post_init__(self) -> None:
        if self.scope not in LAYER_SCOPES:
            raise ValueError(f"layer scope {self.scope!r}: choose one of {list(LAYER_SCOPES)}")
        if self.scope_block < 0:
            raise ValueError(f"scope_block {self.scope_block}: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class TrainConfig:
    """How one request's layer is trained. Loss weights belong to the objective's own config."""

    method: str = DEFAULT_METHOD
    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 4
    max_length: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    objective: dict[str, float] = field(default_factory=dict)  # per-objective weight overrides
    gate_weight: float = 1.0  # gated layers: weight of the gate's open-on-forget / shut-on-retain loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class FusionConfig:
    """Closed-form fusion W* = (sum G_i + lambda I)^-1 sum G_i W_i.

    lambda = ridge * mean(diag(sum G_i)): relative, so it means the same at any activation scale.
    """

    ridge: float = 1e-3
