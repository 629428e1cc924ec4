"""Inference limits and bad prompts against a live server serving tiny-random-llama (real SQLite, real
Redis): max new tokens is capped by the setting, a prompt of only special tokens gets a clear 400, odd but
valid text (NUL, huge numbers) gets a clear answer, and the server keeps serving after each."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.domain.db.migrate import upgrade
from service.domain.settings import Settings
from tests.integration.live_server import LiveServer, create_key, redis_url_for_module, serving

pytestmark = pytest.mark.integration

MODEL = "tiny-random-llama"
CAP = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("serving-input")
    db_url = f"sqlite:///{root / 'unlearn.db'}"
    upgrade(db_url)
    for redis_url in redis_url_for_module(root):
        settings = Settings(data_dir=root / "data", model=MODEL, device="cpu", database_url=db_url,
                            redis_url=redis_url, max_new_tokens=CAP, rate_limit_inference="")
        with serving(settings) as live:
            yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    key = create_key(server.app.state.settings.db_url, "inference")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def only_special(server: LiveServer) -> str:
    tokenizer = server.holder.current().tokenizer
    return "".join(tokenizer.all_special_tokens)


def still_serving(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_tokens_are_capped_by_max_new_tokens(http):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "temperature": 1.0, "seed": 6}
    usage = http.post("/v1/completions", json=body).json()["usage"]
    assert 0 < usage["completion_tokens"] <= CAP


def test_chat_tokens_are_capped_by_max_new_tokens(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say a lot."}], "max_completion_tokens": 100,
            "temperature": 1.0, "seed": 6}
    assert http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] <= CAP


def test_streamed_tokens_are_capped_too(http):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "seed": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert '"completion_tokens":' in lines[-1]
    import json

    assert json.loads(lines[-1][6:])["usage"]["completion_tokens"] <= CAP


def test_max_tokens_beyond_the_context_is_a_clear_400(http):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 10**40}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    still_serving(http)


def test_completion_prompt_of_only_special_tokens_is_a_clear_400(http, only_special):
    for prompt in (only_special, [only_special], ["fine text", only_special]):
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "prompt_only_special_tokens"
    still_serving(http)


def test_chat_message_of_only_special_tokens_is_a_clear_400(http, only_special):
    body = {"model": MODEL, "messages": [{"role": "user", "content": only_special}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0"
    still_serving(http)


def test_special_tokens_mixed_with_text_are_answered(http, only_special):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello " + only_special, "max_tokens": 2})
    assert response.status_code == 200


@pytest.mark.parametrize("prompt", ["a\u0000b", "\u0000", "\ufffd\ufeff", "😀" * 20])
def test_odd_but_valid_prompt_text_is_answered(http, prompt):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert response.status_code == 200, response.text
    still_serving(http)


@pytest.mark.parametrize("raw", [b'{"model": "tiny-random-llama", "prompt": "a", "max_tokens": 1e309}',
                                 b'{"model": "tiny-random-llama", "prompt": "a", "seed": 1e400}',
                                 b'{"model": "tiny-random-llama", "prompt": "\xff\xfe"}',
                                 b'{"model": "tiny-random-llama", "messages": ['])
def test_malformed_inference_bodies_get_422_and_the_server_keeps_serving(http, raw):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["message"]
    still_serving(http)
