"""Every round: re-enqueue jobs whose message may be lost: a running job whose lease expired (worker died
without the broker redelivering), a trained job whose fusion message vanished, a queued job left waiting
(broker restarted without persistence, or enqueue failed after commit). A duplicate message is harmless:
the job lease turns it into a no-op. Then shred the sealed probes whose retention window ended."""

from __future__ import annotations

import threading
from datetime import timedelta

import structlog
from celery import Celery

from service.domain.db.models import utcnow
from service.domain.db.session import session_scope, write_lock
from service.domain.probes import shred_expired
from service.domain.queue import enqueue_fusion, enqueue_training, enqueue_withdrawal
from service.domain.repositories import jobs
from service.domain.repositories.probes import expired_probes
from service.domain.settings import Settings

log = structlog.get_logger("unlearn.sweeper")


def sweep_once(settings: Settings, celery: Celery, queued_grace_seconds: float) -> list[str]:
    with session_scope(settings.db_url) as session:
        stale = jobs.expired_jobs(session, queued_older_than=utcnow() - timedelta(seconds=queued_grace_seconds))
        for job in stale:
            job.updated_at = utcnow()  # space re-enqueues of a job still waiting in a long queue
        session.commit()
        targets = [(j.id, j.kind, j.stage) for j in stale]
    for job_id, kind, stage in targets:
        if kind == "withdraw":
            enqueue_withdrawal(celery, job_id)
        elif stage in ("trained", "fusing"):
            enqueue_fusion(celery, job_id)
        else:
            enqueue_training(celery, job_id)
        log.info("job.reenqueued", job_id=job_id, stage=stage)
    return [job_id for job_id, _, _ in targets]


def shred_once(settings: Settings) -> list[str]:
    """Crypto-shred the sealed probes whose retention window ended (service/domain/probes.py)."""
    with session_scope(settings.db_url) as session:
        if not expired_probes(session, utcnow()):
            return []  # the common case: no write lock taken
    with session_scope(settings.db_url) as session:
        write_lock(session)
        shredded = shred_expired(session, settings)
        session.commit()
    for request_id in shredded:
        log.info("probes.shredded", request_id=request_id)
    return shredded


class Sweeper:
    def __init__(self, settings: Settings, celery: Celery, interval: float, queued_grace_seconds: float):
        self.settings, self.celery = settings, celery
        self.interval, self.queued_grace_seconds = interval, queued_grace_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sweep_once(self.settings, self.celery, self.queued_grace_seconds)
                shred_once(self.settings)
            except Exception as exc:  # noqa: BLE001  (a db or broker hiccup: try again next round)
                log.warning("sweep.failed", error=f"{type(exc).__name__}: {exc}")
