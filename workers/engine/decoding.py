"""Decoding with the KV cache: the one forward-step loop behind serving, verification and retain answers.

A batch of prompts is left-padded to one width, so every row's next token comes from position -1. Each
row's position ids count only its own tokens (attention_mask.cumsum - 1), as Hugging Face `generate` does,
so a padded row decodes exactly as it would alone. An unpadded batch (serving: the n choices of one
prompt) passes no mask and no position ids and leaves the model its own causal path, the fastest one.

A sequence ends at a stop token: the tokenizer's EOS or the model's generation-config EOS (chat models
end a turn with their own), `stop_token_ids`, the one place they are collected.

torch is imported inside the functions: the API process imports this module (serving/generation.py) at
start-up and must load torch only once it serves a model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
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


class KVDecoder:
    """Forward passes over a batch of prompts, one step at a time: next_logits(), then feed(the tokens
    chosen from them), repeated. How tokens are chosen and when to stop is the caller's.

    `lock` is held for each forward pass (serving: one pass at a time per process). A model that returns no
    KV cache (a hand-built test model) is fed the whole sequence at every step.
    """

    def __init__(self, model: nn.Module, prompts: Sequence[list[int]], pad_id: int = 0,
                 lock: AbstractContextManager | None = None) -> None:
        import torch

        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        self.model, self.lock = model, lock or nullcontext()
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts],
                                dtype=torch.long, device=device)  # (B, T)
        self.mask = None  # (B, T) 1 = real token; None while no row is padded
        if any(len(p) < width for p in prompts):
            self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                     dtype=torch.long, device=device)
        self.pending = self.ids  # what the next pass reads: the prompts (B, T), then new tokens (B, 1)
        self.past: Any = None

    def next_logits(self) -> Tensor:
        """(B, V) fp32 logits of every row's next token."""
        inputs = {"input_ids": self.pending, "past_key_values": self.past, "use_cache": True}
        if self.mask is not None:
            positions = (self.mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): pads sit at 0, ignored anyway
            inputs |= {"attention_mask": self.mask, "position_ids": positions[:, -self.pending.shape[1]:]}
        with self.lock:
            out = self.model(**inputs)
        self.past = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :].float()

    def feed(self, tokens: Tensor) -> None:
        """Append one token per row, (B,): the next pass reads them."""
        import torch

        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        self.pending = self.ids if self.past is None else tokens[:, None]


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

    decoder = KVDecoder(model, prompts, pad_id)
    stop_tensor = torch.tensor(sorted(stops) or [-1], device=decoder.ids.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=decoder.ids.device)  # (B,)
    new_tokens: list[Tensor] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = choose(decoder.next_logits()).masked_fill(done, pad_id)  # (B,) ended rows get padding
            new_tokens.append(token)
            done |= torch.isin(token, stop_tensor)
            if bool(done.all()):
                break
            decoder.feed(token)
    if not new_tokens:
        return [[] for _ in prompts]
    return [_until_stop(row, stops) for row in torch.stack(new_tokens, dim=1).tolist()]


def _until_stop(tokens: list[int], stops: Collection[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens
