"""Training progress -> the job row (throttled), lease renewal, cancellation checks, audit milestones."""

from __future__ import annotations

import threading
import time
from typing import Self

import structlog

from service.domain.repositories import audit, jobs
from workers.context import WorkerContext

MILESTONES = (0.25, 0.5, 0.75)
log = structlog.get_logger("unlearn.worker")


class LeaseLost(RuntimeError):
    """Another worker owns the job now (our lease expired): stop without writing anything."""


class JobProgress:
    def __init__(self, ctx: WorkerContext, job_id: str, tenant: str, request_id: str):
        self.ctx, self.job_id, self.tenant, self.request_id = ctx, job_id, tenant, request_id
        self._last_write = 0.0
        self._milestones_done: set[float] = set()
        self._cancelled = False

    def on_progress(self, progress) -> None:
        now = time.monotonic()
        fraction = progress.step / max(progress.total, 1)
        milestone = next((m for m in MILESTONES if fraction >= m and m not in self._milestones_done), None)
        last_step = progress.step >= progress.total
        if not (milestone or last_step or now - self._last_write >= self.ctx.settings.progress_interval_seconds):
            return
        self._last_write = now
        with self.ctx.session() as session:
            owned = jobs.renew_lease(
                session, self.job_id, self.ctx.owner, self.ctx.settings.job_lease_seconds,
                progress_step=progress.step, progress_total=progress.total,
                progress_loss=float(progress.loss), eta_seconds=float(progress.eta_seconds),
            )
            if not owned:
                session.rollback()
                raise LeaseLost(self.job_id)
            if milestone is not None:
                self._milestones_done.add(milestone)
                audit.append_event(
                    session, "job.progress",
                    {"job_id": self.job_id, "request_id": self.request_id, "fraction": milestone,
                     "step": progress.step, "total": progress.total, "loss": round(float(progress.loss), 6)},
                    tenant=self.tenant, request_id=self.request_id,
                )
            self._cancelled = jobs.is_cancel_requested(session, self.job_id)
            session.commit()

    def should_stop(self) -> bool:
        return self._cancelled


class LeaseHeartbeat:
    """Renews the job lease from a background thread every UNLEARN_LEASE_RENEW_SECONDS while a step runs. Steps that
    report no progress (loading the model, fusion, verification) can outlast the lease; without this the
    sweeper would take such a job for lost and hand it to a second worker while the first is still on it.
    A killed worker's heartbeat dies with it, so its lease still expires."""

    def __init__(self, ctx: WorkerContext, job_id: str):
        self.ctx, self.job_id = ctx, job_id
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        every = self.ctx.settings.lease_renew_seconds
        while not self._stop.wait(every):
            try:
                with self.ctx.session() as session:
                    owned = jobs.renew_lease(session, self.job_id, self.ctx.owner, self.ctx.settings.job_lease_seconds)
                    session.commit()
            except Exception as exc:  # noqa: BLE001  (a db hiccup: try again next beat)
                log.warning("lease.renew_failed", job_id=self.job_id, error=f"{type(exc).__name__}: {exc}")
                continue
            if not owned:  # ended, handed over, or taken over: the step's own lease checks decide what to do
                self.lost = True
                return
