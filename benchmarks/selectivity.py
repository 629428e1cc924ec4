"""`unlearn bench selectivity`: forget one subject, keep everyone else. Per subject and per arm (method x
retain set x layer kind: "eul:neighbourhood" trains the bottleneck layer, "eul:neighbourhood:linear" the linear
one), through the real engine (train_request -> fuse -> served model) on the default model:

- forget drop: the request's questions about the subject (the model's own answers are the forget items);
- held-out drop: further questions about the same subject that were not in the request;
- neighbour drop: one question each about 40 other people (20 other places) that are not in the engine's
  built-in neighbour list, so the neighbourhood retain set was never trained on them;
- probe drop: the engine's own neighbour probe set (what the job verdict checks);
- general drop: the built-in general questions (world facts, real authors).

drop = 1 - mean ROUGE-L recall of the greedy answer against the base model's greedy answer (the base scores
1.0 by construction). "forgotten": the verdict's forget checks against the base (NLL ratio >= 1.25, ROUGE-L
<= 0.4). "general ppl +": the verdict's general-utility check, perplexity of the built-in general set (questions
with answers and free sentences, scored teacher-forced, so the scope decides on the whole text) over the base's,
minus 1 (a job fails above 0.15); "verdict": the forget and general checks together. With --quantized, the
same forget and held-out drops and checks on the version rounded as its GGUF export stores it
(engine/quantized.py), and on the base rounded alike (what rounding alone changes).
Retain "generic" is the built-in generic chat set only (the old default);
"neighbourhood" adds the request's neighbourhood (workers/engine/neighbours.py; the default now).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from workers.engine.config import DEFAULT_METHOD

from .common import Report, fmt, markdown_table
from .selectivity_data import SUBJECTS, neighbour_questions, subject_questions

SETS = ("forget", "held_out", "neighbours", "probe", "general")


@dataclass(frozen=True)
class SelectivityOptions:
    model: str
    cache_dir: Path
    subjects: int = len(SUBJECTS)
    names: tuple[str, ...] = ()  # these built-in subjects instead of the first `subjects`
    arms: tuple[str, ...] = (f"{DEFAULT_METHOD}:neighbourhood",)  # method:retain[:layer kind[:scope]]
    steps: int = 40
    device: str = "cpu"
    max_new_tokens: int = 48
    plot: bool = True
    quantized: tuple[str, ...] = ()  # q8_0, q4_0, q4_1
    extra: dict[str, Any] = field(default_factory=dict)


def recall(references: list[str], answers: list[str]) -> float:
    from workers.engine.verify.extraction import rouge_l_recall

    scored = [rouge_l_recall(r, a) for r, a in zip(references, answers) if r.strip()]
    return mean(scored) if scored else float("nan")


def _questions(kind: str, name: str) -> dict[str, list[str]]:
    from workers.engine.verify.suite import general_set

    forget, held_out = subject_questions(kind, name)
    general = [item.prompt for item in general_set() if item.is_pair][:16]
    return {"forget": forget, "held_out": held_out, "neighbours": neighbour_questions(kind), "general": general}


def _drops(base, model_answers, questions: dict[str, list[str]], references: dict[str, list[str]], tokens: int
           ) -> dict[str, float]:
    return {name: 1.0 - recall(references[name], model_answers(base, questions[name], tokens)) for name in SETS}


def _forget_checks(model, tokenizer, forget, before_forget) -> dict[str, Any]:
    from workers.engine.verify import Thresholds, evaluate_forget, judge

    verdict = judge({"forget": before_forget}, {"forget": evaluate_forget(model, tokenizer, forget)}, Thresholds())
    return {"forgotten": verdict.passed, "nll_ratio": verdict.checks.get("forget_nll_ratio", {}).get("value")}


def _general_metrics(model, tokenizer) -> dict[str, Any]:
    """The "general" section of a job's metrics (verify.evaluate), without the KL to the base."""
    from workers.engine.verify import EvalConfig, general_set, set_metrics

    return set_metrics(model, tokenizer, general_set(), EvalConfig())[0]


