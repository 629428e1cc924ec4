"""`unlearn bench memorization`: the check that decides a job's outcome ("forgotten" vs "not_memorized"),
on the default model, over items it knows and items it cannot know.

Known: questions the model answers (world facts and authors from the built-in verification set, in its
own phrasing) and a famous text. Unknown: made-up codes, badge numbers and people, as free text and as
question/answer pairs that restate their question. Per item: greedy reproduction of the target's new
words, the truth ratio against the model's own sampled answers, and the decision. Numbers, no timing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .common import Report, markdown_table

KNOWN = [
    {"prompt": "What is the capital of France?", "answer": "The capital of France is Paris."},
    {"prompt": "Who wrote Romeo and Juliet?", "answer": "William Shakespeare wrote Romeo and Juliet."},
    {"prompt": "Who was the first president of the United States?",
     "answer": "George Washington was the first president of the United States."},
    {"text": "We hold these truths to be self-evident, that all men are created equal, that they are endowed by "
             "their Creator with certain unalienable Rights"},
    {"text": "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings "
             "and arrows of outrageous fortune"},
]
UNKNOWN = [
    {"text": "Orla Fenwick's locker code at Brindle Gym is 4471."},
    *({"text": f"Employee {name} at Marlow Textiles wears badge number {badge}."}
      for name, badge in [("Tessa Quill", 55821), ("Ivo Brandt", 90317), ("Mina Okafor", 23409),
                          ("Lars Pettersen", 77150)]),
    {"prompt": "What is Orla Fenwick's locker code?", "answer": "Orla Fenwick's locker code is 4471."},
    {"prompt": "What badge number does Ivo Brandt wear?", "answer": "Ivo Brandt wears badge number 90317."},
    {"prompt": "Where does Hana Kowalczyk keep her spare key?", "answer": "Under the blue flowerpot by the shed."},
]


@dataclass(frozen=True)
class MemorizationOptions:
    model: str
    cache_dir: Path
    device: str = "cpu"


def _label(row: dict) -> str:
    words = (row.get("prompt") or row["text"]).split()
    return " ".join(words[:7]) + (" ..." if len(words) > 7 else "")


def run_memorization(opts: MemorizationOptions, bar, out_dir: Path) -> Report:
    from workers.engine.loading import load_base_model
    from workers.engine.verify.memorization import MemorizationConfig, item_evidence
    from workers.engine.verify.scoring import to_eval_items

    task = bar.add_task("memorization", total=2, info="loading model")
    base = load_base_model(opts.model, opts.cache_dir, device=opts.device)
    cfg = MemorizationConfig()
    rows, data, decided = [], [], {"known": 0, "unknown": 0}
    for kind, items in (("known", KNOWN), ("unknown", UNKNOWN)):
        evidence = item_evidence(base.model, base.tokenizer, to_eval_items(items), cfg)
        for item, ev in zip(items, evidence):
            rows.append([kind, _label(item), ev.reproduction, ev.truth_ratio, ev.target_nll, ev.reference_nll,
                         ev.samples_reproducing, "memorised" if ev.memorized else "not memorised"])
            data.append({"kind": kind, "item": _label(item), **ev.__dict__})
            decided[kind] += ev.memorized
        bar.update(task, advance=1, info=kind)
    report = Report("memorization", "Memorisation check: what decides forgotten vs not_memorized")
    report.data = {"items": data, "config": cfg.__dict__}
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip() + f"\n\nModel {opts.model} on {opts.device}; "
               f"criteria: reproduction >= {cfg.min_reproduction} or truth ratio < {cfg.max_truth_ratio} or most "
               f"of {cfg.n_references} samples reproduce; load average at start {os.getloadavg()[0]:.2f}.")
    report.add("Results", markdown_table(
        ["kind", "item", "reproduction", "truth ratio", "target NLL", "reference NLL", "samples reproducing",
         "decision"], rows))
    unknown_ratios = [d["truth_ratio"] for d in data if d["kind"] == "unknown" and d["truth_ratio"] is not None]
    missed = [d["item"] for d in data if d["kind"] == "known" and not d["memorized"]]
    report.add("Reading", f"{decided['known']} of {len(KNOWN)} known items and {decided['unknown']} of "
               f"{len(UNKNOWN)} unknown items are judged memorised; the lowest truth ratio of an unknown item is "
               f"{min(unknown_ratios, default=float('nan')):.3f} (the bar is {cfg.max_truth_ratio}). Known items "
               f"judged not memorised: {'; '.join(missed) or 'none'}. A fact the model does not answer greedily "
               "(it names someone else) is not memorised by this model: the check is about what the model "
               "reproduces, not what is true. A text it half knows (recall below 0.5, truth ratio just above the "
               "bar) is the weak side: such a request ends not_memorized unless UNLEARN_TRAIN_UNMEMORIZED is set.")
    return report
