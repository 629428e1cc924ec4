"""`unlearn forget FILE` (or `--forget FILE`): unlearn examples from a model offline (no API, no database, no broker).

Loads the model, trains one unlearning layer on FILE (JSONL lines {"text"} | {"prompt", "answer"} |
{"question", "answer"}) against a retain set (--retain FILE, else the built-in generic prompts),
shows a progress bar, and prints before/after mean answer NLL on the forget and retain items and a
sample greedy answer before/after. --out DIR writes the layer (layer.safetensors + layer.json, the
format the worker stages for fusion).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from workers.engine.config import DEFAULT_METHOD, LAYER_KINDS, METHODS

console = Console(stderr=True)


def default_cache_dir() -> Path:
    """<data dir>/models, the cache the service itself uses (UNLEARN_DATA_DIR, default ./.unlearn)."""
    from service.domain.settings import get_settings

    return get_settings().models_dir


def sample_prompt(example) -> str:
    from workers.engine.batching import prompt_of

    return prompt_of(example)


def forget(
    file: Annotated[Path | None, typer.Argument(help="JSONL of items to forget", exists=True, dir_okay=False,
                                                show_default=False)] = None,
    forget_file: Annotated[Path | None, typer.Option("--forget", help="the same, as an option", exists=True,
                                                     dir_okay=False, show_default=False)] = None,
    model: Annotated[str, typer.Option(help="model name, HF dir or .gguf file")] = "smollm2-135m-instruct",
    retain: Annotated[Path | None, typer.Option(help="JSONL of items to keep (default: built-in set)")] = None,
    method: Annotated[str, typer.Option(help=" | ".join(METHODS))] = DEFAULT_METHOD,
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 40,
    out: Annotated[Path | None, typer.Option(help="directory to write the trained layer to")] = None,
    layer: Annotated[str, typer.Option(help=" | ".join(LAYER_KINDS))] = "bottleneck",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="model cache (default: <data dir>/models)")] = None,
) -> None:
    """Unlearn FILE's items from the model and show what changed."""
    from workers.engine.config import LayerConfig, TrainConfig
    from workers.engine.data import read_jsonl
    from workers.engine.loading import load_base_model
    from workers.engine.retain import build_retain, greedy_answers

    if (file is None) == (forget_file is None):
        raise typer.BadParameter("give the JSONL of items to forget once: as FILE or as --forget FILE")
    forget = file or forget_file
    if method not in METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(METHODS)}", param_hint="--method")
    if layer not in LAYER_KINDS:
        raise typer.BadParameter(f"choose one of {', '.join(LAYER_KINDS)}", param_hint="--layer")
    started = time.perf_counter()
    cache_dir = cache_dir or default_cache_dir()
    try:
        forget_items = read_jsonl(forget)
        retain_items = read_jsonl(retain) if retain is not None else []
    except (ValueError, OSError) as exc:
        console.print(f"[red]cannot read examples:[/red] {exc}")
        raise typer.Exit(1) from exc
    if not forget_items:
        console.print(f"[red]{forget} holds no examples[/red]")
        raise typer.Exit(1)

    with console.status(f"loading {model} ..."):
        base = load_base_model(model, cache_dir, device=device)
    console.print(f"loaded {model} on {base.device} ({base.dtype}), sha256 {base.source_sha256[:12]}")
    with console.status("building the retain set ..."):
        retain_set = build_retain(retain_items, None, base.model, base.tokenizer, cache_dir,
                                  model_key=base.source_sha256)
    layer_cfg, train_cfg = LayerConfig(kind=layer), TrainConfig(method=method, steps=steps)
    prompt = sample_prompt(forget_items[0])

    before = measure(base, forget_items, retain_set, prompt, greedy_answers)
    trained = train_with_progress(base, forget_items, retain_set, layer_cfg, train_cfg)
    after = measure_with_layer(base, trained, forget_items, retain_set, prompt, greedy_answers)
    print_report(prompt, before, after, len(forget_items), len(retain_set))
    if out is not None:
        write_layer(out, trained, base, method, before, after)
        console.print(f"wrote the layer to {out}")
    console.print(f"done in {time.perf_counter() - started:.1f} s (training {trained.seconds:.1f} s)")


def measure(base, forget_items, retain_set, prompt, greedy_answers) -> dict:
    from workers.engine.unlearn import mean_answer_nll

    return {
        "forget_nll": mean_answer_nll(base.model, base.tokenizer, forget_items),
        "retain_nll": mean_answer_nll(base.model, base.tokenizer, retain_set),
        "sample": greedy_answers(base.model, base.tokenizer, [prompt], max_new_tokens=48)[0],
    }


def measure_with_layer(base, trained, forget_items, retain_set, prompt, greedy_answers) -> dict:
    from workers.engine.unlearn import served_model

    served = served_model(base, trained.layer_cfg, trained.maps)
    try:
        return measure(base, forget_items, retain_set, prompt, greedy_answers)
    finally:
        served.detach()


def train_with_progress(base, forget_items, retain_set, layer_cfg, train_cfg):
    from workers.engine.unlearn import train_request

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>8}"),
        TextColumn("eta {task.fields[eta]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"{train_cfg.method} ({layer_cfg.kind})", total=train_cfg.steps, loss="-", eta="-")

        def on_progress(p) -> None:
            bar.update(task, completed=p.step, loss=f"{p.loss:.4f}", eta=f"{p.eta_seconds:.0f} s")

        return train_request(base, forget_items, retain_set, layer_cfg, train_cfg, on_progress=on_progress)


def print_report(prompt: str, before: dict, after: dict, n_forget: int, n_retain: int) -> None:
    table = Table(title="mean answer NLL (nats/token): higher on forget = forgotten")
    table.add_column("set")
    table.add_column("items", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name, key, count in (("forget", "forget_nll", n_forget), ("retain", "retain_nll", n_retain)):
        table.add_row(name, str(count), f"{before[key]:.3f}", f"{after[key]:.3f}", f"{after[key] - before[key]:+.3f}")
    console.print(table)
    console.print(f"[bold]prompt:[/bold] {prompt}")
    console.print(f"[bold]before:[/bold] {before['sample'] or '(empty)'}")
    console.print(f"[bold]after:[/bold]  {after['sample'] or '(empty)'}")


def write_layer(out: Path, trained, base, method: str, before: dict, after: dict) -> None:
    from safetensors.torch import save_file

    from workers.engine.unlearn import trained_tensors

    tensors, meta = trained_tensors(trained)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "layer.safetensors"))
    meta |= {
        "model": base.name,
        "model_sha256": base.source_sha256,
        "method": method,
        "metrics": {"before": before, "after": after},
    }
    (out / "layer.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