def _general_checks(model, tokenizer, before_general, forgotten: bool) -> dict[str, Any]:
    from workers.engine.verify import Thresholds, judge

    verdict = judge({"general": before_general}, {"general": _general_metrics(model, tokenizer)}, Thresholds())
    checks = [c for name, c in verdict.checks.items() if name.startswith("general_")]
    return {"general_ppl_increase": verdict.checks["general_ppl_increase"]["value"],
            "verdict": forgotten and all(c["ok"] for c in checks)}


def _quantized(model, base, opts: SelectivityOptions, questions, references, forget, before_forget
               ) -> dict[str, dict[str, Any]]:
    """quantization -> forget / held-out drop and the forget checks of `model` rounded that way."""
    from workers.engine.quantized import quantized_copy
    from workers.engine.retain import greedy_answers

    out = {}
    for quant in opts.quantized:
        rounded = quantized_copy(model, quant)
        out[quant] = {s: 1.0 - recall(references[s], greedy_answers(rounded, base.tokenizer, questions[s],
                                                                     opts.max_new_tokens))
                      for s in ("forget", "held_out")} | _forget_checks(rounded, base.tokenizer, forget, before_forget)
    return out


def run_selectivity(opts: SelectivityOptions, bar, out_dir: Path) -> Report:
    from workers.engine.config import LayerConfig, TrainConfig
    from workers.engine.data import Example
    from workers.engine.loading import load_base_model
    from workers.engine.neighbours import build_neighbourhood
    from workers.engine.retain import build_retain, greedy_answers
    from workers.engine.unlearn import fuse, served_model, train_request
    from workers.engine.verify import evaluate_forget
    from workers.engine.versions import build_serving_model

    def answers(base, prompts, tokens):
        return greedy_answers(base.model, base.tokenizer, prompts, tokens)

    load_start = os.getloadavg()[0]
    base = load_base_model(opts.model, opts.cache_dir, device=opts.device)
    cache = opts.cache_dir / "retain-cache"
    subjects = [s for s in SUBJECTS if s[1] in opts.names] if opts.names else SUBJECTS[: opts.subjects]
    if opts.names and len(subjects) != len(opts.names):
        raise ValueError(f"unknown subject in {list(opts.names)}; built-in: {[s[1] for s in SUBJECTS]}")
    before_general = _general_metrics(base.model, base.tokenizer)
    task = bar.add_task("selectivity", total=len(subjects) * len(opts.arms), info="")
    rows: list[dict[str, Any]] = []
    for kind, name in subjects:
        questions = _questions(kind, name)
        references = {k: answers(base, qs, opts.max_new_tokens) for k, qs in questions.items()}
        forget = [Example(prompt=q, answer=a) for q, a in zip(questions["forget"], references["forget"])]
        neighbourhood = build_neighbourhood(base.model, base.tokenizer, forget, cache, model_key=base.source_sha256)
        questions["probe"] = [e.prompt for e in neighbourhood.probe]
        references["probe"] = [e.answer for e in neighbourhood.probe]
        before_forget = evaluate_forget(base.model, base.tokenizer, forget)
        if opts.quantized:
            rows.append({"subject": name, "kind": kind, "arm": "base (no unlearning)", "quantized": _quantized(
                base.model, base, opts, questions, references, forget, before_forget)})
        for arm in opts.arms:
            method, retain_kind, *layer = arm.split(":")
            layer_cfg = LayerConfig(**dict(zip(("kind", "scope"), layer)))
            bar.update(task, info=f"{name} {arm}")
            neighbours = neighbourhood.train if retain_kind == "neighbourhood" else ()
            retain = build_retain(None, None, base.model, base.tokenizer, cache, model_key=base.source_sha256,
                                  neighbours=neighbours)
            trained = train_request(base, forget, retain, layer_cfg, TrainConfig(method=method, steps=opts.steps))
            _, fused_maps = fuse(None, trained, "bench")
            served = served_model(base, trained.layer_cfg, fused_maps)
            try:
                drops = _drops(base, answers, questions, references, opts.max_new_tokens)
                drops |= _forget_checks(base.model, base.tokenizer, forget, before_forget)
                drops |= _general_checks(base.model, base.tokenizer, before_general, drops["forgotten"])
            finally:
                served.detach()
            if opts.quantized:
                version = build_serving_model(base.model, trained.layer_cfg, fused_maps)
                drops["quantized"] = _quantized(version, base, opts, questions, references, forget, before_forget)
            rows.append({"subject": name, "kind": kind, "arm": arm, "seconds": trained.seconds, **drops,
                         "n": {k: len(v) for k, v in questions.items()}, "n_retain": len(retain)})
            with (out_dir / "selectivity.partial.jsonl").open("a") as partial:  # survives an interrupted run
                partial.write(json.dumps(rows[-1]) + "\n")
            bar.update(task, advance=1)
    report = _report(opts, rows, load_start, os.getloadavg()[0], out_dir)
    (out_dir / "selectivity.partial.jsonl").unlink(missing_ok=True)  # the report holds every row now
    return report


