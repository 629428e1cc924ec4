"""Train one request's unlearning layer against the frozen base model.

Only the attached layer's parameters are optimised (AdamW); the base model's weights are frozen for
the run and never written. The teacher (the original model) is the same model object with the layer
bypassed (`attached.disabled()`), so no second copy of the base is held in memory.

Deterministic for a given seed on a given device: the layer's init is seeded by its creator, batches
come from seeded permutations (batching.index_batches) and the model runs in eval mode (no dropout).
On CUDA the forward passes run under bf16 autocast; the layer and its optimiser state stay fp32.

An objective with `relabel` (whp) gets a phase before the main loop (generic_forget): the layer is trained
on the forget items alone (plain NLL, cfg.steps steps), the forget labels are replaced by relabel(base,
reinforced) and the layer is put back to its initial weights; the main loop then trains on the new labels.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .batching import Encoded, batches, collate, encode, mismatched, pad_id, refusals_for
from .config import TrainConfig
from .data import Example
from .layers.base import AttachedLayerProtocol, model_device
from .layers.gated import fit_gates
from .objectives import (
    FORGET,
    IGNORE_INDEX,
    MISMATCH,
    REFUSAL,
    RETAIN,
    RETAIN_REFUSAL,
    Objective,
    ObjectiveInputs,
    Stream,
    get_objective,
)
from .objectives.base import mean_nll, predicting_positions

# Each stream's batch order has its own seed offset; RETAIN_REFUSAL shares RETAIN's so that row i of
# both batches holds the same retain prompt (the answer-preservation term compares them row by row).
STREAM_SEED_OFFSETS = {FORGET: 0, RETAIN: 1, MISMATCH: 2, REFUSAL: 3, RETAIN_REFUSAL: 1}


@dataclass
class Progress:
    step: int  # 1-based, steps done so far
    total: int
    loss: float
    eta_seconds: float
    terms: dict[str, float] = field(default_factory=dict)


class Cancelled(Exception):
    """should_stop() returned true: training stopped before finishing."""


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    terms: list[dict[str, float]] = field(default_factory=list)  # per step, the objective's named parts


def stream_examples(objective: Objective, forget: Sequence[Example], retain: Sequence[Example], seed: int
                    ) -> dict[str, list[Example]]:
    """The example list behind every stream the objective asks for."""
    if not forget:
        raise ValueError("nothing to forget: the forget set is empty")
    if not retain:
        raise ValueError("the retain set is empty; build one with workers.engine.retain.build_retain")
    builders: dict[str, Callable[[], list[Example]]] = {
        FORGET: lambda: list(forget),
        RETAIN: lambda: list(retain),
        MISMATCH: lambda: mismatched(forget, retain, seed),
        REFUSAL: lambda: refusals_for(forget, seed, variants=4),
        RETAIN_REFUSAL: lambda: refusals_for(retain, seed + 1, variants=1),
    }
    return {name: builders[name]() for name in objective.streams}


def stream_encoded(tokenizer, examples: dict[str, list[Example]], cfg: TrainConfig) -> dict[str, list[Encoded]]:
    return {name: encode(tokenizer, items, cfg.max_length) for name, items in examples.items()}


def stream_batches(encoded: dict[str, list[Encoded]], cfg: TrainConfig, pad: int
                   ) -> dict[str, Iterator[dict[str, Tensor]]]:
    """cfg.steps seeded batches per stream; the same stream and config always give the same batches."""
    return {
        name: batches(items, cfg.batch_size, cfg.steps, cfg.seed + STREAM_SEED_OFFSETS[name], pad)
        for name, items in encoded.items()
    }


@contextmanager
def frozen_base(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """requires_grad off for every base parameter (no wasted backward), eval mode; restored afterwards."""
    own = {id(p) for p in trainable}
    saved = [(p, p.requires_grad) for p in model.parameters() if id(p) not in own]
    was_training = model.training
    for p, _ in saved:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def first_predicting_position(labels: Tensor) -> int:
    """Earliest position whose logits predict a scored token (logits[t] predict labels[t+1])."""
    scored_columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return max(int(scored_columns[0]) - 1, 0) if len(scored_columns) else 0


def accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def kept_from(model: nn.Module, labels: Tensor) -> int:
    """First position whose logits are computed: the first predicting a scored token where the model can
    skip the others (HF `logits_to_keep`), else 0."""
    return first_predicting_position(labels) if accepts_logits_to_keep(model) else 0


def forward_from(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, start: int, hidden: bool = False
                 ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """(B, T - start, V) logits of positions start.. (start 0: all of them, any model) and, when asked,
    every block's output at the same positions (HF hidden_states, each (B, T - start, D))."""
    extra = {"logits_to_keep": input_ids.shape[1] - start} if start else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden, **extra)
    states = tuple(h[:, start:] for h in out.hidden_states) if hidden else None
    return out.logits, states


def logits_from(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, start: int) -> Tensor:
    """(B, T - start, V) logits of positions start.. (start 0: all of them, any model)."""
    return forward_from(model, input_ids, attention_mask, start)[0]


