"""Relearning probe: forgotten answers that come back are measured; the caller's model is untouched."""

from __future__ import annotations

import torch

from tests.unit.verify_fakes import tokenizer_and_model
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify.relearn import relearn_probe
from workers.engine.verify.suite import EvalConfig

FORGET = [{"text": "abcabcabcabcabc"}, {"text": "abcabcabcabc"}, {"text": "bcabcabcab"}, {"text": "cabcabca"}]
CFG = EvalConfig(max_new_tokens=8)


class Attached:
    """Stands in for an attached unlearning layer."""

    def __init__(self, params):
        self.params = params

    def trainable_parameters(self):
        return self.params


def test_fine_tuning_on_part_of_the_forget_set_brings_the_rest_back():
    tok, model = tokenizer_and_model()
    result = relearn_probe(model, tok, [model.table], FORGET, steps=5, lr=0.5, cfg=CFG)
    assert (result["n_train"], result["n_eval"], result["held_out"]) == (2, 2, True)
    assert result["nll_drop"] > 1.0 and result["after"]["nll"] < result["before"]["nll"]


def test_the_callers_parameters_flags_and_grads_are_restored():
    tok, model = tokenizer_and_model()
    model.table.requires_grad_(False)
    original = model.table.detach().clone()
    relearn_probe(model, tok, Attached([model.table]), FORGET, steps=3, lr=0.5, cfg=CFG)
    assert torch.equal(model.table, original)
    assert not model.table.requires_grad and model.table.grad is None


def test_without_trainable_params_a_copy_of_the_model_is_trained():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = relearn_probe(model, tok, None, FORGET, steps=2, lr=1e-3, cfg=CFG)
    assert result["nll_drop"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_single_item_is_trained_and_measured_on_itself():
    tok, model = tokenizer_and_model()
    result = relearn_probe(model, tok, [model.table], FORGET[:1], steps=1, lr=0.1, cfg=CFG)
    assert (result["n_train"], result["n_eval"], result["held_out"]) == (1, 1, False)
