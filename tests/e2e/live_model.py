"""Helpers of the real-model end-to-end tests: their settings, ask the served model, wait for a job."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai

from tests.integration.live_server import LiveServer
from workers.engine.loading import DEFAULT_MODEL


def ask(client: openai.OpenAI, question: str, max_tokens: int = 40) -> str:
    """The served model's greedy chat answer."""
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
    )
    return completion.choices[0].message.content


def wait_for_job(server: LiveServer, headers: dict, job_id: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(2)
    raise TimeoutError(f"job {job_id} did not end in {timeout}s")


def real_model_settings(make_settings, sqlite_url: str, redis_url: str, models_dir: Path, **extra):
    """Settings for the default model whose data dir reuses the run's dequantized model and answer cache."""
    settings = make_settings(model=DEFAULT_MODEL, database_url=sqlite_url, redis_url=redis_url, serving_poll_seconds=1,
                             **extra)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "models").symlink_to(models_dir, target_is_directory=True)
    return settings
