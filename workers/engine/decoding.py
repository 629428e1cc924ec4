"""Decoding with the KV cache: the one forward-step loop behind serving, verification and retain answers.

A batch of prompts is left-padded to one width, so every row's next token comes from position -1. Each
row's position ids count only its own tokens (attention_mask.cumsum - 1), as Hugging Face `generate` does,
so a padded row decodes exactly as it would alone. Rows may join and leave a running batch between steps
(DecodeBatch: the serving scheduler's continuous batching). A batch without padding (one client, or the n
choices of one prompt) passes no mask and no position ids and leaves the model its own causal path, the
fastest one.

A sequence ends at a stop token: the tokenizer's EOS or the model's generation-config EOS (chat models
end a turn with their own), `stop_token_ids`, the one place they are collected.

torch is imported inside the functions: the API process imports this module (serving/generation.py) at
start-up and must load torch only once it serves a model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn


def stop_token_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """EOS ids of the tokenizer and of the model's generation config."""
    stops: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, (list, tuple)):
            stops.update(int(v) for v in value)
    return frozenset(stops)


class DecodeBatch:
    """Rows of different lengths decoding together, one forward pass per step for all of them.

    ids and attention mask are left-padded to one width, (B, T), and the KV cache carries the same padding
    (zero keys/values under mask 0), so rows may join (`add`: their prompts are prefilled, padded to the
    batch's width or the batch to theirs) and leave (`keep`) between steps: continuous batching. Each row's
    position ids count only its own tokens (mask.cumsum - 1), as Hugging Face `generate` does, so a row
    decodes as it would alone.

    `lock` is held for each forward pass (serving: one pass at a time per process). A model that returns no
    KV cache, or one whose cache is not a plain per-layer (B, H, T, D) cache, is fed the whole sequence at
    every step instead: slower, same tokens.

    A model whose unlearning layer acts per sequence (layers/scope.py, `model.unlearn_scope`) has each new
    row's prompt decided once, when it joins, and that decision pinned for every forward of the row.
    """

    def __init__(self, model: nn.Module, pad_id: int = 0, lock: AbstractContextManager | None = None) -> None:
        import torch

        self.model, self.pad_id, self.lock = model, pad_id, lock or nullcontext()
        self.device = next(model.parameters()).device
        self.ids = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, T)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, T) 1 = real token
        self.cache: Any = None  # the model's KV cache of all rows, or None (fed whole sequences)
        self.scope = getattr(model, "unlearn_scope", None)  # layers/scope.SequenceScope, or None
        self.row_scale = torch.zeros(0, device=self.device)  # (B,) each row's scope decision (1 = layer on)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def add(self, prompts: Sequence[list[int]]) -> Tensor:
        """Prefill `prompts` as new rows at the end of the batch; returns their next-token logits (k, V)."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts],
                           dtype=torch.long, device=self.device)  # (k, W)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            dtype=torch.long, device=self.device)  # (k, W)
        scale = self._decide(ids, mask)  # (k,)
        logits, cache = self._forward(ids, mask, None, scale)
        if self.rows and (self.cache is None) != (cache is None):
            raise RuntimeError("the model returned a KV cache for some passes and not for others")
        self.row_scale = torch.cat([self.row_scale, scale])
        if self.rows == 0:
            self.ids, self.mask, self.cache = ids, mask, cache
            return logits
        grow_old, grow_new = max(0, width - self.ids.shape[1]), max(0, self.ids.shape[1] - width)
        self.ids = torch.cat([_left_pad(self.ids, grow_old, self.pad_id), _left_pad(ids, grow_new, self.pad_id)])
        self.mask = torch.cat([_left_pad(self.mask, grow_old, 0), _left_pad(mask, grow_new, 0)])
        if self.cache is not None:
            for old, new in zip(_cache_layers(self.cache), _cache_layers(cache)):
                old.keys = torch.cat([_left_pad(old.keys, grow_old, 0.0), _left_pad(new.keys, grow_new, 0.0)])
                old.values = torch.cat([_left_pad(old.values, grow_old, 0.0),
                                        _left_pad(new.values, grow_new, 0.0)])
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row, (B,), and return every row's next-token logits (B, V)."""
        import torch

        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        fed = self.ids if self.cache is None else tokens[:, None]
        logits, self.cache = self._forward(fed, self.mask, self.cache, self.row_scale)
        return logits

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order); columns that are padding in every remaining row are dropped."""
        import torch

        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.ids, self.mask, self.row_scale = self.ids[index], self.mask[index], self.row_scale[index]
        real = self.mask.any(dim=0).nonzero()
        first = int(real[0]) if len(real) else self.mask.shape[1]
        self.ids, self.mask = self.ids[:, first:], self.mask[:, first:]
        if self.cache is not None:
            if not len(rows):
                self.cache = None
                return
            for layer in _cache_layers(self.cache):
                layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]

    def _decide(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Each new row's scope decision (k,): 1 where the layer acts on it; all 1 without a scope."""
        if self.scope is None:
            return mask.new_ones(mask.shape[0], dtype=self.row_scale.dtype)
        with self.lock:
            return self.scope.decide(ids, mask)

    def _forward(self, fed: Tensor, mask: Tensor, cache: Any, scale: Tensor) -> tuple[Tensor, Any]:
        inputs = {"input_ids": fed, "past_key_values": cache, "use_cache": True}
        if _takes_logits_to_keep(type(self.model)):  # a prefill needs one position's logits, not (B, T, V)
            inputs["logits_to_keep"] = 1
        if not bool(mask.all()):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): pads sit at 0, masked anyway
            inputs |= {"attention_mask": mask, "position_ids": positions[:, -fed.shape[1]:]}
        with self.lock, (nullcontext() if self.scope is None else self.scope.rows(scale)):
            out = self.model(**inputs)
        cache = getattr(out, "past_key_values", None)
        if cache is not None and _cache_layers(cache) is None:
            cache = None  # not a cache rows can join or leave: feed whole sequences instead
        return out.logits[:, -1, :].float(), cache


