"""Tiny random models and a byte-level tokenizer, built in memory: fully offline and deterministic.

Unit tests and the built-in `tiny-random-llama` / `tiny-random-gpt2` model names use these, so every
code path of the engine (attach, train, fuse, publish, serve) runs in seconds on a CPU.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

TinyFamily = Literal["llama", "gpt2"]
TINY_FAMILIES: tuple[str, ...] = ("llama", "gpt2")

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2; the 256 byte symbols follow

# Minimal role-tagged template: enough for apply_chat_template(..., add_generation_prompt=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 512


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 3 special tokens + one token per byte (259 ids), no merges.

    Every string round-trips through encode/decode; the vocabulary never depends on data.
    """
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(byte_symbols):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: TinyFamily, vocab_size: int, hidden: int = HIDDEN):
    """Config of a 2-layer, 64-wide (or `hidden`-wide) model of the given family (ids match tiny_tokenizer)."""
    pad_id, bos_id, eos_id = 0, 1, 2
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=True,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        )
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {TINY_FAMILIES}")


def tiny_model(family: TinyFamily = "llama", seed: int = 0, hidden: int = HIDDEN) -> PreTrainedModel:
    """A randomly initialised tiny causal LM; same (family, seed) gives the same weights.

    The global RNG state is left untouched (weights are drawn inside torch.random.fork_rng).
    """
    config = tiny_config(family, vocab_size=len(tiny_tokenizer()), hidden=hidden)
    model_class = LlamaForCausalLM if family == "llama" else GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def sharp_tiny_model(family: TinyFamily = "llama", seed: int = 0) -> PreTrainedModel:
    """tiny_model with its weight matrices scaled 8x: a random model's greedy path is otherwise one repeated
    token, and decoding tests need distinct tokens with clear margins."""
    model = tiny_model(family, seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(8.0)
    return model
