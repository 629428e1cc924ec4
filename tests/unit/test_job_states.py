"""The job state machine: which transitions exist, and that an invalid one raises before anything is written."""

from __future__ import annotations

import pytest

from service.domain import job_states
from service.domain.db.models import Job
from service.domain.job_states import ACTIVE, ENDED, TRANSITIONS, InvalidTransition, check_transition


@pytest.mark.parametrize("to_status", ["running", "failed", "cancelled"])
def test_a_queued_job_may_start_fail_or_be_cancelled(to_status):
    check_transition("queued", to_status)


@pytest.mark.parametrize("to_status", ["succeeded", "verifying"])
def test_a_queued_job_cannot_skip_its_work(to_status):
    with pytest.raises(InvalidTransition):
        check_transition("queued", to_status)


@pytest.mark.parametrize("ended", ENDED)
@pytest.mark.parametrize("to_status", ACTIVE + ENDED)
def test_an_ended_job_never_changes_again(ended, to_status):
    with pytest.raises(InvalidTransition):
        check_transition(ended, to_status)


def test_leases_are_taken_over_in_place():
    check_transition("running", "running")
    check_transition("verifying", "verifying")


def test_every_status_is_in_the_table():
    assert set(TRANSITIONS) == set(ACTIVE + ENDED)
    assert all(targets <= set(TRANSITIONS) for targets in TRANSITIONS.values())


def test_an_invalid_ending_raises_a_409_before_writing_anything():
    job = Job(id="j1", request_id="r1", tenant="acme", status="succeeded")
    with pytest.raises(InvalidTransition) as raised:
        job_states.end(None, job, "cancelled")  # type: ignore[arg-type]  (no session: nothing may be written)
    assert raised.value.status_code == 409 and job.status == "succeeded"


@pytest.mark.parametrize("status,outcome", [
    ("succeeded", None), ("failed", "forgotten"), ("cancelled", "not_memorized"), ("succeeded", "maybe"),
])
def test_only_a_succeeded_job_has_an_outcome_and_it_is_a_known_one(status, outcome):
    job = Job(id="j1", request_id="r1", tenant="acme", status="running")
    with pytest.raises(ValueError):
        job_states.end(None, job, status, outcome=outcome)  # type: ignore[arg-type]
    assert job.status == "running"
