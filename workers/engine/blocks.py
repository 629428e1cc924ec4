"""Find the feed-forward block of every transformer layer, for any Hugging Face causal LM.

Search, in order:
1. the `nn.ModuleList` whose length equals the config's layer count (`num_hidden_layers`, or
   `n_layer` / `num_layers` for older configs): the transformer layers
   (Llama/Mistral/Qwen: `model.model.layers`; GPT-2: `model.transformer.h`);
2. in each layer, the child named one of FFN_CHILD_NAMES: the feed-forward block.

Adding a family: if its layers live in a ModuleList (nearly all do) and its feed-forward child has a
new name, append that name to FFN_CHILD_NAMES; if the projections that read the block's input have a
new name, append it to FFN_INPUT_PROJECTION_NAMES (used by LoRA). Then add the family to the tiny-model
tests (workers/engine/testing.py) so attach/detach/fusion are checked on it.
"""

from __future__ import annotations

from torch import nn

FFN_CHILD_NAMES: tuple[str, ...] = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# Projections applied to the FFN block's input x (all of them read the same x).
FFN_INPUT_PROJECTION_NAMES: tuple[str, ...] = (
    "gate_proj",  # Llama, Mistral, Qwen, SmolLM
    "up_proj",
    "c_fc",  # GPT-2 (Conv1D)
    "fc1",  # OPT, Phi
    "fc_in",  # GPT-J
    "dense_h_to_4h",  # GPT-NeoX, Falcon
    "w1",  # some Llama ports
    "w3",
)


class UnsupportedModelError(ValueError):
    """The model's layer structure is not one the engine knows how to find."""


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"{type(model).__name__}: config has no layer count (num_hidden_layers)")


def _ffn_child(layer: nn.Module) -> nn.Module | None:
    for name in FFN_CHILD_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def find_ffn_blocks(model: nn.Module) -> list[nn.Module]:
    """The feed-forward module of every transformer layer, in layer order."""
    count = num_layers(model)
    for _, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != count:
            continue
        blocks = [_ffn_child(layer) for layer in module]
        if all(block is not None for block in blocks):
            return blocks
    raise UnsupportedModelError(
        f"{type(model).__name__}: no list of {count} layers with a feed-forward child named one of "
        f"{FFN_CHILD_NAMES}; see workers/engine/blocks.py for how to add a model family"
    )


def ffn_input_projections(block: nn.Module) -> dict[str, nn.Module]:
    """Projections inside an FFN block that read the block's input (LoRA targets), by child name."""
    found = {
        name: getattr(block, name)
        for name in FFN_INPUT_PROJECTION_NAMES
        if isinstance(getattr(block, name, None), nn.Module)
    }
    if not found:
        raise UnsupportedModelError(
            f"{type(block).__name__}: no input projection named one of {FFN_INPUT_PROJECTION_NAMES}; "
            "see workers/engine/blocks.py for how to add a model family"
        )
    return found
