"""Export a model version as a plain Hugging Face checkpoint.

What `export_hf` writes, by layer kind:
- mergeable kinds (lora, linear): the fused maps merged into the base weights (lora: W += D*^T on the FFN
  input projections; linear: the adapter folded into each FFN output projection, layers/linear.py). The
  result is a standard HF model dir (safetensors + config + tokenizer) that
  `AutoModelForCausalLM.from_pretrained(out_dir)` loads with stock transformers, with zero adapter overhead.
- other kinds (bottleneck): NOT exportable as a plain checkpoint. The EUL adapter h + up(act(down(h))) after
  each FFN block is a nonlinear residual branch: no weight of a stock Llama/GPT-2 block can express it
  exactly, so a stock HF class cannot load it. Serving such a version needs the unlearn runtime
  (versions.build_serving_model). `export_hf` raises NotExportableError.

With `gguf` (q8_0 | q4_0 | q4_1) the same merged model is written as one quantized GGUF file for llama.cpp
instead (quantized.py; Llama architecture), `model-<quant>.gguf` in out_dir. Verification runs the forget
checks on exactly those quantized weights (UNLEARN_QUANTIZED_CHECK), so a version's summary says whether
its quantized export still forgets.

The version itself is read by versions.load_version (files and base weights verified).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from .layers import LAYERS, get_layer
from .layers.scope import split_scope
from .loading import LoadedModel
from .quantized import ggml_type, write_gguf
from .store import ModelStore
from .versions import load_version

EXPORT_INFO = "unlearn_export.json"


class NotExportableError(ValueError):
    def __init__(self, kind: str) -> None:
        mergeable = " or ".join(repr(k) for k, layer in LAYERS.items() if layer.mergeable)
        super().__init__(
            f"{kind} versions need the unlearn runtime (their layer is extra modules a stock Hugging Face "
            f"class cannot load); use layer kind {mergeable} for a plain checkpoint"
        )


def export_hf(
    base: LoadedModel,
    layer_kind: str | None,
    fused_maps: dict[str, Tensor] | None,
    out_dir: Path,
    info: dict[str, Any] | None = None,
    gguf: str | None = None,
) -> Path:
    """Write a standard HF model dir at out_dir (must not exist or be empty), atomically; with `gguf`, a
    quantized GGUF file in it instead.

    fused_maps None = the base model itself (version 0). `info` goes to unlearn_export.json beside it. A
    version's recognisers (layers/scope.py) have no place in a stock checkpoint: the export's layer acts on
    every sequence (it forgets as the service does, and is less selective), and unlearn_export.json says so.
    """
    out_dir = Path(out_dir)
    layer = None if fused_maps is None else get_layer(layer_kind)
    if layer is not None and not layer.mergeable:
        raise NotExportableError(layer_kind)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if gguf is not None:
        ggml_type(gguf)  # an unknown quantization fails before any work
    maps, recognisers = split_scope(fused_maps or {})
    model = base.model if layer is None else layer.merged_copy(base.model, maps)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if gguf is None:
            model.save_pretrained(tmp)
            base.tokenizer.save_pretrained(tmp)
        else:
            write_gguf(model, base.tokenizer, tmp / gguf_file_name(gguf), gguf, name=f"{base.name} (unlearn)")
        record = {"base_model": {"name": base.name, "sha256": base.source_sha256}, **(info or {}),
                  "format": gguf or "safetensors"}
        if recognisers is not None:  # a stock checkpoint cannot recognise sequences: its layer acts on all
            record["scope"] = "all: the service applies this layer only to the sequences its recognisers know"
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=2, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def export_version(store: ModelStore, base: LoadedModel, version: int, out: Path, gguf: str | None = None) -> Path:
    """Export model version `version` (0 = the base) as a plain HF checkpoint (or a GGUF file); files verified
    first."""
    if version == 0:
        return export_hf(base, None, None, out, info={"version": 0}, gguf=gguf)
    stored = load_version(store, version, base.source_sha256)
    info = {"version": version, "manifest_sha256": stored.manifest_sha256, "request_ids": stored.request_ids,
            "layer": stored.layer.to_dict()}
    return export_hf(base, stored.layer.kind, stored.fused_maps, out, info=info, gguf=gguf)
