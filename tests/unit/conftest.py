"""Fixtures shared by the layer tests."""

from __future__ import annotations

import pytest
import torch

from workers.engine.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, padded: adapters must act on real tokens and ignore padding."""
    return tiny_tokenizer()(["The capital of Australia is", "Hi"], return_tensors="pt", padding=True)
