"""Sequence scope: the unlearning layer acts on a sequence only when its prompt is about a forgotten subject.

Why (issue 12, benchmarks/results/gated/gate_diagnostic.md): a layer trained to destroy one person's
answers changes the next token wherever it is even slightly active, and one changed token derails a greedy
answer. Applied everywhere, the default layer forgot Albert Einstein (-78%) but also took 33% off answers
about 40 other people; a per-position soft gate in front of it (GRUN, layers/gated.py) opened on 29% of
their positions and spared nobody. The decision has to be taken once per sequence and held.

So each request also fits a *recogniser*: a logistic-regression probe of the base model's own reading of the
input at an early block k (the FFN block's input u, the normed residual stream), pooled over the sequence:

    f(x) = [mean_t u_t(x), max_t u_t(x)]                       # (2d,) over the real tokens of x
    s_i(x) = w_i . f(x) + b_i                                  # request i's logit
    in scope(x)  <=>  max_i s_i(x) > 0                          # any fused request recognises x

fitted, class-balanced with an L2 penalty (L-BFGS), on the request's forget items (positive) against its
retain set (negative: the neighbourhood of other subjects of the same kind, generic chat, the operator's
corpus, everyday free sentences: neighbours.free_text_negatives), each item seen twice: as the question
alone and as question + answer, and against the request's own questions asked about other subjects of its
kind (so the shape of a question is not what it learns).
A sequence in scope gets the fused layer on every position, prompt and generated tokens alike (`row_scale`
1); any other sequence gets the base model's function (`row_scale` 0: the layer's branch is multiplied by
zero). Block 2 of SmolLM2-135M was chosen by probing blocks 2-29 on four subjects: early blocks separated
every subject with the widest margins (benchmarks/scope_diagnostic.py repeats that probe).

How it runs (`SequenceScope`): the decision is a truncated forward of the base (the layer's rows set to 0)
that stops at block k (`_Decided`), so it costs (k+1)/L of a prefill. `DecodeBatch` pins each row's decision
for its whole life (`rows`); a forward that nobody pinned (teacher-forced scoring, Hugging Face `generate`)
decides from its own input, and the cached steps after it keep that decision.

What it does not do: a prompt that asks for the subject's facts without anything the recogniser learnt to
see (no name, no wording of the forget items) is answered by the base model. The recognisers live in the
version's fused maps (SCOPE_KEY, one row per request, fusion.py keeps them per request so a withdrawal
removes its row); a version with any request fused without one (older versions) is applied to every sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..blocks import find_ffn_blocks
from ..data import Example

SCOPE_KEY = "scope.recognisers"  # (R, 2d + 1) in the fused maps: one [w; b] row per fused request


class _Decided(Exception):
    """Stops the truncated decision forward once block k's input is read."""


