"""The linear kind: the EUL bottleneck with no nonlinearity, trained as one and merged into the FFN output
projections when served or exported."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import logits
from workers.engine.config import LayerConfig
from workers.engine.layers import attach_fused, create_attached, get_layer
from workers.engine.layers.base import count_parameters
from workers.engine.layers.linear import MergedLinear
from workers.engine.testing import tiny_model

FAMILIES = ["llama", "gpt2"]
CFG = LayerConfig(kind="linear", bottleneck_dim=4)


def trained_maps(model, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fused-map format of a perturbed (non-trivial) layer, and the logits of the attached layer."""
    attached = create_attached(model, CFG)
    with torch.no_grad():
        for p in attached.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    maps, trained = attached.map_weights(), logits(model, batch)
    attached.detach()
    return maps, trained


def test_attached_layer_is_the_bottleneck_with_identity_activation(batch):
    model = tiny_model("llama")
    attached = create_attached(model, CFG)
    assert attached.kind == "linear"
    assert all(isinstance(a.act, torch.nn.Identity) for a in attached.layer.adapters)
    assert torch.equal(logits(model, batch), logits(tiny_model("llama"), batch))  # identity until trained
    attached.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_layer_computes_what_the_attached_layer_did(family, batch):
    model = tiny_model(family)
    maps, trained = trained_maps(model, batch)
    merged = attach_fused(model, CFG, maps)
    assert isinstance(merged, MergedLinear)
    assert torch.allclose(logits(model, batch), trained, atol=1e-5)
    added_biases = model.config.hidden_size * model.config.num_hidden_layers if family == "llama" else 0
    assert count_parameters(model) == count_parameters(tiny_model(family)) + added_biases  # no adapter modules
    merged.detach()
    assert torch.equal(logits(model, batch), logits(tiny_model(family), batch))


def test_disabled_gives_the_base_and_then_the_merged_model_again(batch):
    model = tiny_model("llama")
    maps, trained = trained_maps(model, batch)
    merged = attach_fused(model, CFG, maps)
    with merged.disabled():
        assert torch.equal(logits(model, batch), logits(tiny_model("llama"), batch))
    assert torch.allclose(logits(model, batch), trained, atol=1e-5)
    merged.detach()


def test_unmerged_serving_path_matches_the_merged_one(batch):
    model, other = tiny_model("gpt2"), tiny_model("gpt2")
    maps, _ = trained_maps(model, batch)
    merged, hooked = attach_fused(model, CFG, maps), attach_fused(other, CFG, maps, merge=False)
    assert torch.allclose(logits(model, batch), logits(other, batch), atol=1e-5)
    merged.detach()
    hooked.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_a_checkpoint_stock_transformers_loads_with_the_same_outputs(family, tmp_path, batch):
    from transformers import AutoModelForCausalLM

    from workers.engine.export import export_hf
    from workers.engine.loading import load_base_model
    from workers.engine.versions import build_serving_model

    base = load_base_model(f"tiny-random-{family}", tmp_path / "cache", device="cpu")
    maps, _ = trained_maps(base.model, batch)
    serving = build_serving_model(base.model, CFG, maps)
    out = export_hf(base, "linear", maps, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(base.model)
    assert torch.allclose(logits(reloaded, batch), logits(serving, batch), atol=1e-5)
    assert not torch.allclose(logits(reloaded, batch), logits(base.model, batch), atol=1e-3)
    if family == "llama":  # Llama's down_proj has no bias: the checkpoint says mlp_bias for the merged one
        assert reloaded.config.mlp_bias and not base.model.config.mlp_bias


def test_merged_copy_leaves_the_model_unchanged(batch):
    model = tiny_model("llama")
    maps, trained = trained_maps(model, batch)
    copied = get_layer("linear").merged_copy(model, maps)
    assert torch.allclose(logits(copied, batch), trained, atol=1e-5)
    assert torch.equal(logits(model, batch), logits(tiny_model("llama"), batch))
    assert not hasattr(model, "_unlearn_attached_layer") and not hasattr(copied, "_unlearn_attached_layer")


def test_wrong_map_names_are_refused():
    with pytest.raises(ValueError, match="map names differ"):
        MergedLinear(tiny_model("llama"), {"blocks.0.down": torch.zeros(1)})
