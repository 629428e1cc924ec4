"""`unlearn bench ...`: run a benchmark, print its tables, write benchmarks/results/<name>.md (+ .json, .png)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from workers.engine.config import DEFAULT_METHOD

from .common import (
    DEFAULT_TOFU_DIR,
    RESULTS_DIR,
    TOFU_METHODS,
    MachineLoad,
    Report,
    console,
    cores,
    load_average,
    progress_bar,
)

bench_app = typer.Typer(help="Benchmarks: TOFU forgetting quality, fusion, cost, serving, API.", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", help="base model (built-in name, HF dir or .gguf)")]
OutOpt = Annotated[Path, typer.Option("--out", help="results directory")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="model cache (default: <data dir>/models)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch CPU threads (0: torch's default)")]
DEFAULT_MODEL = "smollm2-135m-instruct"


def models_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return cache_dir
    from service.domain.settings import Settings

    return Settings().models_dir


def split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def execute(run: Callable[..., Report], options, out: Path, threads: int = 0) -> Path:
    """Run with a progress display, write the report, echo it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        import torch

        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    before = load_average()
    with progress_bar() as bar:
        report = run(options, bar, out)
    report.load = MachineLoad(before, load_average(), cores())
    path = report.write(out)
    typer.echo(path.read_text(encoding="utf-8"))
    if report.load.noisy:
        console.print(f"[red]{report.load.line()}[/red]: re-run on an idle machine before publishing")
    console.print(f"[green]wrote[/green] {path}")
    return path


@bench_app.command("tofu")
def tofu(
    authors: Annotated[int, typer.Option(help="whole TOFU authors in the fine-tune (20 QA each)")] = 8,
    forget_authors: Annotated[int, typer.Option(help="of which this many are forgotten")] = 4,
    methods: Annotated[
        str, typer.Option(help="comma list of methods; <method>_seq: one request per forget author")
    ] = ",".join(TOFU_METHODS),
    layers: Annotated[str, typer.Option(help="layer kinds for the default method (others use the first)")
                      ] = "bottleneck,lora",
    steps: Annotated[int, typer.Option(help="unlearning steps per request")] = 40,
    lr: Annotated[float, typer.Option(help="unlearning learning rate")] = 1e-3,
    ft_epochs: Annotated[int, typer.Option(help="fine-tune epochs (target and retain model)")] = 3,
    ft_lr: Annotated[float, typer.Option(help="fine-tune learning rate")] = 1e-4,
    eval_items: Annotated[int, typer.Option(help="real-author and world-fact items for utility")] = 20,
    max_new_tokens: Annotated[int, typer.Option(help="greedy answer length for ROUGE-L")] = 48,
    data_dir: Annotated[Path, typer.Option(help="TOFU jsonl dir")] = DEFAULT_TOFU_DIR,
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, device: DeviceOpt = "auto",
    out: OutOpt = RESULTS_DIR, threads: ThreadsOpt = 0,
) -> None:
    """Forget quality (KS p) vs model utility per method on whole TOFU authors, + sequential requests."""
    from .tofu import TofuOptions, run_tofu
    from .tofu_data import FinetuneConfig

    options = TofuOptions(model=model, cache_dir=models_dir(cache_dir), data_dir=data_dir, authors=authors,
                          forget_authors=forget_authors, methods=split(methods), layers=split(layers), steps=steps,
                          lr=lr, eval_items=eval_items, max_new_tokens=max_new_tokens,
                          finetune=FinetuneConfig(epochs=ft_epochs, lr=ft_lr), device=device)
    execute(run_tofu, options, out, threads)


@bench_app.command("fusion")
def fusion(
    counts: Annotated[str, typer.Option(help="request numbers to time")] = "1,2,4,8,16,32",
    layers: Annotated[str, typer.Option(help="layer kinds")] = "bottleneck,lora",
    tokens: Annotated[int, typer.Option(help="rows of the synthetic inputs behind each Gram")] = 512,
    repeats: Annotated[int, typer.Option(help="fuses timed per point (median)")] = 1,
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, out: OutOpt = RESULTS_DIR, threads: ThreadsOpt = 0,
) -> None:
    """Fusion time and fused size for request N = 1..32 (synthetic Grams of the real shapes)."""
    from .fusion_bench import FusionOptions, run_fusion

    options = FusionOptions(model=model, cache_dir=models_dir(cache_dir), layers=split(layers),
                            counts=tuple(int(c) for c in split(counts)), tokens=tokens, repeats=repeats)
    execute(run_fusion, options, out, threads)


@bench_app.command("cost")
def cost(
    authors: Annotated[int, typer.Option(help="whole TOFU authors (retraining uses the retain ones)")] = 4,
    forget_authors: Annotated[int, typer.Option(help="authors in the deletion request")] = 1,
    steps: Annotated[int, typer.Option(help="unlearning steps (the service default is 40)")] = 40,
    ft_epochs: Annotated[int, typer.Option(help="retraining epochs")] = 5,
    layer: Annotated[str, typer.Option(help="bottleneck | linear | lora | gated")] = "bottleneck",
    data_dir: Annotated[Path, typer.Option(help="TOFU jsonl dir")] = DEFAULT_TOFU_DIR,
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, device: DeviceOpt = "auto",
    out: OutOpt = RESULTS_DIR, threads: ThreadsOpt = 0,
) -> None:
    """One request's unlearning time vs retraining without the forget authors (same machine)."""
    from .cost import CostOptions, run_cost
    from .tofu_data import FinetuneConfig

    options = CostOptions(model=model, cache_dir=models_dir(cache_dir), data_dir=data_dir, authors=authors,
                          forget_authors=forget_authors, layer=layer, steps=steps,
                          finetune=FinetuneConfig(epochs=ft_epochs),
                          device=device)
    execute(run_cost, options, out, threads)


