"""Does the quantized model still forget? The verdict's forget checks on the model as its GGUF export holds
it (engine/quantized.py: every matmul rounded to 4 or 8 bits per weight).

Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization" (arXiv 2410.16454): unlearning
that moves weights by less than a quantization step is undone by rounding, and most forgotten knowledge comes
back after 4-bit quantization. A version whose quantized copy remembers is reported as such (and fails, where
the operator requires it).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def quantized_forget(model: nn.Module, tokenizer: Any, forget: list[Any], before_forget: dict[str, Any],
                     thresholds: Any, quant: str) -> dict[str, Any]:
    """{"format", "forget" (nll, rougeL), "forgotten", "checks", "reasons"}: forget NLL ratio and ROUGE-L of
    `model` quantized with `quant`, against the forget metrics before unlearning and the request's thresholds."""
    from ..quantized import quantized_copy
    from .suite import evaluate_forget
    from .verdict import judge

    after = evaluate_forget(quantized_copy(model, quant), tokenizer, forget)
    verdict = judge({"forget": before_forget}, {"forget": after}, thresholds)
    return {"format": quant, "forget": {k: after[k] for k in ("nll", "rougeL") if k in after},
            "forgotten": verdict.passed, "checks": verdict.checks, "reasons": verdict.reasons}
