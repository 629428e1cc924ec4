"""Before/after bars for a request's evidence page, drawn as inline SVG by the template (no chart library,
no script: the console runs offline under a strict CSP).

Each row is one metric of one evaluation set, e.g. the forget set's answer NLL. Its two bars share one
scale, the larger of the two values, so a row shows the direction and size of the change; rows are not
comparable with each other (NLL and ROUGE-L live on different scales), which is why each row prints its
numbers beside the bars.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# what a privacy officer reads first: did the forget set become unlikely and unreproduced, and what did the
# rest (kept items, the neighbourhood of similar facts, general text) lose
CHARTED = (
    ("forget", "nll", "forget set: answer NLL (higher = forgotten)"),
    ("forget", "rougeL", "forget set: ROUGE-L of greedy answers (lower = forgotten)"),
    ("neighbours", "nll", "neighbourhood: NLL (should stay)"),
    ("neighbours", "rougeL", "neighbourhood: ROUGE-L (should stay)"),
    ("retain", "nll", "kept items: NLL (should stay)"),
    ("general", "ppl", "general text: perplexity (should stay)"),
)


@dataclass(frozen=True)
class BeforeAfterBar:
    label: str
    before: float
    after: float
    before_width: float  # fraction of the row's width, 0..1
    after_width: float


def before_after_bars(metric_rows: Iterable[Mapping[str, Any]]) -> list[BeforeAfterBar]:
    """The CHARTED metrics that have both numbers, in CHARTED's order."""
    found = {(r["section"], r["metric"]): r for r in metric_rows
             if r.get("before") is not None and r.get("after") is not None}
    bars = []
    for section, metric, label in CHARTED:
        row = found.get((section, metric))
        if row is None:
            continue
        before, after = float(row["before"]), float(row["after"])
        scale = max(abs(before), abs(after)) or 1.0
        bars.append(BeforeAfterBar(label, before, after, abs(before) / scale, abs(after) / scale))
    return bars
