"""Fixtures of the real-model end-to-end tests: one dequantized default model per run, the live server with
the model served, and a real `unlearn worker` process. Each module brings its own `settings` fixture."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.live_server import LiveServer, create_key, serving, worker_process


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dequantized model (~20 s to build) and the base model's cached answers, shared by every module;
    set UNLEARN_TEST_MODELS_DIR to reuse them across runs."""
    shared = os.environ.get("UNLEARN_TEST_MODELS_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("models")


@pytest.fixture
def server(settings) -> Iterator[LiveServer]:
    with serving(settings) as live:
        yield live


@pytest.fixture
def worker(server: LiveServer, tmp_path: Path) -> Iterator[subprocess.Popen]:
    with worker_process(tmp_path / "worker.log") as process:
        yield process


@pytest.fixture
def client(server: LiveServer, sqlite_url: str) -> openai.OpenAI:
    """The openai SDK pointed at the live server with an inference key."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=create_key(sqlite_url, "inference"), max_retries=0,
                         timeout=120)

