"""`unlearn bench serving`: decode speed and time to first token, base vs fused bottleneck vs fused LoRA.

Wraps benchmarks/serving_decode.py (the service's own Decoder, KV cache, greedy): the same models
(base; bottleneck adapters hooked on a copy; LoRA deltas merged into a copy, random non-zero fused
weights: speed does not depend on their values), timed round-robin so machine load hits all alike.
- single: one client, median over repeats of decode tokens/s (prefill excluded) and TTFT (prefill +
  first token);
- concurrent: C client threads, each its own sequence, sharing the process's model lock as the API
  does; aggregate tokens/s over the wall time and mean TTFT.
Target (DESIGN section 9): fused >= 0.95x the base's tokens/s.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from service.api.serving.generation import Decoder, SamplingParams, chat_prompt_ids, sample_next
from workers.engine.config import LayerConfig
from workers.engine.loading import load_base_model
from workers.engine.versions import build_serving_model

from .common import Report, markdown_table
from .serving_decode import PROMPT, random_maps

BASE = "base (v0)"


@dataclass
class ServingOptions:
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".unlearn/models")
    device: str = "auto"
    tokens: int = 64
    repeats: int = 3
    concurrency: int = 4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_client(model, prompt_ids: list[int], tokens: int, lock: threading.Lock) -> tuple[float, float]:
    """(TTFT seconds, decode seconds for the remaining tokens - 1)."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        start = time.perf_counter()
        decoder = Decoder(model, prompt_ids, 1, lock)
        decoder.feed(sample_next(decoder.next_logits(), params, None))
        sync(device)
        first = time.perf_counter()
        for _ in range(tokens - 1):
            decoder.feed(sample_next(decoder.next_logits(), params, None))
        sync(device)
    return first - start, time.perf_counter() - first


def concurrent_clients(model, prompt_ids: list[int], tokens: int, clients: int) -> tuple[float, float]:
    """(aggregate decode tokens/s over the wall time, mean TTFT) of `clients` threads at once."""
    lock, results = threading.Lock(), []
    barrier = threading.Barrier(clients)

    def client() -> None:
        barrier.wait()
        results.append(one_client(model, prompt_ids, tokens, lock))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return clients * tokens / wall, statistics.fmean(r[0] for r in results)


def run_serving(opts: ServingOptions, bar, out_dir: Path) -> Report:
    from .plots import bar_plot

    base = load_base_model(opts.model, opts.cache_dir, device=opts.device)
    prompt_ids = chat_prompt_ids(base.tokenizer, PROMPT)
    models = {BASE: base.model}
    for kind, name in (("bottleneck", "fused bottleneck"), ("lora", "fused LoRA (merged)")):
        models[name] = build_serving_model(base.model, LayerConfig(kind=kind), random_maps(base.model, kind))
    task = bar.add_task("serving", total=len(models) * (opts.repeats + 2), info="warm-up")
    for model in models.values():
        one_client(model, prompt_ids, min(4, opts.tokens), threading.Lock())
    single: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for repeat in range(opts.repeats):
        for name, model in models.items():
            single[name].append(one_client(model, prompt_ids, opts.tokens, threading.Lock()))
            bar.update(task, advance=1, info=f"single {name} #{repeat + 1}")
    concurrent = {}
    for name, model in models.items():
        concurrent[name] = concurrent_clients(model, prompt_ids, opts.tokens, opts.concurrency)
        bar.update(task, advance=2, info=f"concurrent {name}")
    rates = {n: (opts.tokens - 1) / statistics.median(d for _, d in r) for n, r in single.items()}
    ttft = {n: statistics.median(t for t, _ in r) for n, r in single.items()}
    rows = [[n, rates[n], rates[n] / rates[BASE], ttft[n] * 1000, concurrent[n][0],
             concurrent[n][0] / concurrent[BASE][0], concurrent[n][1] * 1000] for n in models]
    report = Report("serving", f"Serving speed, fused vs base ({opts.model} on {base.device}, {base.dtype})")
    report.data = {"single_tokens_per_s": rates, "ttft_s": ttft,
                   "concurrent": {n: {"tokens_per_s": c[0], "ttft_s": c[1]} for n, c in concurrent.items()}}
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip() +
               f"\n\n{len(prompt_ids)}-token chat prompt, {opts.tokens} new tokens, median of {opts.repeats}; "
               f"{opts.concurrency} concurrent clients.")
    worst = min(rates[n] / rates[BASE] for n in models if n != BASE)
    report.add("Results", markdown_table(["model", "tokens/s (1 client)", "vs base", "TTFT ms",
                                          f"tokens/s ({opts.concurrency} clients)", "vs base", "TTFT ms (conc.)"], rows)
               + f"\n\nSlowest fused model: {worst:.1%} of the base's single-client speed "
               f"(target >= 95%: {'met' if worst >= 0.95 else 'NOT met'}).")
    plot = bar_plot(list(models), [rates[n] for n in models], "decode tokens/s (1 client)",
                    "Decode speed", out_dir / "serving_tokens_per_s.png")
    report.add("Plot", f"![decode speed]({plot.name})")
    return report
