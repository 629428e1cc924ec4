"""Bottleneck unlearning layer: identity at init, exact detach, teacher bypass, map round trip."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import logits
from workers.engine.blocks import UnsupportedModelError, ffn_input_projections, find_ffn_blocks
from workers.engine.config import LAYER_KINDS, LayerConfig
from workers.engine.layers import LAYERS, AttachedLayerProtocol, create_attached, get_layer
from workers.engine.layers.base import count_parameters
from workers.engine.layers.bottleneck import UnlearningLayer, attach
from workers.engine.testing import tiny_model

FAMILIES = ["llama", "gpt2"]


def perturb(attached) -> None:
    """Make the adapters non-trivial so that 'equals base' can only hold through a real bypass."""
    with torch.no_grad():
        for p in attached.trainable_parameters():
            p.add_(torch.randn_like(p))


@pytest.mark.parametrize("family", FAMILIES)
def test_find_ffn_blocks_returns_one_block_per_layer(family):
    model = tiny_model(family)
    blocks = find_ffn_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert all(type(b).__name__.endswith("MLP") for b in blocks)


def test_ffn_input_projections_by_family():
    assert set(ffn_input_projections(find_ffn_blocks(tiny_model("llama"))[0])) == {"gate_proj", "up_proj"}
    assert set(ffn_input_projections(find_ffn_blocks(tiny_model("gpt2"))[0])) == {"c_fc"}


def test_unknown_structure_raises_naming_the_class():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.config = type("Cfg", (), {"num_hidden_layers": 3})()
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        find_ffn_blocks(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_attached_untrained_layer_equals_base(family, batch):
    model = tiny_model(family)
    base = logits(model, batch)
    attached = attach(model, UnlearningLayer.create(model, LayerConfig(), seed=0))
    assert torch.equal(logits(model, batch), base)
    attached.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_bit_identical_base(family, batch):
    model = tiny_model(family)
    base = logits(model, batch)
    keys = list(model.state_dict())
    attached = attach(model, UnlearningLayer.create(model, LayerConfig(), seed=0))
    perturb(attached)
    assert not torch.equal(logits(model, batch), base)
    assert list(model.state_dict()) == keys  # hooks, not new submodules
    attached.detach()
    assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_bypasses_adapters(family, batch):
    model = tiny_model(family)
    base = logits(model, batch)
    attached = attach(model, UnlearningLayer.create(model, LayerConfig(), seed=0))
    perturb(attached)
    with attached.disabled():
        assert torch.equal(logits(model, batch), base)
    assert not torch.equal(logits(model, batch), base)
    attached.detach()


def test_second_attach_is_refused():
    model = tiny_model("llama")
    attached = attach(model, UnlearningLayer.create(model, LayerConfig()))
    with pytest.raises(RuntimeError, match="already attached"):
        attach(model, UnlearningLayer.create(model, LayerConfig()))
    attached.detach()
    attach(model, UnlearningLayer.create(model, LayerConfig())).detach()


def test_same_seed_same_init_and_fp32_params():
    model = tiny_model("llama").to(torch.bfloat16)
    a = UnlearningLayer.create(model, LayerConfig(), seed=3).state_dict()
    b = UnlearningLayer.create(model, LayerConfig(), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())


def test_bf16_base_keeps_dtype_and_identity(batch):
    model = tiny_model("llama").to(torch.bfloat16)
    base = logits(model, batch)
    attached = attach(model, UnlearningLayer.create(model, LayerConfig()))
    out = logits(model, batch)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    attached.detach()


def test_only_layer_parameters_are_trainable_and_get_gradients(batch):
    model = tiny_model("gpt2").requires_grad_(False)
    attached = attach(model, UnlearningLayer.create(model, LayerConfig(bottleneck_dim=4)))
    perturb(attached)
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None for p in attached.trainable_parameters())
    assert all(p.grad is None for p in model.parameters())
    attached.detach()


def test_state_dict_holds_only_layer_tensors():
    model = tiny_model("llama")
    cfg = LayerConfig(bottleneck_dim=8)
    attached = attach(model, UnlearningLayer.create(model, cfg))
    state = attached.state_dict()
    assert set(state) == {f"adapters.{i}.{m}.{p}" for i in range(2) for m in ("down", "up")
                          for p in ("weight", "bias")}
    assert sum(t.numel() for t in state.values()) == count_parameters(attached.layer)
    assert count_parameters(attached.layer) == 2 * (2 * 64 * 8 + 8 + 64)
    attached.detach()


def test_map_weights_round_trip_and_augmented_form(batch):
    model = tiny_model("llama")
    attached = attach(model, UnlearningLayer.create(model, LayerConfig(bottleneck_dim=8)))
    perturb(attached)
    maps = attached.map_weights()
    assert maps["blocks.0.down"].shape == (64 + 1, 8)
    assert maps["blocks.1.up"].shape == (8 + 1, 64)
    x = torch.randn(5, 64)
    down = attached.linear_maps()["blocks.0.down"]
    expected = torch.cat([x, torch.ones(5, 1)], dim=1) @ maps["blocks.0.down"]
    assert torch.allclose(down(x), expected, atol=1e-5)
    before = logits(model, batch)
    attached.detach()
    fresh = attach(model, UnlearningLayer.create(model, LayerConfig(bottleneck_dim=8), seed=9))
    fresh.load_map_weights(maps)
    assert torch.allclose(logits(model, batch), before, atol=1e-6)
    fresh.detach()


def test_create_attached_dispatches_on_kind():
    model = tiny_model("llama")
    attached = create_attached(model, LayerConfig(kind="bottleneck"))
    assert attached.kind == "bottleneck" and isinstance(attached, AttachedLayerProtocol)
    attached.detach()


def test_the_registry_holds_every_configured_kind_and_names_them_for_an_unknown_one():
    assert tuple(LAYERS) == LAYER_KINDS and all(LAYERS[kind].kind == kind for kind in LAYER_KINDS)
    with pytest.raises(ValueError, match="'bottleneck', 'lora'"):
        get_layer("adapter")


def trained_bottleneck(model, activation: str = "gelu") -> AttachedLayerProtocol:
    attached = attach(model, UnlearningLayer.create(model, LayerConfig(activation=activation), seed=0))
    perturb(attached)
    return attached


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])  # gelu takes the erf form, the others act()
def test_folding_adapters_into_the_output_projections_serves_the_same_function(batch, activation):
    model = tiny_model("llama")
    base_logits = logits(model, batch)
    attached = trained_bottleneck(model, activation)
    hooked_logits = logits(model, batch)
    assert attached.fold_for_serving() == len(find_ffn_blocks(model))
    assert all(type(block.down_proj).__name__ == "FoldedProjection" for block in find_ffn_blocks(model))
    torch.testing.assert_close(logits(model, batch), hooked_logits, rtol=1e-4, atol=1e-4)
    attached.detach()
    assert torch.equal(logits(model, batch), base_logits)


def test_a_block_without_a_known_linear_output_projection_keeps_its_hook(batch):
    model = tiny_model("gpt2")  # c_proj is a Conv1D
    attached = trained_bottleneck(model)
    hooked_logits = logits(model, batch)
    assert attached.fold_for_serving() == 0
    assert torch.equal(logits(model, batch), hooked_logits)
