"""Why the gated layer does not spare the neighbours (issue 12): one subject, the gated arm of the selectivity
benchmark, measured two ways.

1. The drops (as `unlearn bench selectivity`: 1 - ROUGE-L recall of greedy answers against the base model's)
   with the request's trained maps and with the maps after closed-form fusion: does fusion blur the gate?
2. How far the gates open on each question set: sigmoid(w_g . u + b_g) of every block at every position of
   the chat-formatted question + the base model's answer (teacher-forced): mean, and the fraction of
   positions above 0.5 and above 0.1. A gate that recognised the subject would be shut on neighbours and
   general questions.

    python -m benchmarks.gate_diagnostic --out benchmarks/results/gated
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import MachineLoad, cores, fmt, load_average, machine_line, markdown_table
from .selectivity import SETS, _questions, recall


def gate_openings(base, served, questions: dict[str, list[str]], references: dict[str, list[str]]
                  ) -> dict[str, dict[str, float]]:
    import torch

    gates = [a.gate for a in served.layer.adapters if a.gate is not None]
    out = {}
    for name in SETS:
        values: list[torch.Tensor] = []
        def keep(_module, _inputs, output, values=values) -> None:
            values.append(torch.sigmoid(output).flatten())

        hooks = [g.register_forward_hook(keep) for g in gates]
        try:
            for prompt, answer in zip(questions[name], references[name]):
                chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                ids = base.tokenizer(base.tokenizer.apply_chat_template(chat, tokenize=False), return_tensors="pt")
                with torch.no_grad():
                    base.model(**ids)
        finally:
            for hook in hooks:
                hook.remove()
        opened = torch.cat(values)
        out[name] = {"mean": opened.mean().item(), "above_0.5": (opened > 0.5).float().mean().item(),
                     "above_0.1": (opened > 0.1).float().mean().item()}
    return out


def run(subject: tuple[str, str], cache_dir: Path, steps: int) -> dict[str, Any]:
    from workers.engine.config import LayerConfig, TrainConfig
    from workers.engine.data import Example
    from workers.engine.loading import load_base_model
    from workers.engine.neighbours import build_neighbourhood
    from workers.engine.retain import build_retain, greedy_answers
    from workers.engine.unlearn import fuse, served_model, train_request

    base = load_base_model("smollm2-135m-instruct", cache_dir, device="cpu")
    questions = _questions(*subject)
    references = {k: greedy_answers(base.model, base.tokenizer, v, 48) for k, v in questions.items()}
    forget = [Example(prompt=q, answer=a) for q, a in zip(questions["forget"], references["forget"])]
    cache = cache_dir / "retain-cache"
    hood = build_neighbourhood(base.model, base.tokenizer, forget, cache, model_key=base.source_sha256)
    questions["probe"], references["probe"] = [e.prompt for e in hood.probe], [e.answer for e in hood.probe]
    retain = build_retain(None, None, base.model, base.tokenizer, cache, model_key=base.source_sha256,
                          neighbours=hood.train)
    trained = train_request(base, forget, retain, LayerConfig(kind="gated"), TrainConfig(method="eul", steps=steps))
    _, fused = fuse(None, trained, "diagnostic")
    result: dict[str, Any] = {}
    for label, maps in (("trained", trained.maps), ("fused", fused)):
        served = served_model(base, trained.layer_cfg, maps, merge=False)
        try:
            result[label] = {
                "gates": gate_openings(base, served, questions, references),
                "drops": {n: 1 - recall(references[n], greedy_answers(base.model, base.tokenizer, questions[n], 48))
                          for n in SETS},
            }
        finally:
            served.detach()
    return result


def report(subject: str, steps: int, result: dict[str, Any], load: MachineLoad, seconds: float) -> str:
    rows = [[label, name, result[label]["drops"][name], *result[label]["gates"][name].values()]
            for label in result for name in SETS]
    table = markdown_table(["maps", "question set", "drop", "gate mean", "gate > 0.5", "gate > 0.1"], rows)
    return "\n".join([
        f"# Gate diagnostic: {subject}, gated layer, eul, {steps} steps", "",
        f"- command: `python -m benchmarks.gate_diagnostic {shlex.join(sys.argv[1:])}`", f"- machine: {machine_line()}",
        f"- {load.line()}", f"- {fmt(seconds / 60, 1)} min", "", __doc__.split("\n\n")[1].strip(), "", table, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    subject = ("person", "Albert Einstein")
    before, start = load_average(), time.time()
    result = run(subject, args.cache_dir, args.steps)
    load = MachineLoad(before, load_average(), cores())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate_diagnostic.json").write_text(json.dumps({"subject": subject[1], "load": asdict(load), **result},
                                                              indent=1))
    (args.out / "gate_diagnostic.md").write_text(report(subject[1], args.steps, result, load, time.time() - start))


if __name__ == "__main__":
    main()
