"""The served model of an API process: the ACTIVE version from the database, swapped without stopping.

- Truth: a poll of the database every `serving_poll_seconds`. Hint: a Redis pub/sub message on
  serving_events.CHANNEL wakes the poll at once (a lost message only delays the swap to the next poll).
- A version loads off the event loop (the poll thread): version 0 is the base model itself; version N is a
  copy of the base plus version N's fused layer from the ModelStore (workers.engine.versions: load_version
  checks the manifest's sha256 against the database row, every file's sha256 against the manifest and the
  base's sha256 against the manifest's; build_serving_model is the same builder verification measured).
  A bottleneck layer lives in forward hooks on its own copy; a LoRA layer is merged into its copy's
  weights. The base object never gets hooks, so it stays version 0.
- Swap = one reference assignment. A request takes `current()` once and keeps that ServedModel to the end,
  so in-flight generations finish on the old model while new ones get the new one. Each ServedModel has
  its own batch scheduler (scheduler.py): the old one drains while the new one fills.
- A version that fails to load (corrupt, wrong base) is retried only after RETRY_FAILED_SECONDS (or when
  the active version changes); meanwhile the old one keeps serving. With nothing loaded yet the process is
  not ready (503): it never falls back to the base model, which would serve data a fused version removed.
- The pending-request guard (guard.py) is refreshed on the same poll.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from service.api.serving import generation
from service.api.serving.guard import GuardIndex, guarded_texts
from service.api.serving.metrics import ServingMetrics
from service.api.serving.scheduler import BatchScheduler, Prompt, SubmitCallbacks
from service.domain.db.session import session_scope
from service.domain.events import CHANNEL
from service.domain.repositories import deletion_requests, model_versions
from service.domain.settings import Settings

log = structlog.get_logger("unlearn.serving")
RETRY_FAILED_SECONDS = 60.0


@dataclass(frozen=True)
class ServedModel:
    version: int
    name: str  # the OpenAI model id: the base model's name
    model: Any  # torch.nn.Module, eval mode
    tokenizer: Any
    context_length: int
    loaded_at: float
    scheduler: BatchScheduler

    @property
    def fingerprint(self) -> str:
        return f"v{self.version}"


@dataclass(frozen=True)
class DbSnapshot:
    pending: dict[str, list[str]]  # request id -> guarded texts
    active: int
    manifest_sha256: str | None  # of the active version's row (None for version 0)


class ModelHolder:
    def __init__(self, settings: Settings, metrics: ServingMetrics) -> None:
        from workers.engine.store import ModelStore

        self.settings, self.metrics = settings, metrics
        self.store = ModelStore(settings.store_dir)
        self.compute_lock = threading.Lock()  # one forward pass at a time (every version's scheduler)
        self._served: ServedModel | None = None
        self._guard = GuardIndex.build(settings.guard_ngram, {})
        self._guard_items: dict[str, list[str]] = {}  # plaintext, in memory only: never logged
        self._base: Any = None  # workers.engine.loading.LoadedModel, loaded once
        self._failed: tuple[int, str | None] | None = None  # (version, manifest sha) that failed to load
        self._failed_at = 0.0
        self._stop, self._wake = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_error: str | None = None

    # -- what requests use ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._served is not None

    def current(self) -> ServedModel | None:
        return self._served

    @property
    def guard(self) -> GuardIndex:
        return self._guard

    @property
    def model_name(self) -> str:
        return self.settings.model

    def submit(self, served: ServedModel, prompts: list[Prompt], params: generation.SamplingParams,
               callbacks: SubmitCallbacks) -> None:
        """Queue a generation on `served`'s batch, guarded against the requests pending now. Never blocks;
        raises ServerBusy (429) when the queue is full."""
        served.scheduler.submit(prompts, params, self._guard, callbacks)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._poll_loop, "serving-poll"), (self._listen, "serving-hints")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def wake(self) -> None:
        """Check the database now instead of at the next poll."""
        self._wake.set()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - a failed poll is retried at the next one
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("serving.poll_failed", error=self.last_error)
            self._wake.wait(self.settings.serving_poll_seconds)
            self._wake.clear()

    def _listen(self) -> None:
        """Redis pub/sub hints: wake the poll. Reconnects after a broker restart."""
        from service.domain.broker import configured_redis_url

        url = configured_redis_url(self.settings)
        while url and not self._stop.is_set():
            try:
                pubsub = redis.Redis.from_url(url, socket_timeout=5).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
                pubsub.close()
            except Exception as exc:  # noqa: BLE001 - broker down or restarting: the db poll still works
                log.warning("serving.hints_unavailable", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(2.0)

    # -- one poll -------------------------------------------------------------------------------

    def sync(self) -> None:
        """Serve the active version, then refresh the guard from the same snapshot."""
        snapshot = self.read_db()
        served = self._served
        if served is None or served.version != snapshot.active:
            failed_before = self._failed == (snapshot.active, snapshot.manifest_sha256)
            if not failed_before or time.monotonic() - self._failed_at > RETRY_FAILED_SECONDS:
                self._swap_to(snapshot)
        self._refresh_guard(snapshot)

    def read_db(self) -> DbSnapshot:
        """Pending payloads are read BEFORE the active version: under READ COMMITTED a job that finishes
        between the two reads then still counts as pending (the guard stays on one poll longer), never the
        other way round (guard off while its version is not served yet)."""
        with session_scope(self.settings.db_url) as session:
            pending = {p.request_id: [t for row in p.forget for t in guarded_texts(row)]
                       for p in deletion_requests.pending_payloads(session)}
            active = model_versions.active_version(session)
            row = model_versions.get_version(session, active) if active else None
            if active and row is None:
                raise LookupError(f"active version {active} has no row in model_versions")
            return DbSnapshot(pending, active, row.manifest_sha256 if row else None)

    def _swap_to(self, snapshot: DbSnapshot) -> None:
        started = time.monotonic()
        try:
            new = self.load(snapshot.active, snapshot.manifest_sha256)
        except Exception as exc:  # noqa: BLE001 - keep serving the old version
            self._failed, self._failed_at = (snapshot.active, snapshot.manifest_sha256), time.monotonic()
            self.last_error = f"version {snapshot.active}: {type(exc).__name__}: {exc}"
            self.metrics.swap_failures.inc()
            log.error("serving.load_failed", version=snapshot.active, error=self.last_error)
            return
        previous, self._served, self._failed = self._served, new, None
        self.metrics.load_seconds.observe(time.monotonic() - started)
        self.metrics.served_version.set(new.version)
        if previous is not None:
            self.metrics.swaps.inc()
        log.info("serving.swapped", version=new.version, previous=previous.version if previous else None,
                 seconds=round(time.monotonic() - started, 3))

    def _refresh_guard(self, snapshot: DbSnapshot) -> None:
        """Guard = pending requests; while the active version is not served here, also keep what was guarded
        (a finished job's payload is gone from the db, but its fused version is not serving yet)."""
        pending = dict(snapshot.pending)
        served = self._served
        if served is None or served.version != snapshot.active:
            pending = {**self._guard_items, **pending}
        if set(pending) != set(self._guard.request_ids):
            self._guard = GuardIndex.build(self.settings.guard_ngram, pending)
            self._guard_items = pending
            self.metrics.guard_pending_requests.set(len(pending))

    # -- loading --------------------------------------------------------------------------------

    def base(self) -> Any:
        if self._base is None:
            from workers.engine.loading import load_base_model

            settings = self.settings
            self._base = load_base_model(settings.model, settings.models_dir, device=settings.device)
        return self._base

    def load(self, version: int, manifest_sha256: str | None) -> ServedModel:
        from workers.engine.versions import build_serving_model, load_version

        base = self.base()
        if version == 0:
            model = base.model
        else:
            stored = load_version(self.store, version, base.source_sha256, manifest_sha256)
            model = build_serving_model(base.model, stored.layer, stored.fused_maps)
        context = generation.context_length(model)
        scheduler = BatchScheduler(model, base.tokenizer, self.compute_lock, max_batch=self.settings.serving_max_batch,
                                   max_queue=self.settings.serving_max_queue, metrics=self.metrics)
        return ServedModel(version, base.name, model, base.tokenizer, context, time.time(), scheduler)
