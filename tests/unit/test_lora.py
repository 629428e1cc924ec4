"""LoRA layer: same protocol as the bottleneck; exact detach; dense deltas merge into a plain model."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny_models import logits
from workers.engine.config import LayerConfig
from workers.engine.layers import AttachedLayerProtocol, create_attached, get_layer
from workers.engine.layers.lora import attach_lora, lora_parameter_count, merge_into_base
from workers.engine.testing import tiny_model

FAMILIES = ["llama", "gpt2"]
CFG = LayerConfig(kind="lora", lora_rank=4, lora_alpha=8)


def perturb(attached) -> None:
    with torch.no_grad():
        for p in attached.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))


@pytest.mark.parametrize("family", FAMILIES)
def test_attached_untrained_lora_equals_base(family, batch):
    model = tiny_model(family)
    base = logits(model, batch)
    attached = attach_lora(model, CFG)
    assert isinstance(attached, AttachedLayerProtocol)
    assert torch.equal(logits(model, batch), base)
    attached.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_exact_base(family, batch):
    model = tiny_model(family)
    base, state = logits(model, batch), copy.deepcopy(model.state_dict())
    attached = attach_lora(model, CFG)
    perturb(attached)
    assert not torch.equal(logits(model, batch), base)
    attached.detach()
    assert torch.equal(logits(model, batch), base)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_bypasses_lora(family, batch):
    model = tiny_model(family)
    base = logits(model, batch)
    attached = attach_lora(model, CFG)
    perturb(attached)
    with attached.disabled():
        assert torch.equal(logits(model, batch), base)
    assert not torch.equal(logits(model, batch), base)
    assert all(p.requires_grad for p in attached.trainable_parameters())
    attached.detach()


def test_targets_are_ffn_input_projections_and_params_fp32():
    model = tiny_model("llama").to(torch.bfloat16)
    attached = create_attached(model, CFG, seed=0)
    assert attached.kind == "lora"
    expected = {f"blocks.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert set(attached.map_weights()) == expected
    assert all(p.dtype == torch.float32 for p in attached.trainable_parameters())
    assert sum(p.numel() for p in attached.trainable_parameters()) == lora_parameter_count(model, CFG)
    attached.detach()


def test_gate_and_up_share_the_input_module():
    model = tiny_model("llama")
    attached = attach_lora(model, CFG)
    maps = attached.linear_maps()
    assert maps["blocks.0.gate_proj"] is maps["blocks.0.up_proj"]
    attached.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_map_weights_is_dense_delta_and_round_trips(family, batch):
    model = tiny_model(family)
    attached = attach_lora(model, CFG)
    perturb(attached)
    trained = logits(model, batch)
    maps = attached.map_weights()
    attached.detach()
    dense = attach_lora(model, CFG, seed=5)
    dense.load_map_weights(maps)
    assert torch.allclose(logits(model, batch), trained, atol=1e-5)
    assert all(torch.equal(dense.map_weights()[k], maps[k]) for k in maps)
    with dense.disabled():
        assert torch.equal(logits(model, batch), logits(tiny_model(family), batch))
    dense.detach()
    assert torch.equal(logits(model, batch), logits(tiny_model(family), batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_into_base_gives_plain_model_with_same_outputs(family, batch):
    model = tiny_model(family)
    attached = attach_lora(model, CFG)
    perturb(attached)
    trained, maps = logits(model, batch), attached.map_weights()
    attached.detach()
    merged = merge_into_base(copy.deepcopy(model), maps)
    copied = get_layer("lora").merged_copy(model, maps)
    assert torch.allclose(logits(merged, batch), trained, atol=1e-5)
    assert list(merged.state_dict()) == list(model.state_dict())
    assert all(torch.equal(copied.state_dict()[k], v) for k, v in merged.state_dict().items())
    assert torch.equal(logits(model, batch), logits(tiny_model(family), batch))


def test_state_dict_round_trip():
    model = tiny_model("gpt2")
    attached = attach_lora(model, CFG)
    perturb(attached)
    state = attached.state_dict()
    maps = attached.map_weights()
    attached.detach()
    again = attach_lora(model, CFG, seed=1)
    again.load_state_dict(state)
    assert all(torch.allclose(again.map_weights()[k], maps[k]) for k in maps)
    again.detach()


# -- export: a LoRA version is a plain Hugging Face checkpoint -------------------------------------

def trained_lora_maps(model) -> dict[str, torch.Tensor]:
    attached = attach_lora(model, CFG)
    perturb(attached)
    maps = attached.map_weights()
    attached.detach()
    return maps


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_writes_checkpoint_stock_transformers_loads(family, tmp_path, batch):
    from transformers import AutoModelForCausalLM

    from workers.engine.export import export_hf
    from workers.engine.loading import load_base_model
    from workers.engine.versions import build_serving_model

    base = load_base_model(f"tiny-random-{family}", tmp_path / "cache", device="cpu")
    maps = trained_lora_maps(base.model)
    serving = build_serving_model(base.model, CFG, maps)
    out = export_hf(base, "lora", maps, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(base.model)
    assert torch.allclose(logits(reloaded, batch), logits(serving, batch), atol=1e-5)
    assert not torch.allclose(logits(reloaded, batch), logits(base.model, batch), atol=1e-3)
    assert (out / "tokenizer.json").is_file() and (out / "unlearn_export.json").is_file()


def test_export_refuses_bottleneck_and_non_empty_dir(tmp_path):
    from workers.engine.export import NotExportableError, export_hf
    from workers.engine.loading import load_base_model

    base = load_base_model("tiny-random-llama", tmp_path / "cache", device="cpu")
    with pytest.raises(NotExportableError, match="use layer kind 'lora'"):
        export_hf(base, "bottleneck", {}, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(base, "lora", trained_lora_maps(base.model), tmp_path / "full")


def test_serving_model_for_bottleneck_is_an_independent_copy(tmp_path, batch):
    from workers.engine.layers import create_attached
    from workers.engine.versions import build_serving_model

    model = tiny_model("gpt2")
    cfg = LayerConfig(kind="bottleneck", bottleneck_dim=4)
    attached = create_attached(model, cfg)
    perturb(attached)
    trained, maps = logits(model, batch), attached.map_weights()
    attached.detach()
    serving = build_serving_model(model, cfg, maps)
    assert torch.allclose(logits(serving, batch), trained, atol=1e-5)
    assert torch.equal(logits(model, batch), logits(tiny_model("gpt2"), batch))
