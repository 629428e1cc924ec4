"""Decode speed of a fused model vs the base model, in one run, through the serving decode path.

    python -m benchmarks.serving_decode [--model smollm2-135m-instruct] [--tokens 128] [--repeats 3]

For each of: the base (version 0), a bottleneck version (hooked adapters on a copy) and a LoRA version
(deltas merged into a copy), runs `repeats` timed decodes of exactly `tokens` greedy tokens (KV cache,
batch 1, the service's generation.Decoder) after one warm-up, round-robin over the models, and prints
tokens/s (median) and the ratio to the base.
The fused layers have random non-zero weights: speed does not depend on their values. DESIGN section 9 asks
for a fused model to decode at >= 95% of the base's speed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from service.api.serving.generation import Decoder, SamplingParams, chat_prompt_ids, sample_next
from workers.engine.config import LayerConfig
from workers.engine.layers import create_attached
from workers.engine.loading import DEFAULT_MODEL, load_base_model
from workers.engine.versions import build_serving_model

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def random_maps(base_model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    import copy

    attached = create_attached(copy.deepcopy(base_model), LayerConfig(kind=kind), seed=0)
    with torch.no_grad():
        for param in attached.trainable_parameters():
            param.normal_(0, 0.02)
    return attached.map_weights()


def decode_seconds(model: torch.nn.Module, prompt_ids: list[int], tokens: int) -> float:
    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    decoder = Decoder(model, prompt_ids, 1, threading.Lock())
    with torch.inference_mode():
        decoder.feed(sample_next(decoder.next_logits(), params, None))  # prefill: not decode
        if decoder.pending.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(tokens - 1):
            decoder.feed(sample_next(decoder.next_logits(), params, None))
        if decoder.pending.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "unlearn-bench-models")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_base_model(args.model, args.cache_dir, device=args.device)
    prompt_ids = chat_prompt_ids(base.tokenizer, PROMPT)
    models = {"base (v0)": base.model}
    for kind, name in (("bottleneck", "bottleneck"), ("lora", "lora (merged)")):
        models[name] = build_serving_model(base.model, LayerConfig(kind=kind), random_maps(base.model, kind))
    print(f"{args.model} on {base.device} ({base.dtype}), {args.tokens} decode tokens, median of {args.repeats}")
    for model in models.values():
        decode_seconds(model, prompt_ids, min(8, args.tokens))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # round-robin: a change in machine load hits every model alike
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt_ids, args.tokens))
    rates = {name: (args.tokens - 1) / statistics.median(seconds) for name, seconds in times.items()}
    for name, rate in rates.items():
        print(f"  {name:14s} {rate:8.1f} tokens/s   {rate / rates['base (v0)']:6.1%} of base")


if __name__ == "__main__":
    main()
