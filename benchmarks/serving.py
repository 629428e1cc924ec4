"""`unlearn bench serving`: the served model under load, and what a fused layer costs to serve.

1. Load (benchmarks/serving_load.py): the HTTP API of a live `unlearn serve --no-worker` under 1, 8, 16...
   concurrent clients (continuous batching: service/api/serving/scheduler.py).
2. Decode speed per layer, in process, through the engine's DecodeBatch (the scheduler's forward path):
   the base (version 0), a bottleneck version (adapters folded into a copy's output projections) acting on
   every sequence, the same with a recogniser that puts the prompt in its scope (the default scope's cost on
   a request's subject: its decision at prefill, then the layer) and one that leaves it out (the cost on all
   other traffic), a linear version and a LoRA version (both merged into a copy's weights), random non-zero
   fused weights (speed does not depend on their values), at batch 1 and batch 8 (8 rows of the same prompt).
   Each model decodes side by side with a reference copy of the base, one step each in turn (ABBA order),
   so a change in machine load hits both within milliseconds: "vs base" is the median over every step pair
   of reference step time / model step time. On a shared 2-core VM whole-run rates of one model scatter by
   +-15% between repeats; paired steps put the base against itself within ~1%, which the base (v0) row
   shows. tokens/s: batch / median step time; TTFT: prefill + first token.
Target (issue 14): a fused version decodes at >= 0.95x the base at batch 1 and at batch 8.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.api.serving.generation import chat_prompt_ids
from workers.engine.config import LayerConfig
from workers.engine.decoding import DecodeBatch
from workers.engine.layers import create_attached
from workers.engine.layers.scope import SCOPE_KEY
from workers.engine.loading import load_base_model
from workers.engine.versions import build_serving_model

from .common import Report, markdown_table
from .serving_load import LoadOptions, load_section, measure_load

BASE = "base (v0)"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TARGET_RATIO = 0.95


@dataclass
class ServingOptions:
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".unlearn/models")
    device: str = "auto"
    tokens: int = 64
    repeats: int = 3
    batch: int = 8
    clients: tuple[int, ...] = (1, 8, 16)
    load_tokens: int = 48
    load_rounds: int = 3


def random_maps(base_model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    attached = create_attached(copy.deepcopy(base_model), LayerConfig(kind=kind), seed=0)
    with torch.no_grad():
        for param in attached.trainable_parameters():
            param.normal_(0, 0.02)
    return attached.map_weights()


def constant_recogniser(base_model: torch.nn.Module, knows: bool) -> torch.Tensor:
    """(1, 2d + 1) recogniser (layers/scope.py) whose logit is +-10 on every input: the decision's cost
    (the truncated forward to the scope block) without depending on what a trained one would say."""
    weights = torch.zeros(1, 2 * base_model.config.hidden_size + 1)
    weights[0, -1] = 10.0 if knows else -10.0
    return weights


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class PairedRun:
    """Step seconds of a model and of the reference decoding beside it, step for step; each one's TTFT."""
    steps: list[float] = field(default_factory=list)
    reference_steps: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        """Median over step pairs of reference seconds / model seconds: the model's speed vs the base."""
        return statistics.median(r / m for r, m in zip(self.reference_steps, self.steps))


