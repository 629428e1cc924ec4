"""Materialise a model version: a standalone serving model, or a plain Hugging Face checkpoint.

What `export_hf` writes, by layer kind:
- lora: the fused dense deltas merged into the base weights (W += D*^T). The result is a standard HF
  model dir (safetensors + config + tokenizer) that `AutoModelForCausalLM.from_pretrained(out_dir)`
  loads with stock transformers, with zero adapter overhead.
- bottleneck: NOT exportable as a plain checkpoint. The EUL adapter h + up(act(down(h))) after each FFN
  block is a nonlinear residual branch: no weight of a stock Llama/GPT-2 block can express it exactly,
  so a stock HF class cannot load it. Serving such a version needs the unlearn runtime
  (`build_serving_model`); use layer kind "lora" where a plain checkpoint is required.
  `export_hf` raises BottleneckNotExportableError.

Version manifest fields used (written by the fusion/publish step): "layer" (LayerConfig.to_dict()),
"base_model": {"name", "sha256"}; the fused maps are the store file FUSED_MAPS.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .config import LayerConfig
from .layers import create_attached
from .loading import LoadedModel
from .lora import merge_into_base, merged_state_dict
from .store import FUSED_MAPS, ModelStore

EXPORT_INFO = "unlearn_export.json"


class BottleneckNotExportableError(ValueError):
    def __init__(self) -> None:
        super().__init__(
            "bottleneck versions need the unlearn runtime (their adapters are extra modules a stock "
            "Hugging Face class cannot load); use layer kind 'lora' for a plain checkpoint"
        )


class BaseModelMismatchError(ValueError):
    """The version was fused against other base weights than the ones loaded."""


def build_serving_model(base_model: nn.Module, cfg: LayerConfig, fused_maps: dict[str, Tensor]) -> nn.Module:
    """An independent copy of the base with the version applied (the base itself is left untouched).

    lora: deltas merged into the copy's weights (no overhead). bottleneck: fused adapters hooked onto
    the copy (the AttachedLayer is kept alive as `model.unlearning_layer`).
    """
    model = copy.deepcopy(base_model)
    if cfg.kind == "lora":
        return merge_into_base(model, fused_maps)
    attached = create_attached(model, cfg)
    attached.load_map_weights(fused_maps)
    model.unlearning_layer = attached
    return model


def export_hf(
    base: LoadedModel,
    layer_kind: str,
    fused_maps: dict[str, Tensor] | None,
    out_dir: Path,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a standard HF model dir at out_dir (must not exist or be empty), atomically.

    fused_maps None = the base model itself (version 0). `info` goes to unlearn_export.json beside it.
    """
    out_dir = Path(out_dir)
    if fused_maps is not None and layer_kind == "bottleneck":
        raise BottleneckNotExportableError()
    if fused_maps is not None and layer_kind != "lora":
        raise ValueError(f"unknown layer kind {layer_kind!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = None if fused_maps is None else merged_state_dict(base.model, fused_maps)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        base.model.save_pretrained(tmp, state_dict=state)
        base.tokenizer.save_pretrained(tmp)
        record = {"base_model": {"name": base.name, "sha256": base.source_sha256}, **(info or {})}
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=2, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_version(store: ModelStore, base: LoadedModel, version: int, out: Path) -> Path:
    """Export model version `version` (0 = the base) as a plain HF checkpoint; files verified first."""
    files, manifest = store.load(version)
    if version == 0:
        return export_hf(base, "lora", None, out, info={"version": 0})
    expected_sha = manifest.get("base_model", {}).get("sha256")
    if expected_sha and expected_sha != base.source_sha256:
        raise BaseModelMismatchError(
            f"version {version} was built on base sha256 {expected_sha}, loaded base is {base.source_sha256}"
        )
    if "layer" not in manifest:
        raise ValueError(f"version {version}: manifest has no 'layer' field (LayerConfig.to_dict())")
    cfg = LayerConfig.from_dict(manifest["layer"])
    info = {"version": version, "manifest_sha256": store.manifest_sha256(version),
            "request_ids": manifest.get("request_ids", []), "layer": cfg.to_dict()}
    return export_hf(base, cfg.kind, files[FUSED_MAPS], out, info=info)
