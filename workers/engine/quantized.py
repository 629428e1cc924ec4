"""Quantized copies of a model version: the GGUF file CPU users run with llama.cpp, and the same rounding in
torch, so that verification checks what that file remembers.

GGML block quantization (the `gguf` package's reference quantizers) stores every row of a matmul weight in
blocks of 32 values with one scale (Q8_0, Q4_0) or a scale and a minimum (Q4_1) per block:

    Q8_0: w ~ d * q,        q in -127..127,  d = max|w| / 127
    Q4_0: w ~ d * (q - 8),  q in 0..15,      d = (the signed value of largest magnitude) / -8
    Q4_1: w ~ d * q + m,    q in 0..15,      d = (max w - min w) / 15, m = min w

An unlearning update is small next to the weights it changes, and rounding to 16 levels per block can erase
it: Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization" (arXiv 2410.16454) recover
most forgotten knowledge after 4-bit quantization. `quantized_copy` is the model whose weights are exactly the
dequantized values that `write_gguf` stores (embeddings and output head at Q8_0, as in the default model's
own file; every other matmul at the chosen type), so forget checks run on it say what the GGUF file remembers.

GGUF export covers the Llama architecture (the default model's): tensor names from the gguf package's name
map, Q/K rows permuted as llama.cpp's converter does (transformers' GGUF loader undoes it), norms and
biases kept in F32, and the tokenizer (byte-level BPE) written as `tokenizer.ggml.*`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import QUANT_TYPES


class UnsupportedQuantizationError(ValueError):
    """The model or quantization type has no GGUF writer here."""


def ggml_type(quant: str):
    from gguf import GGMLQuantizationType

    if quant not in QUANT_TYPES:
        raise UnsupportedQuantizationError(f"unknown quantization {quant!r}; choose one of {list(QUANT_TYPES)}")
    return GGMLQuantizationType[quant.upper()]


EMBEDDING_QUANT = "q8_0"  # token embeddings and output head, as in the default model's own GGUF file


def tensor_quant(hf_name: str, tensor: torch.Tensor, quant: str) -> str | None:
    """The quantization a weight gets in the file (None: kept F32): 2-D weights whose rows are whole
    blocks; the embeddings and output head at Q8_0, every other matmul at `quant`."""
    from gguf import GGML_QUANT_SIZES

    chosen = EMBEDDING_QUANT if hf_name.endswith(("embed_tokens.weight", "lm_head.weight")) else quant
    block, _ = GGML_QUANT_SIZES[ggml_type(chosen)]
    return chosen if tensor.ndim == 2 and tensor.shape[-1] % block == 0 else None


def _quantize(array: np.ndarray, quant: str) -> np.ndarray:
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type(quant))  # (rows, bytes)


def round_trip(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """`weight` as the quantized file holds it: quantized along its last dim, then dequantized."""
    from gguf import quants

    packed = _quantize(weight.detach().float().cpu().numpy(), quant)
    values = quants.dequantize(packed, ggml_type(quant))  # (rows, cols) float32
    return torch.from_numpy(values).to(device=weight.device, dtype=weight.dtype)


def quantized_copy(model: nn.Module, quant: str) -> nn.Module:
    """A copy of `model` whose weights hold the values the GGUF file stores (tensor_quant); norms and
    biases stay exact, as in the file."""
    ggml_type(quant)  # an unknown type fails before the copy
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in quantized.named_parameters():  # tied weights come once
            chosen = tensor_quant(name, param, quant)
            if chosen is not None:
                param.copy_(round_trip(param, chosen))
    return quantized


# ------------------------------------------------------------------ GGUF file


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, quant: str, name: str) -> Path:
    """`model` (a stock Llama, merged version or base) as a GGUF file at `path`, written atomically."""
    from gguf import GGUFWriter

    config = model.config
    if config.model_type != "llama":
        raise UnsupportedQuantizationError(f"GGUF export supports the llama architecture, not {config.model_type!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, "llama")
    try:
        _write_config(writer, config, quant, name)
        _write_tokenizer(writer, tokenizer)
        for hf_name, gguf_name, tensor in _gguf_tensors(model):
            chosen = tensor_quant(hf_name, tensor, quant)
            if chosen is not None:
                writer.add_tensor(gguf_name, _quantize(tensor.numpy(), chosen), raw_dtype=ggml_type(chosen))
            else:
                writer.add_tensor(gguf_name, tensor.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_config(writer, config, quant: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(LlamaFileType[f"MOSTLY_{quant.upper()}"])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def _write_tokenizer(writer, tokenizer: Any) -> None:
    """A byte-level BPE tokenizer as GGUF's "gpt2" tokenizer model: tokens by id, merges, token types."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise UnsupportedQuantizationError(f"GGUF export writes BPE tokenizers, not {backend['model']['type']}")
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_token_scores([0.0] * len(tokens))  # unused by a BPE reader; transformers reads it when merges are empty
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensors(model: nn.Module):
    """(HF name, GGUF name, fp32 CPU tensor) of every weight; Q and K rows permuted as llama.cpp's converter
    does."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output when there is no output.weight
        module, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(module)
        if gguf_name is None:
            raise UnsupportedQuantizationError(f"no GGUF name for {hf_name}")
        tensor = tensor.detach().float().cpu()
        if module.endswith("self_attn.q_proj"):
            tensor = _permute(tensor, config.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            tensor = _permute(tensor, config.num_key_value_heads)
        yield hf_name, f"{gguf_name}.{suffix}", tensor


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout: within each head, interleave the two halves of the rows."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
