"""`unlearn bench fusion`: time and size of fusing request N = 1, 2, 4, ..., 32 (DESIGN section 9).

The maps and Gram matrices have the real model's shapes (one unlearning layer attached per kind to read
them off) but synthetic values: W_i ~ N(0, 0.02), G_i = X_i^T X_i with X_i ~ N(0, 1) of `tokens` rows;
fusion's cost depends only on the shapes. Each timed request N is fused onto the running state of the N - 1
before it (accumulate + Cholesky solve, exactly the service's path), `repeats` times, median reported;
the untimed requests in between only add a precomputed G_0 and G_0 W_0 to the running sums (the
timed fuse's cost depends on the shapes, not on the values the sums hold).
Target: fusing request 32 costs within 1.2x of request 2, and the fused layer's size does not grow.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from workers.engine.config import FusionConfig, LayerConfig
from workers.engine.fusion import FusionState, fuse_request, state_to_tensors
from workers.engine.layers import create_attached
from workers.engine.loading import load_base_model

from .common import Report, markdown_table

DEFAULT_COUNTS = (1, 2, 4, 8, 16, 32)


@dataclass
class FusionOptions:
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".unlearn/models")
    layers: tuple[str, ...] = ("bottleneck", "lora")
    counts: tuple[int, ...] = DEFAULT_COUNTS
    tokens: int = 512
    repeats: int = 1


def map_layout(model: torch.nn.Module, kind: str) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """(map name -> weight shape, map name -> id of its input module: maps that share inputs share a Gram)."""
    attached = create_attached(model, LayerConfig(kind=kind), seed=0)
    try:
        shapes = {name: tuple(w.shape) for name, w in attached.map_weights().items()}
        modules = {name: id(module) for name, module in attached.linear_maps().items()}
    finally:
        attached.detach()
    return shapes, modules


def synthetic_request(shapes: dict[str, tuple[int, int]], modules: dict[str, int], tokens: int, seed: int
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    maps = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    grams: dict[str, Tensor] = {}
    by_input: dict[tuple[int, int], Tensor] = {}
    for name, (rows, _) in shapes.items():
        key = (modules[name], rows)
        if key not in by_input:
            x = torch.randn(tokens, rows, generator=generator, dtype=torch.float64)
            by_input[key] = x.t() @ x  # (in', in')
        grams[name] = by_input[key]
    return grams, maps


def nbytes(tensors: dict[str, Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def fast_forward(state: FusionState | None, one: FusionState, request_id: str) -> FusionState:
    """state + one request's precomputed sums: the state an untimed request leaves, without its matmuls
    (the next timed fuse costs the same whatever values the sums hold)."""
    if state is None:
        return FusionState(dict(one.gram_sum), dict(one.gram_w_sum), 1, [request_id])
    gram_sum, shared = {}, {}
    for name, gram in one.gram_sum.items():
        key = (id(state.gram_sum[name]), id(gram))  # LoRA maps that share a Gram keep sharing it
        shared.setdefault(key, state.gram_sum[name] + gram)
        gram_sum[name] = shared[key]
    gram_w_sum = {name: state.gram_w_sum[name] + gw for name, gw in one.gram_w_sum.items()}
    return FusionState(gram_sum, gram_w_sum, state.n_requests + 1, [*state.request_ids, request_id])


def bench_kind(model, kind: str, opts: FusionOptions, on_request) -> list[dict[str, float]]:
    shapes, modules = map_layout(model, kind)
    state: FusionState | None = None
    results = []
    warm, _ = fuse_request(None, *synthetic_request(shapes, modules, opts.tokens, seed=0), "warm-up")  # LAPACK init
    for n in range(1, max(opts.counts) + 1):
        grams, maps = synthetic_request(shapes, modules, opts.tokens, seed=n) if n in opts.counts else ({}, {})
        if n not in opts.counts:  # untimed: the running sums move on by a precomputed G_0, G_0 W_0
            state = fast_forward(state, warm, f"r{n}")
            on_request(kind, n)
            continue
        times = []
        for _ in range(opts.repeats):  # fuse_request leaves `state` as it was: each repeat is the same work
            start = time.perf_counter()
            new_state, fused = fuse_request(state, grams, maps, f"r{n}", FusionConfig())
            times.append(time.perf_counter() - start)
        results.append({"n": n, "seconds": statistics.median(times), "fused_bytes": nbytes(fused),
                        "state_bytes": nbytes(state_to_tensors(new_state))})
        state = new_state
        on_request(kind, n)
    return results


def run_fusion(opts: FusionOptions, bar, out_dir: Path) -> Report:
    from .plots import line_plot

    base = load_base_model(opts.model, opts.cache_dir, device="cpu")
    task = bar.add_task("fusion", total=max(opts.counts) * len(opts.layers), info="")
    per_kind = {kind: bench_kind(base.model, kind, opts,
                                 lambda k, n: bar.update(task, advance=1, info=f"{k} request {n}"))
                for kind in opts.layers}
    report = Report("fusion", f"Fusion cost vs number of requests ({opts.model})")
    rows, verdicts = [], []
    for kind, results in per_kind.items():
        by_n = {r["n"]: r for r in results}
        for r in results:
            ratio = r["seconds"] / by_n[2]["seconds"] if 2 in by_n else float("nan")
            rows.append([kind, r["n"], r["seconds"] * 1000, ratio, r["fused_bytes"] / 2**20, r["state_bytes"] / 2**20])
        last = max(by_n)
        if 2 in by_n:
            ratio = by_n[last]["seconds"] / by_n[2]["seconds"]
            sizes = {r["fused_bytes"] for r in results}
            verdicts.append(f"- {kind}: request {last} / request 2 = {ratio:.2f}x (target <= 1.2x: "
                            f"{'met' if ratio <= 1.2 else 'NOT met'}); fused size "
                            f"{'constant' if len(sizes) == 1 else 'varies'} at "
                            f"{results[0]['fused_bytes'] / 2**20:.2f} MiB")
    report.data = per_kind
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip() + f"\n\nSynthetic Grams from {opts.tokens} token rows; "
               f"median of {opts.repeats} fuses per point; CPU, float64 solve.")
    report.add("Results", markdown_table(["layer", "request N", "fuse ms", "vs N=2", "fused MiB", "state MiB"], rows)
               + "\n\n" + "\n".join(verdicts))
    plot = line_plot([r["n"] for r in next(iter(per_kind.values()))],
                     {kind: [r["seconds"] * 1000 for r in res] for kind, res in per_kind.items()},
                     "request N", "fuse time (ms)", "Fusion time per request", out_dir / "fusion_time.png", logx=True)
    report.add("Plot", f"![fusion time]({plot.name})")
    return report
