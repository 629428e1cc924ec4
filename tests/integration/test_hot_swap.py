"""Hot swap and rollback of the served version, through the live server and the openai SDK, on SQLite and
PostgreSQL with real Redis. A version is published the way the fusion step does (ModelStore file FUSED_MAPS +
manifest, a model_versions row, the active version, a Redis announcement), with a random non-zero layer
standing in for a trained one."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from service.domain.db.models import ModelVersion
from service.domain.db.session import session_scope, write_lock
from service.domain.events import announce_version
from service.domain.repositories import model_versions
from service.domain.settings import Settings
from tests.integration.live_server import LiveServer, create_key, serving
from workers.engine.config import LayerConfig
from workers.engine.layers import create_attached
from workers.engine.loading import load_base_model
from workers.engine.store import FUSED_MAPS, ModelStore

pytestmark = pytest.mark.integration

MODEL = "tiny-random-llama"
PROMPT = "The quick brown fox"


def publish_version(settings: Settings, version: int, kind: str = "bottleneck", seed: int = 1, active: bool = True,
                    announce: bool = True) -> None:
    """Version `version` = the base + a layer of kind `kind` with random (non-identity) weights; made active
    (unless active=False) and announced on Redis (unless announce=False)."""
    base = load_base_model(settings.model, settings.models_dir, device="cpu")
    cfg = LayerConfig(kind=kind)
    attached = create_attached(copy.deepcopy(base.model), cfg, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in attached.trainable_parameters():  # up / lora_B start at zero: make the layer do something
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    maps = attached.map_weights()
    store = ModelStore(settings.store_dir)
    manifest = {"parent_version": version - 1, "base_model": {"name": base.name, "sha256": base.source_sha256},
                "layer": cfg.to_dict(), "request_ids": []}
    path = store.publish(version, {FUSED_MAPS: maps}, manifest)
    with session_scope(settings.db_url) as session:
        write_lock(session)
        model_versions.add_version(session, ModelVersion(
            version=version, parent_version=version - 1, base_model=base.name, base_sha256=base.source_sha256,
            layer_kind=kind, path=str(path), manifest_sha256=store.manifest_sha256(version),
            files=store.manifest(version)["files"], request_ids=[], metrics_summary={},
        ))
        if active:
            model_versions.set_active_version(session, version)
        session.commit()
    if active and announce:
        announce_version(settings, version)


@pytest.fixture
def server(make_settings, db_url: str, redis_url: str) -> Iterator[LiveServer]:
    # a slow poll: a swap within the test's wait comes from the Redis hint
    with serving(make_settings(database_url=db_url, redis_url=redis_url, serving_poll_seconds=30)) as live:
        yield live


@pytest.fixture
def polling_server(make_settings, db_url: str, redis_url: str) -> Iterator[LiveServer]:
    with serving(make_settings(database_url=db_url, redis_url=redis_url, serving_poll_seconds=0.3)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer, db_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=create_key(db_url, "inference"), max_retries=0, timeout=60
    )


def greedy(client: openai.OpenAI) -> tuple[str, str, str]:
    """(text, X-Model-Version header, system_fingerprint) of a greedy completion."""
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    completion = raw.parse()
    return completion.choices[0].text, raw.headers["X-Model-Version"], completion.system_fingerprint


def activate(server: LiveServer, db_url: str, version: int) -> None:
    admin = {"Authorization": f"Bearer {create_key(db_url, 'admin', '*')}"}
    response = httpx.post(f"{server.url}/v1/model-versions/{version}/activate", headers=admin)
    assert response.status_code == 200, response.text


def test_stream_in_flight_finishes_on_the_old_version_and_the_next_request_gets_the_new(server, client):
    base_text, header, fingerprint = greedy(client)
    assert (header, fingerprint) == ("0", "v0")
    with server.holder.compute_lock:  # no token is generated until the swap is done
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        assert stream.response.headers["X-Model-Version"] == "0"  # pinned when the request started
        publish_version(server.app.state.settings, 1)
        server.wait_for_version(1, timeout=15)
    chunks = list(stream)
    assert {c.system_fingerprint for c in chunks} == {"v0"}
    assert "".join(c.choices[0].text for c in chunks) == base_text  # generated after the swap, on the old model
    new_text, header, fingerprint = greedy(client)
    assert (header, fingerprint) == ("1", "v1")
    assert new_text != base_text


def test_rollback_to_version_0_serves_bit_identical_base_outputs(server, client, db_url):
    base_text, _, _ = greedy(client)
    publish_version(server.app.state.settings, 1)
    server.wait_for_version(1, timeout=15)
    assert greedy(client)[0] != base_text
    activate(server, db_url, 0)
    server.wait_for_version(0, timeout=15)
    assert greedy(client) == (base_text, "0", "v0")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "unlearn_model_swaps_total 2.0" in metrics and "unlearn_served_model_version 0.0" in metrics


def test_lora_version_is_served_merged_and_rolls_back(server, client, db_url):
    base_text, _, _ = greedy(client)
    publish_version(server.app.state.settings, 1, kind="lora")
    server.wait_for_version(1, timeout=15)
    served = server.holder.current()
    assert not any("lora" in name for name, _ in served.model.named_modules())  # merged: a plain model
    assert greedy(client)[0] != base_text
    activate(server, db_url, 0)
    server.wait_for_version(0, timeout=15)
    assert greedy(client)[0] == base_text


def test_linear_version_is_served_merged_and_its_export_gives_the_same_greedy_answer(server, client, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from service.cli import app

    base_text, _, _ = greedy(client)
    publish_version(server.app.state.settings, 1, kind="linear")
    server.wait_for_version(1, timeout=15)
    served_text, header, _ = greedy(client)
    assert header == "1" and served_text != base_text
    assert not any("Bottleneck" in type(m).__name__ for m in server.holder.current().model.modules())

    result = CliRunner().invoke(app, ["export", "--version", "1", "--out", str(tmp_path / "v1")])
    assert result.exit_code == 0, result.output
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "v1")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "v1")
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    output = stock.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(output, skip_special_tokens=True) == served_text


def test_a_corrupt_version_is_not_served_and_the_old_one_keeps_answering(server, client, db_url):
    settings = server.app.state.settings
    base_text, _, _ = greedy(client)
    publish_version(settings, 1, active=False)
    layer_file = ModelStore(settings.store_dir).path(1) / f"{FUSED_MAPS}.safetensors"
    data = bytearray(layer_file.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the weights: the sha256 no longer matches the manifest
    layer_file.write_bytes(bytes(data))
    activate(server, db_url, 1)
    answers = []
    deadline = time.monotonic() + 15
    while not server.holder.last_error and time.monotonic() < deadline:
        answers.append(greedy(client))  # requests during the failed swap are answered by version 0
    assert "sha256 mismatch" in (server.holder.last_error or "")
    assert set(answers + [greedy(client)]) == {(base_text, "0", "v0")}
    assert "unlearn_model_swap_failures_total 1.0" in httpx.get(f"{server.url}/metrics").text


def test_a_lost_announcement_only_delays_the_swap_to_the_next_db_poll(polling_server, db_url):
    publish_version(polling_server.app.state.settings, 1, announce=False)
    polling_server.wait_for_version(1, timeout=10)
    client = openai.OpenAI(base_url=f"{polling_server.url}/v1", api_key=create_key(db_url, "inference"), max_retries=0)
    assert greedy(client)[1:] == ("1", "v1")


def test_concurrent_requests_during_a_swap_all_succeed_each_consistent_with_its_version(server, client):
    base_text = greedy(client)[0]
    results: list[tuple[str, str, str]] = []
    errors: list[BaseException] = []

    def keep_asking() -> None:
        try:
            for _ in range(4):
                results.append(greedy(client))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=keep_asking) for _ in range(3)]
    for thread in threads:
        thread.start()
    publish_version(server.app.state.settings, 1)
    for thread in threads:
        thread.join(120)
    server.wait_for_version(1, timeout=15)
    new_text = greedy(client)[0]
    assert errors == []
    assert len(results) == 12
    assert set(results) <= {(base_text, "0", "v0"), (new_text, "1", "v1")}
