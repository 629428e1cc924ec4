"""Does a request's recogniser know its subject and nobody else? (issue 12, workers/engine/layers/scope.py)

For each subject of `unlearn bench selectivity` on the default model, the recogniser is fitted as a job fits it
(train_request: the forget items = the subject's questions with the base model's answers; negatives = the
request's retain set with its neighbourhood, and its own questions about other subjects), at several blocks,
and asked about every question set of the selectivity benchmark: the share of prompts it puts in scope, the
lowest logit on the subject's questions and the highest on everyone else's (a margin > 0 separates them).
A prompt out of scope is answered by the base model (the layer's branch is multiplied by zero), so the share of
neighbours in scope bounds what a request can take from them; the end-to-end drops are the selectivity
benchmark's.

    python -m benchmarks.scope_diagnostic --out benchmarks/results/scope
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .common import MachineLoad, cores, fmt, load_average, machine_line, markdown_table
from .selectivity import SETS, _questions
from .selectivity_data import SUBJECTS

BLOCKS = (0, 2, 5, 8, 16, 29)
POSITIVE = ("forget", "held_out")


def logits_of(base, recogniser, block: int, prompts: list[str]) -> list[float]:
    import torch

    from workers.engine.batching import prompt_ids
    from workers.engine.layers.scope import read_features

    out = []
    for prompt in prompts:
        features = read_features(base.model, block, torch.tensor([prompt_ids(base.tokenizer, prompt)]), None)
        out.append(float(features[0] @ recogniser[:-1] + recogniser[-1]))
    return out


def run_subject(base, kind: str, name: str, cache: Path, blocks: tuple[int, ...]) -> dict[str, Any]:
    from workers.engine.data import Example
    from workers.engine.layers.scope import fit_recogniser
    from workers.engine.neighbours import build_neighbourhood, other_subject_prompts
    from workers.engine.retain import build_retain, greedy_answers

    questions = _questions(kind, name)
    answers = greedy_answers(base.model, base.tokenizer, questions["forget"], 48)
    forget = [Example(prompt=q, answer=a) for q, a in zip(questions["forget"], answers)]
    hood = build_neighbourhood(base.model, base.tokenizer, forget, cache, model_key=base.source_sha256)
    questions["probe"] = [e.prompt for e in hood.probe]
    retain = build_retain(None, None, base.model, base.tokenizer, cache, model_key=base.source_sha256,
                          neighbours=hood.train)
    result: dict[str, Any] = {}
    for block in blocks:
        recogniser = fit_recogniser(base.model, base.tokenizer, forget, retain, block,
                                    other_prompts=other_subject_prompts(forget))
        logits = {s: logits_of(base, recogniser, block, questions[s]) for s in SETS}
        result[str(block)] = {
            "in_scope": {s: sum(v > 0 for v in vs) / len(vs) for s, vs in logits.items()},
            "lowest_subject_logit": min(min(logits[s]) for s in POSITIVE),
            "highest_other_logit": max(max(logits[s]) for s in SETS if s not in POSITIVE),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scope"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/unlearn-models"))
    parser.add_argument("--subjects", type=int, default=len(SUBJECTS))
    args = parser.parse_args(argv)
    from workers.engine.loading import load_base_model

    before, started = load_average(), time.monotonic()
    base = load_base_model("smollm2-135m-instruct", args.cache_dir, device="cpu")
    rows = {name: run_subject(base, kind, name, args.cache_dir / "retain-cache", BLOCKS)
            for kind, name in SUBJECTS[: args.subjects]}
    load = MachineLoad(before, load_average(), cores())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recogniser.json").write_text(json.dumps(rows, indent=2))
    (args.out / "recogniser.md").write_text(report(rows, load, time.monotonic() - started, argv))
    print((args.out / "recogniser.md").read_text())


def report(rows: dict[str, Any], load: MachineLoad, seconds: float, argv: list[str] | None) -> str:
    command = "python -m benchmarks.scope_diagnostic " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = [[name, block, *(fmt(r["in_scope"][s]) for s in SETS), fmt(r["lowest_subject_logit"], 2),
              fmt(r["highest_other_logit"], 2)]
             for name, blocks in rows.items() for block, r in blocks.items()]
    header = ["subject", "block", *(f"{s} in scope" for s in SETS), "lowest subject logit", "highest other logit"]
    return "\n".join([
        "# Sequence scope: which prompts a request's recogniser puts in scope", "",
        f"- command: `{command}`", f"- machine: {machine_line()}", f"- {load.line()}", f"- {seconds / 60:.1f} min", "",
        (__doc__ or "").split("\n\n    python")[0].strip(), "",
        "Sets as in `unlearn bench selectivity`: forget = the request's questions, held_out = further questions "
        "about the subject, neighbours = 40 other people (20 places) outside the built-in lists, probe = the "
        "verdict's neighbour probe set, general = world facts and real authors.", "",
        markdown_table(header, table), ""])


if __name__ == "__main__":
    main()