@lru_cache(maxsize=32)
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward takes `logits_to_keep` (transformers' causal LMs do; hand-built ones
    may not)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _left_pad(tensor: Tensor, columns: int, value: float) -> Tensor:
    """Pad the sequence dimension on the left: dim 1 of (B, T) ids/masks, dim 2 of (B, H, T, D) KV."""
    if columns == 0:
        return tensor
    import torch.nn.functional as F

    pad = (columns, 0) if tensor.dim() == 2 else (0, 0, columns, 0)
    return F.pad(tensor, pad, value=value)


def _cache_layers(cache: Any) -> list[Any] | None:
    """The per-layer (keys, values) holders of a transformers DynamicCache; None for any other cache (sliding
    windows, static or quantised caches keep state that rows cannot simply be concatenated into)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return list(layers)


def greedy_generate(
    model: nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    pad_id: int = 0,
    stops: Collection[int] = frozenset(),
    batch_size: int = 8,
) -> list[list[int]]:
    """New token ids per prompt: greedy, up to max_new_tokens, cut before the first stop token."""
    return _generate(model, prompts, max_new_tokens, pad_id, stops, batch_size, lambda logits: logits.argmax(-1))


def sample_generate(
    model: nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    seed: int,
    pad_id: int = 0,
    stops: Collection[int] = frozenset(),
    batch_size: int = 8,
    temperature: float = 1.0,
) -> list[list[int]]:
    """New token ids per prompt, sampled from softmax(logits / temperature) with a seeded generator."""
    import torch

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def choose(logits: Tensor) -> Tensor:  # (B, V) -> (B,)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return _generate(model, prompts, max_new_tokens, pad_id, stops, batch_size, choose)


def _generate(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int,
              stops: Collection[int], batch_size: int, choose: Callable[[Tensor], Tensor]) -> list[list[int]]:
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outputs.extend(_decode_batch(model, prompts[start:start + batch_size], max_new_tokens, pad_id, stops, choose))
    return outputs


def _decode_batch(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int,
                  stops: Collection[int], choose: Callable[[Tensor], Tensor]) -> list[list[int]]:
    import torch

    batch = DecodeBatch(model, pad_id)
    stop_tensor = torch.tensor(sorted(stops) or [-1], device=batch.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=batch.device)  # (B,)
    new_tokens: list[Tensor] = []
    with torch.no_grad():
        logits = batch.add(prompts) if max_new_tokens > 0 else None
        for _ in range(max_new_tokens):
            token = choose(logits).masked_fill(done, pad_id)  # (B,) ended rows get padding
            new_tokens.append(token)
            done |= torch.isin(token, stop_tensor)
            if bool(done.all()):
                break
            logits = batch.step(token)
    if not new_tokens:
        return [[] for _ in prompts]
    return [_until_stop(row, stops) for row in torch.stack(new_tokens, dim=1).tolist()]


def _until_stop(tokens: list[int], stops: Collection[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens
