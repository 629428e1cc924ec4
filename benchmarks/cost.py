"""`unlearn bench cost`: one deletion request's unlearning time vs retraining without the forget data.

Both on the same machine, in one run, from the same base model and TOFU subset:
- unlearning = train_request (the service's default steps) + Gram pass + closed-form fusion, against
  the target model;
- retraining = fine-tuning the base on the retain authors only with the target's recipe (what a model
  owner without unlearning would have to redo), at the benchmark's size, and projected to the full TOFU
  retain90 set (3,600 QA) at the measured seconds per step.
Both runs are timed whole, every step (a timed first step extrapolated was 10x off on a busy machine); only
the full-TOFU retraining is a projection, at the s/step its whole run measured. GPU: peak memory too.
Target (DESIGN section 9): unlearning >= 20x cheaper than retraining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.engine.config import LayerConfig, TrainConfig
from workers.engine.loading import load_base_model
from workers.engine.unlearn import fuse, train_request

from .common import DEFAULT_TOFU_DIR, Report, markdown_table
from .tofu import peak_mb, reset_peak
from .tofu_data import FinetuneConfig, examples, finetune, load_subset

TOFU_RETAIN90_QA = 3600


@dataclass
class CostOptions:
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".unlearn/models")
    data_dir: Path = DEFAULT_TOFU_DIR
    authors: int = 4
    forget_authors: int = 1
    layer: str = "bottleneck"
    steps: int = 40  # the service's default (Settings.train_steps)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5))
    device: str = "auto"


def time_unlearning(base, forget, retain, opts: CostOptions) -> dict[str, float]:
    reset_peak(base.device)
    started = time.perf_counter()
    trained = train_request(base, forget, retain, LayerConfig(kind=opts.layer), TrainConfig(steps=opts.steps))
    fuse(None, trained, "cost")
    total = time.perf_counter() - started
    return {"steps": opts.steps, "seconds_per_step": trained.seconds / opts.steps, "seconds": total,
            "fixed_seconds": total - trained.seconds,  # Gram pass + fusion: once per request
            "peak_mb": peak_mb(base.device)}


def time_retraining(opts: CostOptions, retain) -> dict[str, float]:
    model = load_base_model(opts.model, opts.cache_dir, device=opts.device, dtype=torch.float32)
    steps = opts.finetune.steps_for(len(retain))
    reset_peak(model.device)
    seconds = finetune(model.model, model.tokenizer, retain, opts.finetune, max_steps=steps)
    per_step = seconds / steps
    full_steps = opts.finetune.steps_for(TOFU_RETAIN90_QA)
    return {"steps": steps, "seconds_per_step": per_step, "seconds": seconds,
            "full_tofu_steps": full_steps, "full_tofu_seconds": per_step * full_steps,
            "peak_mb": peak_mb(model.device)}


def run_cost(opts: CostOptions, bar, out_dir: Path) -> Report:
    subset = load_subset(opts.data_dir, opts.authors, opts.forget_authors)
    forget, retain = examples(subset.forget), examples(subset.retain)
    task = bar.add_task("cost", total=2, info="unlearning request")
    base = load_base_model(opts.model, opts.cache_dir, device=opts.device)
    unlearn = time_unlearning(base, forget, retain, opts)
    del base
    bar.update(task, advance=1, info="retraining without the forget authors")
    retrain = time_retraining(opts, retain)
    bar.update(task, advance=1, info="done")
    ratio = retrain["seconds"] / unlearn["seconds"]
    full_ratio = retrain["full_tofu_seconds"] / unlearn["seconds"]
    report = Report("cost", f"Unlearning cost vs retraining ({opts.model})")
    report.data = {"unlearning": unlearn, "retraining": retrain, "ratio": ratio, "ratio_full_tofu": full_ratio}
    ft = opts.finetune
    report.add("Setup", (
        f"- one request: {len(forget)} forget QA ({opts.forget_authors} author), {len(retain)} retain QA, "
        f"{opts.steps} steps of method eul, layer {opts.layer}, batch 4, then Gram pass + fusion\n"
        f"- retraining: full fine-tune of the base on the {len(retain)} retain QA, {ft.epochs} epochs, batch "
        f"{ft.batch_size} ({retrain['steps']} steps); full-TOFU projection: {TOFU_RETAIN90_QA} QA = "
        f"{retrain['full_tofu_steps']} steps at the measured s/step\n"
        f"- device {opts.device}; both runs timed whole, every step"))
    rows = [["unlearning request (train + Grams + fuse)", unlearn["steps"], unlearn["seconds_per_step"],
             unlearn["seconds"], unlearn["peak_mb"], 1.0],
            [f"retrain on {len(retain)} retain QA", retrain["steps"], retrain["seconds_per_step"],
             retrain["seconds"], retrain["peak_mb"], ratio],
            [f"retrain on TOFU retain90 ({TOFU_RETAIN90_QA} QA), projected", "-", retrain["seconds_per_step"],
             retrain["full_tofu_seconds"], retrain["peak_mb"], full_ratio]]
    verdict = (f"Retraining / unlearning: {ratio:.1f}x at this size, {full_ratio:.1f}x projected to full TOFU "
               f"(target >= 20x: {'met' if ratio >= 20 else 'not met'} at this size, "
               f"{'met' if full_ratio >= 20 else 'not met'} at full TOFU). Retraining grows with the retained "
               "corpus; one request's cost does not.")
    report.add("Results", markdown_table(["run", "steps timed", "s/step", "seconds", "GPU peak MiB",
                                          "cost vs unlearning"], rows) + "\n\n" + verdict)
    return report