def answer_vocabulary(tokenizer, examples: Sequence[Example], max_length: int) -> Tensor:
    """Sorted ids of every token scored in `examples` (the answers of pairs, all of a free text)."""
    encoded = encode(tokenizer, examples, max_length)
    ids = {label for item in encoded for label in item["labels"] if label != IGNORE_INDEX}
    return torch.tensor(sorted(ids), dtype=torch.long)


# A gated layer's gate (layers/gated.py) is taught to open where the forget answers are predicted and to stay
# shut where the retain answers are (measured: also shutting it on retain prompts separates the answers worse).
GATE_TARGETS = {FORGET: 1.0, RETAIN: 0.0}


def gate_batches(tokenizer, examples: dict[str, list[Example]], cfg: TrainConfig
                 ) -> list[tuple[dict[str, Tensor], Tensor, float]]:
    """(batch, predicting positions, gate target) over every forget and retain example once."""
    pad, labelled = pad_id(tokenizer), []
    for name, target in GATE_TARGETS.items():
        encoded = encode(tokenizer, examples.get(name, []), cfg.max_length)
        for i in range(0, len(encoded), 8):
            batch = collate(encoded[i:i + 8], pad)
            labelled.append((batch, predicting_positions(batch["labels"]), target))
    return labelled


def forward_streams(model: nn.Module, attached: AttachedLayerProtocol, objective: Objective,
                    batch: dict[str, dict[str, Tensor]], device: torch.device,
                    retain_vocabulary: Tensor | None = None) -> tuple[ObjectiveInputs, Tensor | None]:
    """Student (and, where asked, teacher) logits of every stream's batch, and the gate loss of a gated
    layer (mean over the forget and retain streams; None for other kinds).

    Every objective reads only scored positions, so logits are computed from the first position that
    predicts a scored token on (HF `logits_to_keep`): for chat pairs that skips the prompt, which
    saves most of the vocabulary projection and softmax, the largest tensors of a step.
    """
    streams: dict[str, Stream] = {}
    gate_losses: list[Tensor] = []
    gate_loss = getattr(attached, "gate_loss", None)
    for name, tensors in batch.items():
        input_ids = tensors["input_ids"].to(device)
        attention_mask = tensors["attention_mask"].to(device)
        start = kept_from(model, tensors["labels"])
        with autocast_for(device):
            student, hidden = forward_from(model, input_ids, attention_mask, start, objective.reads_hidden)
            if gate_loss is not None and name in GATE_TARGETS:
                term = gate_loss(GATE_TARGETS[name], predicting_positions(tensors["labels"]).to(device))
                if term is not None:
                    gate_losses.append(term)
            teacher = teacher_hidden = None
            if name in objective.teacher_streams:
                with attached.disabled(), torch.no_grad():
                    teacher, teacher_hidden = forward_from(model, input_ids, attention_mask, start,
                                                           objective.reads_hidden)
        labels = tensors["labels"][:, start:].to(device)  # (B, T'), aligned with the kept logits
        shared = None
        if name == FORGET and retain_vocabulary is not None:
            shared = torch.isin(labels, retain_vocabulary.to(device))  # (B, T')
        streams[name] = Stream(student, labels, attention_mask[:, start:], teacher, shared, hidden, teacher_hidden)
    return ObjectiveInputs(streams), (torch.stack(gate_losses).mean() if gate_losses else None)


