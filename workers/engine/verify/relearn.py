"""Relearning probe: do a few fine-tuning steps on part of the forget set bring the rest back?

Hidden-not-erased knowledge returns after a handful of steps on related data (Lynch et al. 2024, "Eight
Methods to Evaluate Robust Unlearning in LLMs"; Hu et al. 2024, "Jogging the Memory of Unlearned LLMs").
The probe trains (Adam, plain LM loss on the answer / text tokens) on the first `train_fraction` of the
forget items and measures NLL and ROUGE-L recall on the others before and after. The caller's model is
left exactly as it was: trained parameters are restored from a copy (and requires_grad flags and .grad
too), or, with `trainable=None`, a deep copy of the whole model is trained instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .scoring import EvalItem, encode_item, mean_nll_loss, pad_token_id, to_eval_items
from .suite import EvalConfig, set_metrics


def _probe_params(model: nn.Module, trainable: Any) -> tuple[nn.Module, list[nn.Parameter]]:
    """(model to train, its parameters to train). trainable: None (copy of the whole model), an object with
    trainable_parameters() (an attached layer), or an iterable of parameters of `model`."""
    if trainable is None:
        clone = copy.deepcopy(model)
        return clone, list(clone.parameters())
    if hasattr(trainable, "trainable_parameters"):
        return model, list(trainable.trainable_parameters())
    return model, list(trainable)


@contextmanager
def _restored(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only `params` require grad inside; on exit every value, grad and requires_grad flag is put back."""
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved = [(p.detach().clone(), p.grad) for p in params]
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        with torch.no_grad():
            for p, (value, grad) in zip(params, saved):
                p.copy_(value)
                p.grad = grad
        for p, flag in zip(all_params, flags):
            p.requires_grad_(flag)


def _split(items: Sequence[EvalItem], train_fraction: float) -> tuple[list[EvalItem], list[EvalItem]]:
    """First ceil(fraction * n) items to train on, the rest to measure (all of them if nothing is left)."""
    n_train = min(len(items), max(1, math.ceil(train_fraction * len(items))))
    train, held = list(items[:n_train]), list(items[n_train:])
    return train, held or list(train)


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("nll", "prob", "rougeL") if k in metrics}


def relearn_probe(
    model: nn.Module,
    tokenizer: Any,
    trainable: Any,
    forget: Iterable[Any],
    steps: int = 5,
    lr: float = 5e-4,
    train_fraction: float = 0.5,
    cfg: EvalConfig | None = None,
) -> dict[str, Any]:
    """{steps, lr, n_train, n_eval, held_out, before: {nll, prob, rougeL}, after: {...}, nll_drop,
    rougeL_gain}.

    nll_drop > 0 and rougeL_gain > 0 mean the forgotten answers come back. held_out is False when the
    forget set had a single item, so training and measuring used the same one.
    """
    cfg = cfg or EvalConfig()
    items = to_eval_items(forget)[: cfg.max_forget]
    if not items:
        raise ValueError("the relearning probe needs at least one forget item")
    train, held = _split(items, train_fraction)
    target, params = _probe_params(model, trainable)
    before, _ = set_metrics(target, tokenizer, held, cfg)
    encodings = [encode_item(tokenizer, item, cfg.max_length) for item in train]
    was_training = target.training
    with _restored(target, params):
        target.eval()  # no dropout: the probe measures the weights, not the noise
        optimizer = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            mean_nll_loss(target, encodings, pad_token_id(tokenizer)).backward()
            optimizer.step()
        after, _ = set_metrics(target, tokenizer, held, cfg)
    target.train(was_training)
    before_s, after_s = _summary(before), _summary(after)
    result: dict[str, Any] = {
        "steps": steps,
        "lr": lr,
        "n_train": len(train),
        "n_eval": len(held),
        "held_out": len(items) > 1,
        "before": before_s,
        "after": after_s,
    }
    if "nll" in before_s and "nll" in after_s:
        result["nll_drop"] = before_s["nll"] - after_s["nll"]
    if "rougeL" in before_s and "rougeL" in after_s:
        result["rougeL_gain"] = after_s["rougeL"] - before_s["rougeL"]
    return result
