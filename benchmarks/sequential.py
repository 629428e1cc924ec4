"""`unlearn bench sequential`: requests in a row, each about a different subject the model knows, fused one
after another through the real engine as the service does (each layer trained against the base, the running
fusion sums growing). After each request, on the fused model:

- every request so far: the service's "forgotten" criterion, the verdict's forget checks against the base
  model (forget NLL ratio >= 1.25, ROUGE-L of greedy answers <= 0.4; what a new version re-checks for
  every earlier request), and its forget drop (1 - ROUGE-L recall against the base model's answers);
- neighbours: one question each about 40 other people or 20 other places, never trained on;
- general: the built-in general questions (world facts, real authors).

Sustainability (MUSE C6): does request k+1 bring request k back, and how fast does utility erode?
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from workers.engine.config import DEFAULT_METHOD

from .common import Report, fmt, markdown_table
from .selectivity import _questions, recall

SUBJECTS = (
    ("person", "Albert Einstein"), ("place", "Mount Kilimanjaro"), ("person", "Marie Curie"),
    ("place", "the Louvre"), ("person", "William Shakespeare"), ("person", "Barack Obama"),
    ("person", "Isaac Newton"), ("place", "the Eiffel Tower"),
)


@dataclass(frozen=True)
class SequentialOptions:
    model: str
    cache_dir: Path
    requests: int = 8
    method: str = DEFAULT_METHOD
    steps: int = 40
    device: str = "cpu"
    max_new_tokens: int = 48
    plot: bool = True


def run_sequential(opts: SequentialOptions, bar, out_dir: Path) -> Report:
    from workers.engine.config import LayerConfig, TrainConfig
    from workers.engine.data import Example
    from workers.engine.loading import load_base_model
    from workers.engine.neighbours import build_neighbourhood
    from workers.engine.retain import build_retain, greedy_answers
    from workers.engine.unlearn import fuse, served_model, train_request
    from workers.engine.verify import Thresholds, evaluate_forget, judge

    def answers(prompts: list[str]) -> list[str]:
        return greedy_answers(base.model, base.tokenizer, prompts, opts.max_new_tokens)

    load_start = os.getloadavg()[0]
    base = load_base_model(opts.model, opts.cache_dir, device=opts.device)
    cache = opts.cache_dir / "retain-cache"
    task = bar.add_task("sequential", total=opts.requests, info="")
    requests: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    state = None
    for index, (kind, name) in enumerate(SUBJECTS[: opts.requests]):
        bar.update(task, info=name)
        questions = _questions(kind, name)
        references = {k: answers(qs) for k, qs in questions.items() if k != "held_out"}
        forget = [Example(prompt=q, answer=a) for q, a in zip(questions["forget"], references["forget"])]
        neighbourhood = build_neighbourhood(base.model, base.tokenizer, forget, cache, model_key=base.source_sha256)
        retain = build_retain(None, None, base.model, base.tokenizer, cache, model_key=base.source_sha256,
                              neighbours=neighbourhood.train)
        trained = train_request(base, forget, retain, LayerConfig(), TrainConfig(method=opts.method, steps=opts.steps))
        requests.append({"subject": name, "questions": questions, "references": references, "forget": forget,
                         "before": evaluate_forget(base.model, base.tokenizer, forget)})
        state, fused_maps = fuse(state, trained, f"r{index}")
        served = served_model(base, trained.layer_cfg, fused_maps)
        try:
            row: dict[str, Any] = {"requests": index + 1, "subject": name, "seconds": trained.seconds}
            for done in requests:
                after = evaluate_forget(base.model, base.tokenizer, done["forget"])
                verdict = judge({"forget": done["before"]}, {"forget": after}, Thresholds())
                drop = 1.0 - recall(done["references"]["forget"], answers(done["questions"]["forget"]))
                row[done["subject"]] = {"forgotten": verdict.passed, "drop": drop,
                                        "nll_ratio": verdict.checks.get("forget_nll_ratio", {}).get("value"),
                                        "rougeL": after.get("rougeL")}
            latest = requests[-1]  # neighbours of the latest subject's kind; the general set is the same for all
            for group in ("neighbours", "general"):
                row[group] = 1.0 - recall(latest["references"][group], answers(latest["questions"][group]))
        finally:
            served.detach()
        rows.append(row)
        with (out_dir / "sequential.partial.jsonl").open("a") as partial:  # survives an interrupted run
            partial.write(json.dumps(row) + "\n")
        bar.update(task, advance=1)
    report = _report(opts, rows, [r["subject"] for r in requests], load_start, os.getloadavg()[0], out_dir)
    (out_dir / "sequential.partial.jsonl").unlink(missing_ok=True)
    return report


def _report(opts: SequentialOptions, rows: list[dict[str, Any]], subjects: list[str], load_start: float,
            load_end: float, out_dir: Path) -> Report:
    report = Report("sequential", "Sequential requests: does each later request keep the earlier ones forgotten?")
    report.data = {"rows": rows, "options": {"requests": opts.requests, "method": opts.method, "steps": opts.steps}}
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip() + f"\n\nModel {opts.model} on {opts.device}, method "
               f"{opts.method}, {opts.steps} steps per request, bottleneck layer, neighbourhood retain (the "
               f"service's defaults). Load average {load_start:.2f} at start, {load_end:.2f} at the end.")
    cell = {True: "yes", False: "NO"}
    report.add("Forget drop of each request after k requests (forgotten by the verdict's criterion?)", markdown_table(
        ["k", *subjects, "neighbour drop (latest kind)", "general drop"],
        [[r["requests"], *(f"{fmt(r[s]['drop'])} ({cell[r[s]['forgotten']]})" if s in r else "" for s in subjects),
          r["neighbours"], r["general"]] for r in rows]))
    if opts.plot and rows:
        from .plots import line_plot

        ks = [r["requests"] for r in rows]
        series = {s: [r[s]["drop"] if s in r else float("nan") for r in rows] for s in subjects}
        series["general (utility loss)"] = [r["general"] for r in rows]
        path = line_plot(ks, series, "requests fused so far (k)", "drop (1 - ROUGE-L vs base answers)",
                         "Sequential requests: forget drop of each, and general drop", out_dir / "sequential.png")
        report.add("Plot", f"![forget drop per request after k requests]({path.name})")
    last = rows[-1] if rows else {}
    kept = [s for s in subjects if s in last and last[s]["forgotten"]]
    lost = [s for s in subjects if s in last and not last[s]["forgotten"]]
    report.add("Reading", f"After {len(rows)} requests, {len(kept)} of {len(subjects)} still meet the forgotten "
               f"criterion" + (f"; not: {', '.join(lost)}" if lost else "") + ". Mean forget drop "
               f"{fmt(mean(last[s]['drop'] for s in subjects if s in last)) if last else 'n/a'}, general drop "
               f"{fmt(last.get('general', float('nan')))}.")
    return report
