"""Min-K%, Min-K%++, AUC and PrivLeak on hand-made scores with known answers."""

from __future__ import annotations

import pytest
import torch

from tests.unit.verify_fakes import tokenizer_and_model
from workers.engine.verify.mia import auc, item_scores, mia_aucs, min_k_plus_plus_score, min_k_score, privleak
from workers.engine.verify.scoring import EvalItem, score_items, text_ids


def test_min_k_is_the_mean_of_the_lowest_k_fraction():
    logprobs = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert min_k_score(logprobs, k=0.4) == pytest.approx(-4.5)
    assert min_k_score(logprobs, k=0.1) == pytest.approx(-5.0)  # at least one token
    assert min_k_score(logprobs, k=1.0) == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        min_k_score(logprobs, k=0.0)


def test_min_k_plus_plus_standardises_by_the_vocabulary_moments():
    logprobs, mu, sigma = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5]), torch.tensor([0.5, 0.25])
    # z = [(-1 + 1.5) / 0.5, (-2 + 1.5) / 0.25] = [1, -2]
    assert min_k_plus_plus_score(logprobs, mu, sigma, k=0.5) == pytest.approx(-2.0)
    assert min_k_plus_plus_score(logprobs, mu, sigma, k=1.0) == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "members,nonmembers,expected",
    [
        ([5.0, 6.0, 7.0], [1.0, 2.0], 1.0),  # perfectly separated
        ([1.0, 2.0], [5.0, 6.0, 7.0], 0.0),  # perfectly separated, the other way
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0.5),  # identical
        ([3.0, 1.0], [2.0, 0.0], 0.75),  # 3 of 4 pairs ordered
        ([1.0], [1.0], 0.5),  # a tie counts one half
    ],
)
def test_auc_is_the_probability_a_member_outscores_a_nonmember(members, nonmembers, expected):
    assert auc(members, nonmembers) == pytest.approx(expected)


def test_privleak_is_relative_auc_change_to_the_reference():
    assert privleak(0.6, 0.8) == pytest.approx(-0.25)
    assert privleak(0.8, 0.8) == 0.0
    assert privleak(0.9, 0.6) == pytest.approx(0.5)


def test_memorised_items_are_perfectly_separated_by_every_attack():
    tok, model = tokenizer_and_model()
    members = [EvalItem(text="abcdefg"), EvalItem(text="hijklmn")]
    holdout = [EvalItem(text="opqrstu"), EvalItem(text="vwxyz01")]
    for item in members:
        model.memorise(text_ids(tok, item.text)[1:])  # leave the BOS row uniform: shared by both sets
    forget_scores = score_items(model, tok, members, moments=True)
    holdout_scores = score_items(model, tok, holdout, moments=True)
    assert mia_aucs(forget_scores, holdout_scores) == {"auc_loss": 1.0, "auc_min_k": 1.0, "auc_min_k_pp": 1.0}


def test_identical_sets_give_auc_one_half():
    tok, model = tokenizer_and_model()
    items = [EvalItem(text="same text"), EvalItem(text="other text")]
    scores = score_items(model, tok, items, moments=True)
    assert set(mia_aucs(scores, scores).values()) == {0.5}


def test_min_k_plus_plus_needs_moments_and_empty_sides_give_nothing():
    tok, model = tokenizer_and_model()
    scores = score_items(model, tok, [EvalItem(text="abc")], moments=False)
    assert set(item_scores(scores)) == {"loss", "min_k"}
    assert mia_aucs(scores, []) == {}
