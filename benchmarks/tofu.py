"""`unlearn bench tofu`: forgetting quality vs model utility on whole TOFU authors, per method.

1. target model = base fine-tuned on N authors; retain model = base fine-tuned on the N - K retain
   authors (both cached);
2. per method (and, for the default method, per layer kind): one deletion request with the K forget authors,
   trained against the target, fused (closed form, as the service does) and served; TOFU scores;
3. <method>_seq (e.g. npo_seq): K requests of one author each, fused one after another (MUSE C6
   sustainability): after each, every earlier forget author's scores and the utility -> sequential curve.
Reference rows: the untouched target and the retain model (forget quality 1.0 by definition).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.engine.config import DEFAULT_METHOD, LayerConfig, TrainConfig
from workers.engine.layers.scope import scope_evidence
from workers.engine.unlearn import fuse, served_model, train_request

from .common import DEFAULT_TOFU_DIR, SEQUENTIAL, TOFU_METHODS, Report, markdown_table
from .tofu_data import FinetuneConfig, TofuSubset, examples, finetuned_model, load_subset
from .tofu_eval import ModelScores, forget_quality, score_model


@dataclass
class TofuOptions:
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".unlearn/models")
    data_dir: Path = DEFAULT_TOFU_DIR
    authors: int = 8
    forget_authors: int = 4
    methods: tuple[str, ...] = TOFU_METHODS
    layers: tuple[str, ...] = ("bottleneck", "lora")  # the default method runs on each; others on the first
    steps: int = 40
    lr: float = 1e-3
    eval_items: int = 20
    max_new_tokens: int = 48
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    device: str = "auto"
    seed: int = 0


@dataclass
class Row:
    name: str
    layer: str
    scores: ModelScores
    seconds: float
    peak_mb: float = float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def utility_sets(subset: TofuSubset) -> dict[str, list[dict]]:
    return {"retain": subset.retain, "real_authors": subset.real_authors, "world_facts": subset.world_facts}


def unlearn_once(target, forget_rows, retain_rows, layer: str, method: str, opts: TofuOptions,
                 state=None, request_id: str = "r1", on_step=None):
    """Train one request against the target, fuse it onto `state`; (new state, fused maps, seconds)."""
    train_cfg = TrainConfig(method=method, steps=opts.steps, lr=opts.lr, seed=opts.seed)
    started = time.perf_counter()
    trained = train_request(target, examples(forget_rows), examples(retain_rows), LayerConfig(kind=layer),
                            train_cfg, on_progress=on_step)
    state, fused = fuse(state, trained, request_id)
    return state, fused, time.perf_counter() - started


@contextmanager
def serving(target, layer: str, fused) -> Iterator[None]:
    """target.model serves the fused layer inside the block, and is the exact target again after it."""
    served = served_model(target, LayerConfig(kind=layer), fused)
    try:
        yield
    finally:
        served.detach()


def scored_with(target, layer: str, fused, subset: TofuSubset, opts: TofuOptions) -> ModelScores:
    with serving(target, layer, fused):
        return score_model(target.model, target.tokenizer, subset.forget_authors, utility_sets(subset),
                           opts.max_new_tokens)


def method_runs(opts: TofuOptions) -> list[tuple[str, str]]:
    runs = []
    for method in opts.methods:
        layers = opts.layers if method == DEFAULT_METHOD else opts.layers[:1]
        runs += [(method, layer) for layer in layers]
    return runs


def run_tofu(opts: TofuOptions, bar, out_dir: Path) -> Report:
    subset = load_subset(opts.data_dir, opts.authors, opts.forget_authors, opts.eval_items)
    all_items = examples(subset.forget + subset.retain)
    task = bar.add_task("fine-tune target", total=None, info="")

    def ft_step(step, total, loss):
        bar.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

    target, target_ft = finetuned_model(opts.model, opts.cache_dir, "target", all_items, opts.finetune, opts.device,
                                        ft_step)
    bar.update(task, description="fine-tune retain model", completed=0)
    retain_model, retain_ft = finetuned_model(opts.model, opts.cache_dir, "retain", examples(subset.retain),
                                              opts.finetune, opts.device, ft_step)
    bar.update(task, description="score reference models", completed=0, total=2)
    retain_scores = score_model(retain_model.model, retain_model.tokenizer, subset.forget_authors,
                                utility_sets(subset), opts.max_new_tokens)
    del retain_model
    bar.advance(task)
    rows = [Row("retain model (gold)", "-", retain_scores, retain_ft),
            Row("target (no unlearning)", "-", score_model(target.model, target.tokenizer, subset.forget_authors,
                                                        utility_sets(subset), opts.max_new_tokens), target_ft)]
    bar.advance(task)
    sequential: list[dict[str, Any]] = []  # points of every <method>_seq run
    runs = method_runs(opts)
    bar.update(task, description="unlearn + score", completed=0, total=len(runs), info="")
    for method, layer in runs:
        bar.update(task, info=f"{method} ({layer})")
        reset_peak(target.device)
        if method.endswith(SEQUENTIAL):
            row, curve = run_sequential(target, subset, method, layer, opts, retain_scores)
            sequential += curve
        else:
            _, fused, seconds = unlearn_once(target, subset.forget, subset.retain, layer, method, opts)
            row = Row(method, layer, scored_with(target, layer, fused, subset, opts), seconds)
        row.peak_mb = peak_mb(target.device)
        rows.append(row)
        bar.advance(task)
    return build_report(opts, subset, rows, retain_scores, sequential, out_dir)


def run_sequential(target, subset: TofuSubset, name: str, layer: str, opts: TofuOptions,
                   retain_scores: ModelScores) -> tuple[Row, list[dict[str, Any]]]:
    """`name` = <method>_seq: one request per forget author, fused in turn; after request k, every author <= k
    is scored, with the share of its questions the version's scope puts in scope (layers/scope.py: the layer
    acts only there), and the share of retain questions."""
    method = name.removesuffix(SEQUENTIAL)
    state, curve, seconds, scores = None, [], 0.0, None
    for k, author in enumerate(subset.forget_authors, start=1):
        state, fused, spent = unlearn_once(target, author, subset.retain, layer, method, opts, state, f"author-{k}")
        seconds += spent
        with serving(target, layer, fused):
            scores = score_model(target.model, target.tokenizer, subset.forget_authors[:k], utility_sets(subset),
                                 opts.max_new_tokens)
            scope = scope_evidence(target.model, target.tokenizer, {
                "retain": examples(subset.retain),
                **{f"author_{j}": examples(rows) for j, rows in enumerate(subset.forget_authors[:k], start=1)}})
        for j, author_scores in enumerate(scores.forget, start=1):
            gold = retain_scores.forget[j - 1].ratios
            curve.append({"method": name, "requests": k, "author": j, "forget_rouge": author_scores.rouge_l,
                          "forget_prob": author_scores.prob,
                          "forget_quality": forget_quality(author_scores.ratios, gold),
                          "in_scope": scope.get(f"author_{j}_in_scope", 1.0),  # 1.0: a layer acting everywhere
                          "retain_in_scope": scope.get("retain_in_scope", 1.0), "utility": scores.utility})
    return Row(name, layer, scores, seconds), curve


def build_report(opts: TofuOptions, subset: TofuSubset, rows: list[Row], retain_scores: ModelScores,
                 sequential: list[dict[str, Any]], out_dir: Path) -> Report:
    from .plots import scatter_quality_utility, sequential_curves

    report = Report("tofu", f"TOFU forgetting: {opts.authors} authors, forget {opts.forget_authors} ({opts.model})")
    gold = retain_scores.forget_ratios
    headers = ["model / method", "layer", "forget quality (KS p)", "model utility", "forget ROUGE-L",
               "forget prob", "retain ROUGE-L", "real authors ROUGE-L", "world facts ROUGE-L", "wall s"]
    table, data = [], []
    for row in rows:
        s = row.scores
        quality = 1.0 if row.name.startswith("retain model") else forget_quality(s.forget_ratios, gold)
        values = [row.name, row.layer, quality, s.utility, s.forget_rouge, s.forget_prob,
                  s.utility_sets["retain"].rouge_l, s.utility_sets["real_authors"].rouge_l,
                  s.utility_sets["world_facts"].rouge_l, row.seconds]
        table.append(values)
        data.append(dict(zip(["name", "layer", "forget_quality", "utility", "forget_rouge", "forget_prob",
                              "retain_rouge", "real_rouge", "world_rouge", "seconds"], values),
                         peak_mb=row.peak_mb))
    report.data = {"rows": data, "sequential": sequential, "options": {
        "authors": opts.authors, "forget_authors": opts.forget_authors, "steps": opts.steps, "lr": opts.lr,
        "eval_items": opts.eval_items, "finetune": vars(opts.finetune)}}
    report.add("Setup", setup_text(opts, subset))
    report.add("Results", markdown_table(headers, table) + "\n\n" + READING)
    scatter = scatter_quality_utility(data, out_dir / "tofu_quality_utility.png")
    report.add("Forget quality vs model utility", f"![scatter]({scatter.name})")
    if sequential:
        curve = sequential_curves(sequential, out_dir / "tofu_sequential.png")
        seq_rows = [[p["method"], p["requests"], p["author"], p["forget_quality"], p["forget_rouge"],
                     p["forget_prob"], p["in_scope"], p["retain_in_scope"], p["utility"]] for p in sequential]
        report.add("Sequential requests (MUSE C6 sustainability)",
                   markdown_table(["method", "after request k", "author j <= k", "forget quality", "forget ROUGE-L",
                                   "forget prob", "author in scope", "retain in scope", "utility"], seq_rows)
                   + f"\n\n![sequential]({curve.name})\n\n" + SEQUENTIAL_READING)
    return report


READING = ("Forget quality: KS-test p-value of the forget authors' truth ratios vs the retain model's; the "
           "retain model itself is 1.0, values above 0.05 mean the two are statistically indistinguishable. "
           "Model utility: harmonic mean of probability, ROUGE-L recall and truth-ratio score on retain authors, "
           "real authors and world facts (TOFU). 'wall s' is train + fuse time per request (fine-tune time for "
           "the reference rows; 0 when the cached model was reused).")


SEQUENTIAL_READING = ("'author in scope': share of that author's forget questions the version's recognisers put in "
                      "scope (the fused layer acts only on those; the rest are answered by the target as is); "
                      "'retain in scope': the same share of the retain authors' questions.")


def setup_text(opts: TofuOptions, subset: TofuSubset) -> str:
    ft = opts.finetune
    return (f"- data: {opts.data_dir} (TOFU, forget10 task 1 + retain_perturbed): {opts.authors} whole authors, "
            f"{len(subset.forget)} forget QA ({opts.forget_authors} authors), {len(subset.retain)} retain QA; "
            f"{len(subset.real_authors)} real-author and {len(subset.world_facts)} world-fact items for utility\n"
            f"- fine-tunes (target, retain model): full weights, {ft.epochs} epochs, lr {ft.lr}, "
            f"batch {ft.batch_size}\n"
            f"- unlearning: {opts.steps} steps, lr {opts.lr}, batch 4, one request fused in closed form "
            f"(<method>_seq: one request per forget author, fused in turn); layers {', '.join(opts.layers)}\n"
            f"- methods: {', '.join(opts.methods)}; device {opts.device}")
