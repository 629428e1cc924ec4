"""`unlearn bench serving`: the served model under load, and what a fused layer costs to serve.

1. Load (benchmarks/serving_load.py): the HTTP API of a live `unlearn serve --no-worker` under 1, 8, 16...
   concurrent clients (continuous batching: service/api/serving/scheduler.py).
2. Decode speed per layer, in process, through the engine's DecodeBatch (the scheduler's forward path):
   the base (version 0), a bottleneck version (adapters folded into a copy's output projections) acting on
   every sequence, the same with a recogniser that puts the prompt in its scope (the default scope's cost on
   a request's subject: its decision at prefill, then the layer) and one that leaves it out (the cost on all
   other traffic), a linear version and a LoRA version (both merged into a copy's weights), random non-zero
   fused weights (speed does not depend on their values), at batch 1 and batch 8 (8 rows of the same prompt), timed
   round-robin so machine load hits all alike; median decode tokens/s (prefill excluded) and time to first
   token (prefill + first token).
Target (issue 14): a fused version decodes at >= 0.95x the base at batch 1 and at batch 8.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
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


def decode(model: torch.nn.Module, prompt_ids: list[int], tokens: int, batch: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s over the remaining tokens - 1) of `batch` rows of the prompt, greedy."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        start = time.perf_counter()
        rows = DecodeBatch(model)
        next_tokens = rows.add([prompt_ids] * batch).argmax(-1)  # (batch,)
        sync(device)
        first = time.perf_counter()
        for _ in range(tokens - 1):
            next_tokens = rows.step(next_tokens).argmax(-1)
        sync(device)
    return first - start, batch * (tokens - 1) / (time.perf_counter() - first)


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
    batches = (1, opts.batch)
    task = bar.add_task("decode", total=len(models) * opts.repeats * len(batches), info="warm-up")
    for model in models.values():
        decode(model, prompt_ids, 4, opts.batch)
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {(n, b): [] for n in models for b in batches}
    for repeat in range(opts.repeats):  # round-robin: a change in machine load hits every model alike
        for batch in batches:
            for name, model in models.items():
                runs[name, batch].append(decode(model, prompt_ids, opts.tokens, batch))
                bar.update(task, advance=1, info=f"{name} batch {batch} #{repeat + 1}")
    rate = {key: statistics.median(r for _, r in samples) for key, samples in runs.items()}
    ttft = {key: statistics.median(t for t, _ in samples) for key, samples in runs.items()}
    rows = [[name] + [value for b in batches for value in (rate[name, b], rate[name, b] / rate[BASE, b],
                                                            ttft[name, b] * 1000)] for name in models]
    headers = ["model"] + [h.format(b=b) for b in batches
                           for h in ("tokens/s (batch {b})", "vs base", "TTFT ms (batch {b})")]
    worst = {b: min(rate[n, b] / rate[BASE, b] for n in models if n != BASE) for b in batches}
    verdict = "; ".join(f"batch {b}: slowest fused model {w:.1%} of the base" for b, w in worst.items())
    met = all(w >= TARGET_RATIO for w in worst.values())
    report.add("Decode speed per layer", f"{base.device}, {base.dtype}; {len(prompt_ids)}-token chat prompt, "
               f"{opts.tokens} new tokens, median of {opts.repeats}.\n\n" + markdown_table(headers, rows)
               + f"\n\n{verdict} (target >= {TARGET_RATIO:.0%}: {'met' if met else 'NOT met'}).")
    report.data |= {"decode_tokens_per_s": {f"{n} @ {b}": rate[n, b] for n, b in rate},
                    "ttft_s": {f"{n} @ {b}": ttft[n, b] for n, b in ttft}}
    plot = bar_plot(list(models), [rate[n, 1] for n in models], "decode tokens/s (batch 1)",
                    "Decode speed", out_dir / "serving_tokens_per_s.png")
    report.add("Plot", f"![decode speed]({plot.name})")
    return report
