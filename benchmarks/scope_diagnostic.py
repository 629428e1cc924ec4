"""Does a request's recogniser know its subject and nobody else? (issue 12, workers/engine/layers/scope.py)

For each subject of `unlearn bench selectivity` on the default model, the recogniser is fitted as a job fits it
(train_request: the forget items = the subject's questions with the base model's answers; negatives = the
request's retain set with its neighbourhood, and its own questions about other subjects), at several blocks,
and asked about every question set of the selectivity benchmark: the share of prompts it puts in scope, the
lowest logit on the subject's questions and the highest on everyone else's (a margin > 0 separates them).
A prompt out of scope is answered by the base model (the layer's branch is multiplied by zero), so the share of
neighbours in scope bounds what a request can take from them; the end-to-end drops are the selectivity
benchmark's. "general_text" is the verdict's general free sentences as its perplexity check reads them
(whole, teacher-forced): a sentence in scope there is a sentence the layer acts on.

With --compare-free-text each block is fitted twice: with the job's negatives and without the everyday free
sentences it adds (neighbours.free_text_negatives), the recogniser as it was before they were added.

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


def text_logits(base, recogniser, block: int, texts: list[str]) -> list[float]:
    """Logits on whole free texts, tokenised as teacher-forced scoring reads them."""
    from workers.engine.data import Example
    from workers.engine.layers.scope import _features, _views

    views = [_views(base.tokenizer, Example(text=t), 256)[1] for t in texts]
    return (_features(base.model, base.tokenizer, views, block) @ recogniser[:-1] + recogniser[-1]).tolist()


def general_texts() -> list[str]:
    from workers.engine.verify.suite import general_set

    return [item.text for item in general_set() if not item.is_pair]


def run_subject(base, kind: str, name: str, cache: Path, blocks: tuple[int, ...], compare_free_text: bool = False
                ) -> dict[str, Any]:
    from workers.engine.data import Example
    from workers.engine.layers.scope import fit_recogniser
    from workers.engine.neighbours import build_neighbourhood, free_text_negatives, other_subject_prompts
    from workers.engine.retain import build_retain, greedy_answers

    questions = _questions(kind, name)
    answers = greedy_answers(base.model, base.tokenizer, questions["forget"], 48)
    forget = [Example(prompt=q, answer=a) for q, a in zip(questions["forget"], answers)]
    hood = build_neighbourhood(base.model, base.tokenizer, forget, cache, model_key=base.source_sha256)
    questions["probe"] = [e.prompt for e in hood.probe]
    retain = build_retain(None, None, base.model, base.tokenizer, cache, model_key=base.source_sha256,
                          neighbours=hood.train)
    negatives = {"job's": [*retain, *free_text_negatives(forget)]}
    if compare_free_text:
        negatives["without free text"] = retain
    result: dict[str, Any] = {}
    for block in blocks:
        for label, negative in negatives.items():
            recogniser = fit_recogniser(base.model, base.tokenizer, forget, negative, block,
                                        other_prompts=other_subject_prompts(forget))
            logits = {s: logits_of(base, recogniser, block, questions[s]) for s in SETS}
            logits["general_text"] = text_logits(base, recogniser, block, general_texts())
            key = str(block) if label == "job's" else f"{block}, {label}"
            result[key] = {
                "in_scope": {s: sum(v > 0 for v in vs) / len(vs) for s, vs in logits.items()},
                "lowest_subject_logit": min(min(logits[s]) for s in POSITIVE),
                "highest_other_logit": max(max(vs) for s, vs in logits.items() if s not in POSITIVE),
            }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scope"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/unlearn-models"))
    parser.add_argument("--subjects", type=int, default=len(SUBJECTS))
    parser.add_argument("--blocks", default=",".join(map(str, BLOCKS)), help="comma-separated blocks to probe")
    parser.add_argument("--compare-free-text", action="store_true",
                        help="also fit each block without the everyday free-sentence negatives")
    args = parser.parse_args(argv)
    blocks = tuple(int(b) for b in args.blocks.split(","))
    from workers.engine.loading import load_base_model

    before, started = load_average(), time.monotonic()
    base = load_base_model("smollm2-135m-instruct", args.cache_dir, device="cpu")
    rows = {name: run_subject(base, kind, name, args.cache_dir / "retain-cache", blocks, args.compare_free_text)
            for kind, name in SUBJECTS[: args.subjects]}
    load = MachineLoad(before, load_average(), cores())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recogniser.json").write_text(json.dumps(rows, indent=2))
    (args.out / "recogniser.md").write_text(report(rows, load, time.monotonic() - started, argv))
    print((args.out / "recogniser.md").read_text())


def report(rows: dict[str, Any], load: MachineLoad, seconds: float, argv: list[str] | None) -> str:
    command = "python -m benchmarks.scope_diagnostic " + shlex.join(sys.argv[1:] if argv is None else argv)
    sets = (*SETS, "general_text")
    table = [[name, block, *(fmt(r["in_scope"].get(s)) for s in sets), fmt(r["lowest_subject_logit"], 2),
              fmt(r["highest_other_logit"], 2)]
             for name, blocks in rows.items() for block, r in blocks.items()]
    header = ["subject", "block", *(f"{s} in scope" for s in sets), "lowest subject logit", "highest other logit"]
    return "\n".join([
        "# Sequence scope: which prompts a request's recogniser puts in scope", "",
        f"- command: `{command}`", f"- machine: {machine_line()}", f"- {load.line()}", f"- {seconds / 60:.1f} min", "",
        (__doc__ or "").split("\n\n    python")[0].strip(), "",
        "Sets as in `unlearn bench selectivity`: forget = the request's questions, held_out = further questions "
        "about the subject, neighbours = 40 other people (20 places) outside the built-in lists, probe = the "
        "verdict's neighbour probe set, general = world facts and real authors (questions), general_text = the "
        "verdict's general free sentences (whole).", "",
        markdown_table(header, table), ""])


if __name__ == "__main__":
    main()
