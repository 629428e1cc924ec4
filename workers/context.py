"""What a task needs from the outside world, built once per worker child process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property

from celery import Celery
from sqlalchemy.orm import Session

from service.domain.audit.digest import load_or_create_hmac_key
from service.domain.db.session import get_sessionmaker
from service.domain.sealing import fusion_state_sealer
from service.domain.settings import Settings, get_settings


@dataclass
class WorkerContext:
    settings: Settings
    celery: Celery

    @property
    def owner(self) -> str:
        """Lease owner id: host:pid of the process running the task."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def session(self) -> Session:
        return get_sessionmaker(self.settings.db_url)()

    @cached_property
    def hmac_key(self) -> bytes:
        return load_or_create_hmac_key(self.settings.data_dir, self.settings.hmac_key)

    @cached_property
    def store(self):
        """The model store; the fusion state of every version it writes is sealed under the service's key."""
        from workers.engine.store import ModelStore

        return ModelStore(self.settings.store_dir, sealer=fusion_state_sealer(self.settings.data_dir))

    @cached_property
    def base(self):
        """The frozen base model, loaded inside the task (CUDA is first touched here, never in the parent)."""
        from workers.engine.loading import load_base_model

        return load_base_model(self.settings.model, self.settings.models_dir, device=self.settings.device)

    @property
    def answer_cache_dir(self):
        """Where the base model's answers to built-in and operator questions are cached (retain.py)."""
        return self.settings.models_dir / "retain-cache"

    def neighbourhood(self, forget):
        """The request's neighbourhood (engine neighbours.py): the same call in training (its `train` part
        joins the retain set) and in verification (its `probe` part is the neighbour check), answered by
        the base model; cached answers make the second call cheap."""
        from workers.engine.neighbours import Neighbourhood, build_neighbourhood

        if not self.settings.neighbourhood:
            return Neighbourhood("off", [], [])
        return build_neighbourhood(self.base.model, self.base.tokenizer, forget, self.answer_cache_dir,
                                   model_key=self.base.source_sha256)


def make_context(celery: Celery) -> WorkerContext:
    return WorkerContext(settings=get_settings(), celery=celery)
