"""TOFU subsets of whole authors and the two reference models fine-tuned on them (target, retain).

TOFU (Maini et al. 2024): 200 fictitious authors x 20 QA. Forget authors come from forget10 task "1"
(the standard split), retain authors from retain_perturbed (the retain authors TOFU evaluates, all with
paraphrased and perturbed answers, and all inside retain90); utility also uses real_authors and
world_facts. The target model is fine-tuned on forget + retain authors, the retain model on the retain
authors only (the gold standard: a model that never saw the forget authors). Both are cached under
cache_dir/tofu/ keyed by base weights, data and recipe, so reruns skip the fine-tunes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engine.batching import collate, encode, index_batches, pad_id
from workers.engine.data import Example, parse_example
from workers.engine.loading import LoadedModel, build_cache, load_base_model

QA_PER_AUTHOR = 20
Row = dict[str, Any]


@dataclass
class TofuSubset:
    forget_authors: list[list[Row]]  # K authors, 20 rows each (with paraphrased/perturbed answers)
    retain: list[Row]  # (N - K) authors
    real_authors: list[Row]
    world_facts: list[Row]

    @property
    def forget(self) -> list[Row]:
        return [row for author in self.forget_authors for row in author]


def read_rows(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def by_author(rows: Sequence[Row]) -> list[list[Row]]:
    """TOFU rows come author by author, 20 consecutive QA each."""
    return [list(rows[i:i + QA_PER_AUTHOR]) for i in range(0, len(rows) - QA_PER_AUTHOR + 1, QA_PER_AUTHOR)]


def load_subset(data_dir: Path, n_authors: int, k_forget: int, eval_items: int = 20) -> TofuSubset:
    """The first k forget10 (task 1) authors to forget and the first n - k retain_perturbed authors to
    keep; eval_items rows each of real_authors and world_facts for general utility."""
    if not 1 <= k_forget < n_authors:
        raise ValueError(f"need 1 <= forget authors ({k_forget}) < authors ({n_authors})")
    forget_rows = [r for r in read_rows(data_dir / "forget10_perturbed.jsonl") if str(r.get("task_id", "1")) == "1"]
    forget_authors = by_author(forget_rows)[:k_forget]
    retain_authors = by_author(read_rows(data_dir / "retain_perturbed.jsonl"))[: n_authors - k_forget]
    if len(forget_authors) < k_forget or len(retain_authors) < n_authors - k_forget:
        raise ValueError(f"not enough TOFU authors in {data_dir} for {n_authors} / {k_forget}")
    return TofuSubset(
        forget_authors=forget_authors,
        retain=[row for author in retain_authors for row in author],
        real_authors=read_rows(data_dir / "real_authors_perturbed.jsonl")[:eval_items],
        world_facts=read_rows(data_dir / "world_facts_perturbed.jsonl")[:eval_items],
    )


def examples(rows: Sequence[Row]) -> list[Example]:
    return [parse_example({"question": r["question"], "answer": r["answer"]}) for r in rows]


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tune of every base weight (as TOFU does), AdamW, linear warm-up then constant."""

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 160
    seed: int = 0
    warmup_steps: int = 2

    def steps_for(self, n_examples: int) -> int:
        return self.epochs * math.ceil(n_examples / self.batch_size)


def finetune(model: torch.nn.Module, tokenizer, items: Sequence[Example], cfg: FinetuneConfig,
             on_step: Callable[[int, int, float], None] | None = None, max_steps: int | None = None) -> float:
    """Train all of model's weights on items (answer tokens only); returns seconds. max_steps cuts the
    run short (the cost benchmark times a few steps); the model is left in eval mode, frozen."""
    encoded, pad = encode(tokenizer, items, cfg.max_length), pad_id(tokenizer)
    total = cfg.steps_for(len(items)) if max_steps is None else min(max_steps, cfg.steps_for(len(items)))
    params = [p for p in model.parameters()]
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    device = next(model.parameters()).device
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        order = index_batches(len(encoded), cfg.batch_size, total, cfg.seed)
        for step, indices in enumerate(order, start=1):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in indices], pad).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(step, total, float(loss.detach()))
    model.requires_grad_(False).eval()
    return time.perf_counter() - started


def recipe_key(base: LoadedModel, items: Sequence[Example], cfg: FinetuneConfig) -> str:
    recipe = {"base": base.source_sha256, "cfg": asdict(cfg), "items": [e.to_dict() for e in items]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def finetuned_model(base_name: str, cache_dir: Path, label: str, items: Sequence[Example], cfg: FinetuneConfig,
                    device: str, on_step: Callable[[int, int, float], None] | None = None
                    ) -> tuple[LoadedModel, float]:
    """(the fine-tuned model loaded like any base, seconds spent fine-tuning: 0.0 when cached)."""
    base = load_base_model(base_name, cache_dir, device=device)
    tokenizer, key = base.tokenizer, recipe_key(base, items, cfg)
    del base  # one copy of the weights at a time
    name = f"tofu-{label}-{key}"
    seconds = 0.0
    if not (cache_dir / "tofu" / name / "source.json").exists():
        def build(tmp: Path) -> dict[str, Any]:
            nonlocal seconds
            model = load_base_model(base_name, cache_dir, device=device, dtype=torch.float32).model
            seconds = finetune(model, tokenizer, items, cfg, on_step)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            return {"source": f"{base_name} fine-tuned on {len(items)} TOFU QA ({label})",
                    "source_sha256": key, "finetune_seconds": seconds}

        (cache_dir / "tofu").mkdir(parents=True, exist_ok=True)
        build_cache(cache_dir / "tofu", name, build)
    loaded = load_base_model(str(cache_dir / "tofu" / name), cache_dir, device=device)
    return loaded, seconds