def timed_step(rows: DecodeBatch, tokens: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    next_tokens = rows.step(tokens).argmax(-1)  # (B,)
    sync(device)
    return next_tokens, time.perf_counter() - start


def paired_decode(model: torch.nn.Module, reference: torch.nn.Module, prompt_ids: list[int], tokens: int,
                  batch: int, run: PairedRun) -> None:
    """`batch` rows of the prompt, greedy, on the model and the reference, alternating single steps in ABBA
    order (neither always goes first); adds the step seconds and TTFTs to `run`."""
    device = next(model.parameters()).device
    rows: list[DecodeBatch] = []
    last: list[torch.Tensor] = []  # each one's next tokens (batch,)
    with torch.inference_mode():
        for decoding in (model, reference):
            start = time.perf_counter()
            rows.append(DecodeBatch(decoding))
            last.append(rows[-1].add([prompt_ids] * batch).argmax(-1))
            sync(device)
            if decoding is model:
                run.ttft.append(time.perf_counter() - start)
        for step in range(tokens - 1):
            for i in ((0, 1) if step % 2 == 0 else (1, 0)):
                last[i], seconds = timed_step(rows[i], last[i], device)
                (run.steps if i == 0 else run.reference_steps).append(seconds)


def run_serving(opts: ServingOptions, bar, out_dir: Path) -> Report:
    from .plots import bar_plot

    report = Report("serving", f"Serving under load and the cost of a fused layer ({opts.model})")
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip())
    if opts.clients:
        load = LoadOptions(opts.model, opts.cache_dir, opts.clients, opts.load_tokens, opts.load_rounds)
        table, report.data["load"] = load_section(measure_load(load, bar))
        report.add("Under load (HTTP API)", f"Greedy chat, at most {opts.load_tokens} new tokens per request, "
                   f"{opts.load_rounds} requests per client.\n\n{table}")

    base = load_base_model(opts.model, opts.cache_dir, device=opts.device)
    prompt_ids = chat_prompt_ids(base.tokenizer, PROMPT)
    models = {BASE: base.model}
    for kind, name in (("bottleneck", "fused bottleneck"), ("linear", "fused linear (merged)"),
                       ("lora", "fused LoRA (merged)")):
        models[name] = build_serving_model(base.model, LayerConfig(kind=kind), random_maps(base.model, kind))
    bottleneck = random_maps(base.model, "bottleneck")
    for in_scope, name in ((True, "fused bottleneck, scoped: prompt in scope"),
                           (False, "fused bottleneck, scoped: prompt out of scope")):
        maps = {**bottleneck, SCOPE_KEY: constant_recogniser(base.model, in_scope)}
        models[name] = build_serving_model(base.model, LayerConfig(kind="bottleneck"), maps)
    reference = copy.deepcopy(base.model)  # decodes beside each model; the v0 row pairs the base with it
    batches = (1, opts.batch)
    task = bar.add_task("decode", total=len(models) * opts.repeats * len(batches), info="warm-up")
    for model in [reference, *models.values()]:
        paired_decode(model, reference, prompt_ids, 4, opts.batch, PairedRun())
    runs = {(n, b): PairedRun() for n in models for b in batches}
    for repeat in range(opts.repeats):
        for batch in batches:
            for name, model in models.items():
                paired_decode(model, reference, prompt_ids, opts.tokens, batch, runs[name, batch])
                bar.update(task, advance=1, info=f"{name} batch {batch} #{repeat + 1}")
    ratio = {key: run.ratio() for key, run in runs.items()}
    rate = {(n, b): b / statistics.median(runs[n, b].steps) for n, b in runs}
    ttft = {key: statistics.median(run.ttft) for key, run in runs.items()}
    rows = [[name] + [value for b in batches for value in (rate[name, b], ratio[name, b], ttft[name, b] * 1000)]
            for name in models]
    headers = ["model"] + [h.format(b=b) for b in batches
                           for h in ("tokens/s (batch {b})", "vs base (paired)", "TTFT ms (batch {b})")]
    worst = {b: min(ratio[n, b] for n in models if n != BASE) for b in batches}
    verdict = "; ".join(f"batch {b}: slowest fused model {w:.1%} of the base" for b, w in worst.items())
    met = all(w >= TARGET_RATIO for w in worst.values())
    report.add("Decode speed per layer", f"{base.device}, {base.dtype}; {len(prompt_ids)}-token chat prompt, "
               f"{opts.tokens} new tokens, {opts.repeats} paired runs.\n\n" + markdown_table(headers, rows)
               + f"\n\n{verdict} (target >= {TARGET_RATIO:.0%}: {'met' if met else 'NOT met'}).")
    report.data |= {"decode_tokens_per_s": {f"{n} @ {b}": rate[n, b] for n, b in rate},
                    "decode_vs_base_paired": {f"{n} @ {b}": ratio[n, b] for n, b in ratio},
                    "ttft_s": {f"{n} @ {b}": ttft[n, b] for n, b in ttft}}
    plot = bar_plot(list(models), [rate[n, 1] for n in models], "decode tokens/s (batch 1)",
                    "Decode speed", out_dir / "serving_tokens_per_s.png")
    report.add("Plot", f"![decode speed]({plot.name})")
    return report