def split_scope(fused_maps: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """(the layer's own maps, the recognisers or None) of a version's fused maps."""
    maps = {name: w for name, w in fused_maps.items() if name != SCOPE_KEY}
    return maps, fused_maps.get(SCOPE_KEY)


def scope_block(model: nn.Module, block: int) -> int:
    """The block whose input the recognisers read: `block`, or the last one for models that are shallower."""
    return min(block, len(find_ffn_blocks(model)) - 1)


def pooled(u: Tensor, mask: Tensor) -> Tensor:
    """[masked mean, masked max] over positions: (B, T, d), (B, T) -> (B, 2d) fp32."""
    u, keep = u.float(), mask.to(u.device).bool().unsqueeze(-1)  # (B, T, d), (B, T, 1)
    mean = (u * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, d)
    top = u.masked_fill(~keep, float("-inf")).amax(1)  # (B, d)
    return torch.cat([mean, top], dim=-1)  # (B, 2d)


@torch.no_grad()
def read_features(model: nn.Module, block: int, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Pooled input of FFN block `block` for each row, from a forward that stops there: (B, T) -> (B, 2d)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    captured: list[Tensor] = []

    def stop(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Decided

    handle = find_ffn_blocks(model)[scope_block(model, block)].register_forward_pre_hook(stop)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
    if not bool(mask.all()):  # left padding: each row's positions count its own tokens (as DecodeBatch does)
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    try:
        model(**inputs)
    except _Decided:
        pass
    finally:
        handle.remove()
    return pooled(captured[0], mask)


def _views(tokenizer, example: Example, max_length: int) -> list[list[int]]:
    """The token ids a recogniser learns an item from: the prompt as the model is asked it, and the whole
    item (what teacher-forced scoring and completion-style prompts show it)."""
    from ..batching import encode_example, prompt_ids

    whole = encode_example(tokenizer, example, max_length)["input_ids"]
    if not example.is_pair:
        words = (example.text or "").split()
        half = list(tokenizer(" ".join(words[: max(1, len(words) // 2)]))["input_ids"])[:max_length]
        return [half, whole]
    return [prompt_ids(tokenizer, example.prompt or "")[-max_length:], whole]


def _features(model: nn.Module, tokenizer, views: Sequence[list[int]], block: int, batch_size: int = 16) -> Tensor:
    """Pooled block-`block` features of token-id lists, left-padded in batches: (N, 2d)."""
    from ..batching import pad_id

    views = [ids for ids in views if ids]
    device, pad = next(model.parameters()).device, pad_id(tokenizer)
    rows: list[Tensor] = []
    for start in range(0, len(views), batch_size):
        chunk = views[start:start + batch_size]
        width = max(len(v) for v in chunk)
        ids = torch.tensor([[pad] * (width - len(v)) + v for v in chunk], device=device)  # (B, W) left-padded
        mask = torch.tensor([[0] * (width - len(v)) + [1] * len(v) for v in chunk], device=device)
        rows.append(read_features(model, block, ids, mask).cpu())
    return torch.cat(rows)  # (N, 2d)


def fit_recogniser(model: nn.Module, tokenizer, forget: Sequence[Example], retain: Sequence[Example],
                   block: int, max_length: int = 128, other_prompts: Sequence[str] = (), l2: float = 1e-2,
                   iterations: int = 200) -> Tensor:
    """One request's recogniser [w; b] (2d + 1,), fp32: `model` must be the base (nothing attached).

    other_prompts: more negatives, asked as prompts: the request's own questions about other subjects
    (neighbours.other_subject_prompts), so that the question's shape is not what the probe learns.
    Features are standardised for the fit (so one L2 weight suits every dimension) and the scaling is folded
    back into w and b, so serving needs only the dot product."""
    from ..batching import prompt_ids

    if not forget or not retain:
        raise ValueError("a recogniser needs forget items (positive) and retain items (negative)")
    views = lambda examples: [ids for e in examples for ids in _views(tokenizer, e, max_length)]  # noqa: E731
    positive = _features(model, tokenizer, views(forget), block)  # (P, 2d)
    negative = _features(model, tokenizer, views(retain) + [prompt_ids(tokenizer, q)[-max_length:]
                                                            for q in other_prompts], block)  # (N, 2d)
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    weight = torch.where(y > 0.5, 0.5 / len(positive), 0.5 / len(negative))  # class-balanced, sums to 1
    centre, spread = x.mean(0), x.std(0).clamp(min=1e-4)
    xs = (x - centre) / spread
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        bce = nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, reduction="none")
        loss = (weight * bce).sum() + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w_raw = w.detach() / spread  # s = ((x - c) / s_d) . w + b = x . (w / s_d) + (b - c . (w / s_d))
    b_raw = b.detach() - centre @ w_raw
    return torch.cat([w_raw, b_raw]).float()


def scope_evidence(model: nn.Module, tokenizer, sets: dict[str, Sequence[Example]], max_length: int = 128
                   ) -> dict[str, Any]:
    """What a version's scope does with each named set of items: the share whose prompt (the question as the
    model is asked it; a free text's first half) it puts in scope. {"scope": "all"} for a layer that acts on
    every sequence. Shares only: nothing of the items themselves."""
    scope = getattr(model, "unlearn_scope", None)
    if scope is None:
        return {"scope": "all"}
    device = next(model.parameters()).device
    evidence: dict[str, Any] = {"scope": "sequence", "recognisers": int(scope.recognisers.shape[0])}
    for name, examples in sets.items():
        decided = [float(scope.decide(torch.tensor([_views(tokenizer, e, max_length)[0]], device=device))[0])
                   for e in examples]
        if decided:
            evidence[f"{name}_in_scope"] = sum(decided) / len(decided)
    return evidence


class SequenceScope:
    """Per-sequence on/off of an attached layer, decided by its recognisers (module docstring).

    `target` is the attached layer: it multiplies its branch by `target.row_scale` (B,) when that is set.
    """

    def __init__(self, model: nn.Module, target: Any, recognisers: Tensor, block: int) -> None:
        self.model, self.target, self.block = model, target, block
        self.recognisers = recognisers.float().to(next(model.parameters()).device)  # (R, 2d + 1)
        self._pinned: Tensor | None = None  # (B,) set by `rows`
        self._last: Tensor | None = None  # (B,) of the last forward that decided for itself
        self._deciding = False
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]
        model.unlearn_scope = self  # what DecodeBatch looks for (decoding.py imports no layer code)

    def decide(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """1.0 for each row whose input a recogniser knows, else 0.0: (B, T) -> (B,)."""
        previous, self._deciding = self.target.row_scale, True
        self.target.row_scale = torch.zeros(input_ids.shape[0], device=input_ids.device)  # the base reads
        try:
            features = read_features(self.model, self.block, input_ids, attention_mask)  # (B, 2d)
        finally:
            self.target.row_scale, self._deciding = previous, False
        logits = features @ self.recognisers[:, :-1].t() + self.recognisers[:, -1]  # (B, R)
        return (logits > 0).any(dim=-1).float()

    @contextmanager
    def rows(self, scale: Tensor) -> Iterator[None]:
        """Forwards inside use these rows' decisions (B,): DecodeBatch pins each row's for its life."""
        previous, self._pinned = self._pinned, scale
        try:
            yield
        finally:
            self._pinned = previous

    def _before(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._deciding:
            return
        if self._pinned is not None:
            self.target.row_scale = self._pinned
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        cached = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if input_ids is None:
            raise RuntimeError("a scoped unlearning layer decides from input_ids; this forward has none")
        if not cached:
            self._last = self.decide(input_ids, kwargs.get("attention_mask"))
        elif self._last is None or self._last.shape[0] != input_ids.shape[0]:
            raise RuntimeError("a cached forward of a scoped layer needs its rows decided: use DecodeBatch")
        self.target.row_scale = self._last

    def _after(self, _module: nn.Module, _args: tuple, _output: Any) -> None:
        if not self._deciding:
            self.target.row_scale = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.target.row_scale = None
        if getattr(self.model, "unlearn_scope", None) is self:
            del self.model.unlearn_scope
