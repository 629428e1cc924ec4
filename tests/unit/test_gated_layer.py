"""Gated layer (GRUN's gate in front of EUL's bottleneck): identity at start, the gate opens on the forget
data and shuts on the retain data when trained, the maps include the gate, and a served version computes the
trained function."""

from __future__ import annotations

import torch

from tests.tiny_models import logits
from workers.engine.config import LayerConfig, TrainConfig
from workers.engine.data import Example
from workers.engine.layers import attach_fused, create_attached
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.trainer import train

GATED = LayerConfig(kind="gated", bottleneck_dim=8)
FORGET = [Example(prompt="Who is Basil Mahfouz?", answer="A novelist from Kuwait City."),
          Example(prompt="Where was Basil Mahfouz born?", answer="In Kuwait City, in 1956.")]
RETAIN = [Example(prompt="What is 2 + 2?", answer="4."), Example(prompt="Name a colour.", answer="Blue."),
          Example(prompt="Who is Ada Lovelace?", answer="A mathematician from London.")]


def mean_gate(model, attached, tokenizer, examples: list[Example]) -> float:
    """Mean gate value over all blocks and tokens of the examples' prompts + answers."""
    texts = [f"{e.prompt} {e.answer}" for e in examples]
    logits(model, tokenizer(texts, return_tensors="pt", padding=True))
    return float(torch.stack([a.gate_values.mean() for a in attached.layer.adapters]).mean())


def test_an_untrained_gated_layer_leaves_the_model_unchanged(batch):
    model = tiny_model("llama")
    base = logits(model, batch)
    attached = create_attached(model, GATED)
    assert attached.kind == "gated"
    assert torch.equal(logits(model, batch), base)
    assert {name.rsplit(".", 1)[1] for name in attached.map_weights()} == {"down", "up", "gate"}
    attached.detach()


def test_training_opens_the_gate_on_the_forget_data_and_shuts_it_on_the_retain_data():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, GATED)
    result = train(model, tokenizer, attached, FORGET, RETAIN,
                   TrainConfig(steps=30, batch_size=2, max_length=64, lr=1e-2))
    # the gates start as fitted probes and end fitted: far below ln 2, the loss of a gate at 0.5 that knows nothing
    assert result.terms[0]["gate_bce"] < 0.3 and result.terms[-1]["gate_bce"] < 0.3
    assert mean_gate(model, attached, tokenizer, FORGET) > mean_gate(model, attached, tokenizer, RETAIN) + 0.2
    attached.detach()


def test_a_served_gated_version_keeps_its_hooks_and_computes_the_trained_function(batch):
    model = tiny_model("llama")
    base = logits(model, batch)
    trained = create_attached(model, GATED)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(torch.randn_like(p))
    maps = trained.map_weights()
    trained.detach()
    served = attach_fused(model, GATED, maps)
    hooked = logits(model, batch)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert served.fold_for_serving() == 0  # the gate reads the block's input: no projection to fold into
    assert torch.equal(logits(model, batch), hooked)
    served.detach()
    assert torch.equal(logits(model, batch), base)
