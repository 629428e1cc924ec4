"""Shared pieces of every unlearning objective: inputs, outputs, and the token-level building blocks.

Conventions (Hugging Face causal LM): `logits` (B, T, V) at position t predict token t+1, so every
helper shifts once: logits[:, :-1] against labels[:, 1:]. `labels` (B, T) hold -100 where a token is
not scored (padding, and the prompt of a (prompt, answer) pair).

An objective is a pure function of logits and labels, so each one can be checked against a value
computed by hand on tiny fixed tensors; the trainer runs the model and fills `ObjectiveInputs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

# Streams of batches an objective may ask the trainer for.
FORGET, RETAIN = "forget", "retain"
MISMATCH = "mismatch"  # forget prompts answered with random retain responses (Yao et al. 2023)
REFUSAL = "refusal"  # forget prompts answered with a random "I don't know" sentence
RETAIN_REFUSAL = "retain_refusal"  # retain prompts answered with a refusal, aligned with RETAIN


@dataclass
class Stream:
    """One batch's logits on the model being trained (student) and, when asked for, the frozen base."""

    student: Tensor  # (B, T, V)
    labels: Tensor  # (B, T), IGNORE_INDEX where not scored
    attention_mask: Tensor  # (B, T), 1 on real tokens
    teacher: Tensor | None = None  # (B, T, V), no grad
    shared: Tensor | None = None  # (B, T) bool: the label token also occurs in a retain answer (forget stream)
    # Objective.reads_hidden: every block's output (HF hidden_states: the embeddings, then block 0, 1, ...),
    # each (B, T, D) and aligned with labels, on the student and, for teacher streams, on the frozen base.
    hidden: tuple[Tensor, ...] | None = None
    teacher_hidden: tuple[Tensor, ...] | None = None


@dataclass
class ObjectiveInputs:
    streams: dict[str, Stream]

    def __getitem__(self, name: str) -> Stream:
        if name not in self.streams:
            raise KeyError(f"objective needs the {name!r} stream; the trainer did not provide it")
        return self.streams[name]

    def has(self, name: str) -> bool:
        return name in self.streams


@dataclass
class LossOutput:
    total: Tensor  # scalar, differentiable
    terms: dict[str, float] = field(default_factory=dict)  # named parts, for progress and logs


@dataclass(frozen=True)
class Objective:
    """A registered objective: its loss, default weights, and which batches/teacher passes it needs."""

    name: str
    loss: Callable[[ObjectiveInputs, Any], LossOutput]
    weights_type: type
    streams: tuple[str, ...]  # batches to build, FORGET first
    teacher_streams: tuple[str, ...] = ()  # streams that also need the frozen base's logits
    reference: str = ""
    # When set, the trainer first reinforces the layer on the forget items (plain NLL), replaces the FORGET
    # stream's labels with relabel(base_logits, reinforced_logits, labels, weights) -> labels (B, T), computed
    # teacher-forced on each forget item, and resets the layer to its initial weights before training (whp).
    relabel: Callable[[Tensor, Tensor, Tensor, Any], Tensor] | None = None
    reads_hidden: bool = False  # the trainer fills Stream.hidden (and teacher_hidden) for every stream (rmu)

    def weights(self, overrides: Mapping[str, float] | None = None) -> Any:
        """Default weights with `overrides` (TrainConfig.objective) applied; unknown keys are an error."""
        defaults = self.weights_type()
        if not overrides:
            return defaults
        known = {f.name for f in fields(defaults)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"objective {self.name!r} has no weight(s) {unknown}; known: {sorted(known)}")
        return replace(defaults, **{k: float(v) for k, v in overrides.items()})

    def __call__(self, inputs: ObjectiveInputs, weights: Any = None) -> LossOutput:
        return self.loss(inputs, weights if weights is not None else self.weights_type())


# ---- token-level building blocks -------------------------------------------------------------------


def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align predictions with targets: (B, T-1, V) logits and (B, T-1) labels."""
    return logits[:, :-1, :], labels[:, 1:]


def scored_mask(labels: Tensor) -> Tensor:
    return labels != IGNORE_INDEX


def predicting_positions(labels: Tensor) -> Tensor:
    """(B, T) true where the hidden state predicts a scored token (position t predicts labels[t + 1])."""
    scored = scored_mask(labels)  # (B, T)
    return torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where mask is true (a float mask weighs each value); 0 (not NaN) when nothing is scored."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def specificity_weights(stream: Stream, shared_weight: float) -> Tensor:
    """Per-token weights aligned with token_nll's output, (B, T-1): shared_weight where the target token
    also occurs in a retain answer (generic wording such as "The ... is located in"), 1 elsewhere."""
    _, targets = shift(stream.student, stream.labels)
    mask = scored_mask(targets).float()
    if stream.shared is None or shared_weight == 1.0:
        return mask
    shared = stream.shared[:, 1:].to(mask.device)
    return mask * torch.where(shared, shared_weight, 1.0)


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood -log p(y_t | y_<t), (B, T-1), and its scored mask (B, T-1)."""
    logits, targets = shift(logits, labels)
    mask = scored_mask(targets)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return -picked * mask, mask


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token NLL over scored tokens: the usual causal-LM loss."""
    nll, mask = token_nll(logits, labels)
    return masked_mean(nll, mask)


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """-log p(answer | prompt) per sequence, summed over its scored tokens, (B,)."""
    nll, _ = token_nll(logits, labels)
    return nll.sum(dim=-1)


def token_kl(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """KL(teacher || student) of the next-token distributions per position, (B, T-1), and its mask.

    KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)).
    """
    teacher, targets = shift(teacher_logits, labels)
    student, _ = shift(student_logits, labels)
    teacher_logp = F.log_softmax(teacher.float(), dim=-1)
    student_logp = F.log_softmax(student.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)  # (B, T-1)
    mask = scored_mask(targets)
    return kl * mask, mask


def mean_kl(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> Tensor:
    kl, mask = token_kl(teacher_logits, student_logits, labels)
    return masked_mean(kl, mask)


def token_entropy(logits: Tensor) -> Tensor:
    """H(p) = -sum_v p(v) log p(v) per position, (B, T) for (B, T, V) logits."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def kl_uniform_to_model(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """KL(U || p) per predicting position, (B, T-1): -log V - (1/V) sum_v log p(v).

    Zero exactly when the model's next-token distribution is uniform (maximum entropy).
    """
    shifted, targets = shift(logits, labels)
    logp = F.log_softmax(shifted.float(), dim=-1)
    vocab = logp.shape[-1]
    kl = -math.log(vocab) - logp.mean(dim=-1)
    mask = scored_mask(targets)
    return kl * mask, mask


def capped(values: Tensor, cap: float) -> Tensor:
    """min(values, cap): a hinge that stops pushing a term once it reached cap (gradient 0 beyond)."""
    if math.isinf(cap):
        return values
    return values.clamp(max=cap)


def scalar(value: Tensor) -> float:
    return float(value.detach().float().item())
