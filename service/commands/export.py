"""`unlearn export --version V --out DIR [--gguf Q]`: a model version as a standard Hugging Face model
directory, or as a quantized GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def export(
    version: Annotated[int, typer.Option("--version", help="model version (0 = the base model)")],
    out: Annotated[Path, typer.Option("--out", help="directory to write")],
    gguf: Annotated[str | None, typer.Option("--gguf", help="write one quantized GGUF file for llama.cpp "
                                             "instead: q8_0 | q4_0 | q4_1")] = None,
) -> None:
    """Write model version V as safetensors + config + tokenizer that transformers or vLLM load unchanged
    (or, with --gguf, as a quantized GGUF file for llama.cpp).

    Linear and LoRA versions are merged into dense weights. Bottleneck versions need the unlearn runtime (the
    adapters are extra modules no stock model class has): use layer=linear or lora for plain checkpoints.
    Whether a version's quantized copy still forgets is in its summary (`quantized`, GET /v1/model-versions)."""
    from service.domain.settings import get_settings
    from workers.engine.export import NotExportableError, export_version
    from workers.engine.loading import load_base_model
    from workers.engine.store import CorruptVersionError, ModelStore
    from workers.engine.versions import VersionLoadError

    settings = get_settings()
    base = load_base_model(settings.model, settings.models_dir, device="cpu")
    try:
        path = export_version(ModelStore(settings.store_dir), base, version, out, gguf=gguf)
    except (NotExportableError, VersionLoadError, CorruptVersionError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot export version {version}:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"wrote version {version} to {path}")