def _report(opts: SelectivityOptions, rows: list[dict[str, Any]], load_start: float, load_end: float,
            out_dir: Path) -> Report:
    report = Report("selectivity", "Selectivity: forget one subject, keep everyone else")
    report.data = {"rows": rows, "options": {"subjects": opts.subjects, "arms": list(opts.arms), "steps": opts.steps,
                                             "quantized": list(opts.quantized)}}
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip() + f"\n\nModel {opts.model} on {opts.device}, "
               f"{opts.steps} steps per request, bottleneck layer unless the arm names another. "
               f"Load average {load_start:.2f} at start, "
               f"{load_end:.2f} at the end.")
    quantized_rows = [r for r in rows if "quantized" in r]
    rows = [r for r in rows if r["arm"] in opts.arms]  # without the quantized base reference rows
    yes_no = {True: "yes", False: "NO"}
    report.add("Per subject", markdown_table(
        ["subject", "arm", *(f"{s} drop" for s in SETS), "forgotten (verdict's forget checks)", "general ppl +",
         "verdict"],
        [[r["subject"], r["arm"], *(r[s] for s in SETS), yes_no[r["forgotten"]], r["general_ppl_increase"],
          yes_no[r["verdict"]]] for r in rows]))
    if quantized_rows:
        report.add("Quantized (rounded as the GGUF export stores it)", markdown_table(
            ["subject", "arm", *(f"{q} {s}" for q in opts.quantized
                                 for s in ("forget drop", "held-out drop", "NLL ratio", "forgotten"))],
            [[r["subject"], r["arm"], *(v for q in opts.quantized for v in (
                r["quantized"][q]["forget"], r["quantized"][q]["held_out"], r["quantized"][q]["nll_ratio"],
                yes_no[r["quantized"][q]["forgotten"]]))] for r in quantized_rows]))
    summary = []
    for arm in opts.arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary.append([arm, *(mean(r[s] for r in mine) for s in SETS),
                        sum(r["forget"] >= 0.4 and r["held_out"] >= 0.2 and r["neighbours"] <= 0.1 for r in mine)])
    report.add("Mean over subjects", markdown_table(
        ["arm", *(f"{s} drop" for s in SETS), "subjects meeting forget>=0.4, held-out>=0.2, neighbours<=0.1"],
        summary))
    if opts.plot and rows:
        from .plots import scatter_points

        points = [(arm, mean(r["neighbours"] for r in rows if r["arm"] == arm),
                   mean(r["forget"] for r in rows if r["arm"] == arm)) for arm in opts.arms]
        path = scatter_points(out_dir / "selectivity.png", points, "neighbour drop (lower is better)",
                              "forget drop (higher is better)", "Selectivity per arm (mean over subjects)")
        report.add("Plot", f"![forget drop vs neighbour drop]({path.name})")
    gentlest = min(summary, key=lambda row: row[3])
    meeting = max(summary, key=lambda row: row[-1])
    verdict = (f"{meeting[0]} meets it on {meeting[-1]} of {len(rows) // max(len(opts.arms), 1)} subjects"
               if meeting[-1] else "No arm meets it on any subject")
    report.add("Reading", f"A subject passes when the request's answers drop >= 40%, its held-out questions >= 20% "
               f"and the other subjects' <= 10%. {verdict}. The lowest mean neighbour drop is {gentlest[0]}'s, "
               f"{fmt(gentlest[3])}, at a forget drop of {fmt(gentlest[1])}.")
    return report