@bench_app.command("serving")
def serving(
    clients: Annotated[str, typer.Option(help="comma list of concurrent HTTP clients ('' skips the load test)")]
    = "1,8,16",
    tokens: Annotated[int, typer.Option(help="new tokens per decode-speed run")] = 64,
    repeats: Annotated[int, typer.Option(help="decode-speed runs per model and batch (median)")] = 3,
    batch: Annotated[int, typer.Option(help="the larger decode-speed batch")] = 8,
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, device: DeviceOpt = "auto",
    out: OutOpt = RESULTS_DIR, threads: ThreadsOpt = 0,
) -> None:
    """Throughput and latency under 1..N concurrent HTTP clients; decode speed of base vs fused layers."""
    from .serving import ServingOptions, run_serving

    options = ServingOptions(model=model, cache_dir=models_dir(cache_dir), device=device, tokens=tokens,
                             repeats=repeats, batch=batch, clients=tuple(int(c) for c in split(clients)))
    execute(run_serving, options, out, threads)


@bench_app.command("memorization")
def memorization(
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, device: DeviceOpt = "cpu",
    out: OutOpt = RESULTS_DIR,
) -> None:
    """The memorisation check behind a job's outcome, on known and made-up items."""
    from .memorization import MemorizationOptions, run_memorization

    execute(run_memorization, MemorizationOptions(model=model, cache_dir=models_dir(cache_dir), device=device), out)


@bench_app.command("selectivity")
def selectivity(
    subjects: Annotated[int, typer.Option(help="how many of the built-in subjects (people and places)")] = 6,
    names: Annotated[str, typer.Option(help="comma list of built-in subjects to run instead (e.g. 'Mount "
                                            "Kilimanjaro')")] = "",
    arms: Annotated[str, typer.Option(help="comma list of method:retain[:layer[:scope]] (retain: generic | "
                                            "neighbourhood; layer: bottleneck (default) | linear | lora | gated; "
                                            "scope: sequence (default) | all)")]
    = f"{DEFAULT_METHOD}:neighbourhood,{DEFAULT_METHOD}:neighbourhood:bottleneck:all",
    steps: Annotated[int, typer.Option(help="unlearning steps per request")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="greedy answer length")] = 48,
    quantized: Annotated[str, typer.Option(help="comma list of q8_0 | q4_0 | q4_1: also check each version "
                                                "(and the base) rounded that way")] = "",
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, device: DeviceOpt = "cpu",
    out: OutOpt = RESULTS_DIR, threads: ThreadsOpt = 0,
) -> None:
    """Forget one subject, keep everyone else: forget / held-out / neighbour / general drop per arm."""
    from .selectivity import SelectivityOptions, run_selectivity

    options = SelectivityOptions(model=model, cache_dir=models_dir(cache_dir), subjects=subjects, names=split(names),
                                 arms=split(arms), steps=steps, device=device, max_new_tokens=max_new_tokens,
                                 quantized=split(quantized))
    execute(run_selectivity, options, out, threads)


@bench_app.command("sequential")
def sequential(
    requests: Annotated[int, typer.Option(help="requests in a row, one subject each (at most 8)", min=1, max=8)] = 8,
    method: Annotated[str, typer.Option(help="unlearning method of every request")] = DEFAULT_METHOD,
    steps: Annotated[int, typer.Option(help="unlearning steps per request")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="greedy answer length")] = 48,
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, device: DeviceOpt = "cpu",
    out: OutOpt = RESULTS_DIR, threads: ThreadsOpt = 0,
) -> None:
    """Requests in a row: after each, every earlier request's forget score and the neighbour/general drop."""
    from .sequential import SequentialOptions, run_sequential

    options = SequentialOptions(model=model, cache_dir=models_dir(cache_dir), requests=requests, method=method,
                                steps=steps, device=device, max_new_tokens=max_new_tokens)
    execute(run_sequential, options, out, threads)


@bench_app.command("api")
def api(
    clients: Annotated[int, typer.Option(help="concurrent async clients")] = 50,
    requests: Annotated[int, typer.Option(help="POSTs at most")] = 1000,
    duration: Annotated[float, typer.Option(help="seconds at most")] = 60.0,
    workers: Annotated[str, typer.Option(help="comma list of API process counts, one server each")] = "1",
    database_url: Annotated[str | None, typer.Option(help="an empty database (default: SQLite in a temp dir)")]
    = None,
    model: ModelOpt = DEFAULT_MODEL, cache_dir: CacheOpt = None, out: OutOpt = RESULTS_DIR,
) -> None:
    """POST deletion-request / GET job latency percentiles and throughput against a live server."""
    from .api import ApiOptions, run_api

    options = ApiOptions(model=model, cache_dir=models_dir(cache_dir), clients=clients, requests=requests,
                         duration=duration, workers=tuple(int(w) for w in split(workers)),
                         database_url=database_url)
    execute(run_api, options, out)