def descend(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], loss: Tensor, grad_clip: float
            ) -> None:
    """One optimiser step on `loss`, gradients clipped to norm grad_clip (0: not clipped)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


# ---- relabelling objectives (whp): reinforce, relabel, reset -------------------------------------------


def reinforce(model: nn.Module, attached: AttachedLayerProtocol, forget_batches: Iterator[dict[str, Tensor]],
              cfg: TrainConfig, device: torch.device, on_step: Callable[[int, float], None],
              should_stop: Callable[[], bool] | None = None) -> None:
    """Make the forget items likelier still: AdamW on their plain causal-LM NLL, with the main loop's lr,
    weight decay and clipping (WHP's "reinforced model" is the model with the layer trained this way)."""
    params = attached.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step, tensors in enumerate(forget_batches, start=1):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled before reinforcement step {step} of {cfg.steps}")
        start = kept_from(model, tensors["labels"])
        with autocast_for(device):
            logits = logits_from(model, tensors["input_ids"].to(device), tensors["attention_mask"].to(device),
                                 start)  # (B, T', V)
        nll = mean_nll(logits, tensors["labels"][:, start:].to(device))
        loss = float(nll.detach().float())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{cfg.method} reinforcement NLL is {loss} at step {step}")
        descend(optimizer, params, nll, cfg.grad_clip)
        on_step(step, loss)


@torch.no_grad()
def relabelled(model: nn.Module, attached: AttachedLayerProtocol, objective: Objective, weights,
               encoded: Sequence[Encoded], cfg: TrainConfig, device: torch.device, pad: int) -> list[Encoded]:
    """The items with objective.relabel's labels and their own input ids (teacher-forced): the model with
    the layer as it is gives the reinforced logits, with the layer bypassed the base's. Batch by batch,
    keeping only label ids: never the (N, T, V) logits of every item."""
    out: list[Encoded] = []
    for first in range(0, len(encoded), cfg.batch_size):
        items = encoded[first:first + cfg.batch_size]
        tensors = collate(items, pad)
        input_ids, attention_mask = tensors["input_ids"].to(device), tensors["attention_mask"].to(device)
        start = kept_from(model, tensors["labels"])
        with autocast_for(device):
            reinforced = logits_from(model, input_ids, attention_mask, start)  # (B, T', V)
            with attached.disabled():
                base = logits_from(model, input_ids, attention_mask, start)  # (B, T', V)
        labels = tensors["labels"].clone()  # (B, T); columns before `start` predict nothing scored
        labels[:, start:] = objective.relabel(base, reinforced, labels[:, start:].to(device), weights).cpu()
        out += [{**item, "labels": labels[row, :len(item["labels"])].tolist()} for row, item in enumerate(items)]
    return out


def generic_forget(model: nn.Module, attached: AttachedLayerProtocol, objective: Objective, weights,
                   forget: list[Encoded], cfg: TrainConfig, device: torch.device, pad: int,
                   on_progress: Callable[[Progress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[Encoded]:
    """The forget items relabelled against a reinforced layer (reinforce, then relabelled); the layer is
    back at the weights it had on entry when this returns or raises.

    The reinforcement reuses the FORGET stream's seeded batches, so it sees the items in the order the
    main loop will. Its steps are reported as step 0 (not training steps) with an eta that counts each
    remaining step, its own and the main loop's, at a reinforcement step's cost: a lower bound, as a main
    step also runs the retain stream and the teacher.
    """
    initial = attached.state_dict()
    started = time.perf_counter()

    def report(step: int, loss: float) -> None:
        if on_progress is not None:
            eta = (time.perf_counter() - started) / step * (2 * cfg.steps - step)
            on_progress(Progress(0, cfg.steps, loss, eta, {"nll_reinforce": loss}))

    forget_batches = batches(forget, cfg.batch_size, cfg.steps, cfg.seed + STREAM_SEED_OFFSETS[FORGET], pad)
    try:
        reinforce(model, attached, forget_batches, cfg, device, report, should_stop)
        return relabelled(model, attached, objective, weights, forget, cfg, device, pad)
    finally:
        attached.load_state_dict(initial)


def train(
    model: nn.Module,
    tokenizer,
    attached: AttachedLayerProtocol,
    forget: Sequence[Example],
    retain: Sequence[Example],
    cfg: TrainConfig,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Optimise attached.trainable_parameters() on cfg.method's objective for cfg.steps steps.

    Calls on_progress after every step and should_stop before every step (raises Cancelled when it
    says stop). Raises FloatingPointError if the loss stops being finite. An objective with `relabel`
    first runs generic_forget (its reinforcement steps reported as step 0, not counted in result.steps).
    """
    objective = get_objective(cfg.method)
    weights = objective.weights(cfg.objective)
    device = model_device(model)
    params = attached.trainable_parameters()
    examples = stream_examples(objective, forget, retain, cfg.seed)
    encoded = stream_encoded(tokenizer, examples, cfg)
    pad = pad_id(tokenizer)
    retain_vocabulary = answer_vocabulary(tokenizer, examples[RETAIN], cfg.max_length) if RETAIN in examples else None

    result = TrainResult(losses=[], steps=0, seconds=0.0)
    started = time.perf_counter()
    with frozen_base(model, params), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if getattr(attached, "has_gates", False):
            fit_gates(model, attached, gate_batches(tokenizer, examples, cfg))
        if objective.relabel is not None:
            encoded[FORGET] = generic_forget(model, attached, objective, weights, encoded[FORGET], cfg, device, pad,
                                             on_progress, should_stop)
        streams = stream_batches(encoded, cfg, pad)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        loop_started = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled before step {step} of {cfg.steps}")
            batch = {name: next(iterator) for name, iterator in streams.items()}
            inputs, gate_term = forward_streams(model, attached, objective, batch, device, retain_vocabulary)
            out = objective(inputs, weights)
            if gate_term is not None:
                out.total = out.total + cfg.gate_weight * gate_term
                out.terms["gate_bce"] = float(gate_term.detach())
            loss = float(out.total.detach().float())
            if not math.isfinite(loss):
                raise FloatingPointError(f"{cfg.method} loss is {loss} at step {step}; terms {out.terms}")
            descend(optimizer, params, out.total, cfg.grad_clip)

            result.losses.append(loss)
            result.terms.append(dict(out.terms))
            result.steps = step
            if on_progress is not None:
                eta = (time.perf_counter() - loop_started) / step * (cfg.steps - step)
                on_progress(Progress(step, cfg.steps, loss, eta, dict(out.terms)))
    result.seconds = time.perf_counter() - started
    return result
