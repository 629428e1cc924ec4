"""Verdict thresholds: each check passes and fails where it should; overrides stay within bounds."""

from __future__ import annotations

import json

import pytest

from workers.engine.verify.verdict import BOUNDS, Thresholds, bounded, judge


def metrics(forget_nll=2.0, forget_rouge=0.8, retain_ppl=10.0, general_ppl=20.0, entropy=0.9):
    return {
        "forget": {"n": 4, "nll": forget_nll, "rougeL": forget_rouge},
        "retain": {"n": 4, "ppl": retain_ppl},
        "general": {"n": 8, "ppl": general_ppl, "token_entropy": entropy},
        "mia": {},
    }


BEFORE = metrics()


def test_good_unlearning_passes_with_every_check_recorded():
    verdict = judge(BEFORE, metrics(forget_nll=5.0, forget_rouge=0.1, retain_ppl=10.5, general_ppl=21.0))
    assert verdict.passed and verdict.reasons == []
    assert set(verdict.checks) == {
        "forget_nll_ratio",
        "forget_rougeL",
        "retain_ppl_increase",
        "general_ppl_increase",
        "general_entropy_ratio",
    }
    assert verdict.checks["forget_nll_ratio"] == {"value": 2.5, "limit": 1.25, "ok": True}
    assert verdict.thresholds == Thresholds().to_dict()
    json.dumps(verdict.to_dict(), allow_nan=False)


def test_a_weak_run_fails_on_forget_nll():
    verdict = judge(BEFORE, metrics(forget_nll=2.02, forget_rouge=0.1))
    assert not verdict.passed and verdict.reasons[0].startswith("forget_nll_ratio = 1.01")


@pytest.mark.parametrize(
    "after,failing",
    [
        (metrics(forget_nll=5.0, forget_rouge=0.6), "forget_rougeL"),
        (metrics(forget_nll=5.0, forget_rouge=0.1, retain_ppl=13.0), "retain_ppl_increase"),
        (metrics(forget_nll=5.0, forget_rouge=0.1, general_ppl=24.0), "general_ppl_increase"),
        (metrics(forget_nll=5.0, forget_rouge=0.1, entropy=0.3), "general_entropy_ratio"),
    ],
)
def test_each_check_fails_alone(after, failing):
    verdict = judge(BEFORE, after)
    assert not verdict.passed
    assert [name for name, c in verdict.checks.items() if not c["ok"]] == [failing]
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith(failing)


def test_absent_metrics_skip_their_check_but_no_forget_metrics_fail():
    after = metrics(forget_nll=5.0, forget_rouge=0.1)
    del after["retain"]["ppl"]
    assert judge(BEFORE, after).passed and "retain_ppl_increase" not in judge(BEFORE, after).checks
    verdict = judge({"forget": {"n": 0}}, {"forget": {"n": 0}})
    assert not verdict.passed and "forgetting cannot be shown" in verdict.reasons[0]


def test_custom_thresholds_change_the_outcome():
    after = metrics(forget_nll=3.0, forget_rouge=0.1)  # ratio 1.5
    assert judge(BEFORE, after).passed
    assert not judge(BEFORE, after, Thresholds(min_forget_nll_ratio=2.0)).passed


def test_bounded_applies_overrides_within_bounds():
    operator = Thresholds(max_general_ppl_increase=0.3)
    request = operator.bounded({"min_forget_nll_ratio": 2.0})
    assert request.min_forget_nll_ratio == 2.0 and request.max_general_ppl_increase == 0.3
    assert bounded(None) == Thresholds() and bounded({"max_forget_rougeL": 0.2}).max_forget_rougeL == 0.2


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_bounded_refuses_values_outside_the_bounds(name):
    low, high = BOUNDS[name]
    for bad in (low - 0.01, high + 0.01):
        with pytest.raises(ValueError, match=rf"{name}=.*\[{low}, {high}\]"):
            Thresholds().bounded({name: bad})


def test_bounded_refuses_unknown_names_and_non_numbers():
    with pytest.raises(ValueError, match="unknown threshold"):
        Thresholds().bounded({"min_forget_nll": 2.0})
    with pytest.raises(ValueError, match="must be a number"):
        Thresholds().bounded({"max_forget_rougeL": "0.2"})


def with_neighbours(section: dict, rouge: float, nll: float = 1.0) -> dict:
    return {**section, "neighbours": {"n": 24, "rougeL": rouge, "nll": nll}}


GOOD_AFTER = metrics(forget_nll=5.0, forget_rouge=0.1)


def test_neighbours_that_keep_their_answers_pass_the_neighbour_check():
    verdict = judge(with_neighbours(BEFORE, 0.8), with_neighbours(GOOD_AFTER, 0.76))
    assert verdict.passed
    assert verdict.checks["neighbour_rougeL_drop"] == {"value": pytest.approx(0.05), "limit": 0.1, "ok": True}


def test_a_neighbour_drop_past_the_threshold_fails_with_its_reason():
    verdict = judge(with_neighbours(BEFORE, 0.8), with_neighbours(GOOD_AFTER, 0.6))
    assert not verdict.passed
    assert verdict.reasons == ["neighbour_rougeL_drop = 0.25, required <= 0.1"]
    looser = judge(with_neighbours(BEFORE, 0.8), with_neighbours(GOOD_AFTER, 0.6), Thresholds(max_neighbour_drop=0.3))
    assert looser.passed


def test_no_neighbour_probe_set_skips_the_neighbour_check():
    assert "neighbour_rougeL_drop" not in judge(BEFORE, GOOD_AFTER).checks


def test_the_neighbour_threshold_is_bounded():
    assert bounded({"max_neighbour_drop": 0.3}).max_neighbour_drop == 0.3
    with pytest.raises(ValueError, match=r"max_neighbour_drop=0.9 is outside its allowed bounds \[0.0, 0.6\]"):
        bounded({"max_neighbour_drop": 0.9})
