"""The OpenAI-compatible endpoints, driven by the official `openai` SDK against a live uvicorn server that
serves tiny-random-llama (real database, real Redis)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from service.api.serving.guard import REFUSAL, words_of
from service.domain.db.migrate import upgrade
from service.domain.settings import Settings
from tests.integration.live_server import LiveServer, create_key, redis_url_for_module, serving

pytestmark = pytest.mark.integration

MODEL = "tiny-random-llama"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


def tiny_settings(data_dir: Path, db_url: str, redis_url: str) -> Settings:
    return Settings(data_dir=data_dir, model=MODEL, device="cpu", database_url=db_url, redis_url=redis_url,
                    serving_poll_seconds=0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module (SQLite): these tests only read, and a start costs a model load."""
    root = tmp_path_factory.mktemp("openai-api")
    db_url = f"sqlite:///{root / 'unlearn.db'}"
    upgrade(db_url)
    for redis_url in redis_url_for_module(root):
        with serving(tiny_settings(root / "data", db_url, redis_url)) as live:
            yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    key = create_key(server.app.state.settings.db_url, "inference")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def sampled_completion(client: openai.OpenAI, **overrides) -> openai.types.Completion:
    # seed 6: tiny-random-llama samples 60 tokens without an end-of-sequence, 15 words
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "seed": 6, **overrides}
    return client.completions.create(**body)


# ------------------------------------------------------------------ chat


def test_chat_completion_reports_version_usage_and_finish_reason(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    completion = raw.parse()
    assert raw.headers["X-Model-Version"] == "0"
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.system_fingerprint == "v0"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_greedy_chat_equals_the_base_models_own_greedy_decoding(client, server):
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24, temperature=0)
    served = server.holder.current()
    prompt = served.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = served.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = served.model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=24, do_sample=False)
    text = served.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.choices[0].message.content == text


def test_chat_stream_yields_role_then_deltas_then_finish_and_usage(client):
    expected = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" and c.system_fingerprint == "v0" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


# ------------------------------------------------------------------ completions


def test_completion_with_seed_repeats_itself_and_returns_n_choices(client):
    first = sampled_completion(client, n=2)
    second = sampled_completion(client, n=2)
    assert first.object == "text_completion" and first.system_fingerprint == "v0"
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == second.usage.completion_tokens
    assert 2 <= first.usage.completion_tokens <= 2 * 40  # usage counts every choice


def test_max_tokens_ends_with_length(client):
    completion = sampled_completion(client, max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_stop_string_ends_the_text_before_it(client):
    full = sampled_completion(client).choices[0].text
    match = re.search(r"[A-Za-z0-9]{2}", full[4:])
    assert match, f"no ASCII pair in {full!r} to use as a stop string"
    stop = match.group(0)
    stopped = sampled_completion(client, stop=[stop, "never-generated"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[:full.index(stop)]


def test_completion_stream_joins_to_the_same_text(client):
    expected = sampled_completion(client).choices[0].text
    chunks = list(sampled_completion(client, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_list_of_prompts_gives_a_choice_per_prompt(client):
    completion = sampled_completion(client, prompt=["One", "Two"], max_tokens=4, echo=True)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].text.startswith("One") and completion.choices[1].text.startswith("Two")


# ------------------------------------------------------------------ models, errors, metrics


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].active_version == 0


def test_bad_key_is_401_with_an_openai_error(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="ul_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=MODEL, messages=CHAT)
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "authentication_error"


def test_requester_key_may_not_generate(server):
    key = create_key(server.app.state.settings.db_url, "requester")
    requester = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        requester.chat.completions.create(model=MODEL, messages=CHAT)


def test_bad_body_is_422_naming_the_field(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["param"] == "temperature"


def test_missing_messages_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=MODEL, messages=[])
    assert caught.value.body["param"] == "messages"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert caught.value.code == "model_not_found"


def test_prompt_plus_max_tokens_over_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"


def test_metrics_count_requests_tokens_and_served_version(client, server):
    sampled_completion(client, max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    assert "unlearn_served_model_version 0.0" in text
    generated = float(re.search(r"^unlearn_generated_tokens_total (\S+)$", text, re.MULTILINE).group(1))
    assert generated >= 3
    assert 'unlearn_inference_requests_total{endpoint="completions",finish="length",stream="false"}' in text
    assert re.search(
        r'unlearn_http_request_duration_seconds_count\{method="POST",route="/v1/completions"\} [1-9]', text
    )


# ------------------------------------------------------------------ batching across requests


def test_concurrent_clients_are_decoded_in_one_batch(client, server):
    """Eight clients at once: every answer is complete, and steps ran with several sequences together."""
    def steps_of_one() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return float(re.search(r'^unlearn_serving_batch_sequences_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))

    def total_steps() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return float(re.search(r"^unlearn_serving_batch_sequences_count (\S+)$", text, re.M).group(1))

    before_one, before_all = steps_of_one(), total_steps()
    scheduler = server.holder.current().scheduler
    with ThreadPoolExecutor(8) as pool:
        with server.holder.compute_lock:  # all eight are queued before the first step runs
            futures = [pool.submit(client.completions.create, model=MODEL, prompt=f"Story {i}:", max_tokens=16,
                                   temperature=0) for i in range(8)]
            wait_until(lambda: scheduler.waiting + scheduler.running == 8)
        completions = [f.result() for f in futures]
    assert all(c.usage.completion_tokens >= 1 for c in completions)
    batched_steps = (total_steps() - before_all) - (steps_of_one() - before_one)
    assert batched_steps >= 1


@pytest.fixture
def busy_server(make_settings, db_url: str, redis_url: str) -> Iterator[LiveServer]:
    """One sequence at a time, one request waiting: the third concurrent request finds the queue full."""
    settings = make_settings(database_url=db_url, redis_url=redis_url, serving_max_batch=1, serving_max_queue=1)
    with serving(settings) as live:
        yield live


def test_a_full_queue_is_429_with_retry_after_and_the_queued_requests_finish(busy_server):
    key = create_key(busy_server.app.state.settings.db_url, "inference")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    post = lambda: httpx.post(f"{busy_server.url}/v1/completions", json=body,  # noqa: E731
                              headers={"Authorization": f"Bearer {key}"}, timeout=60)
    scheduler = busy_server.holder.current().scheduler
    with ThreadPoolExecutor(2) as pool:
        with busy_server.holder.compute_lock:
            running = pool.submit(post)
            wait_until(lambda: scheduler.running == 1)  # admitted: its prefill waits for the lock
            queued = pool.submit(post)
            wait_until(lambda: scheduler.waiting == 1)
            refused = post()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "server_busy"
    assert running.result().status_code == 200 and queued.result().status_code == 200


# ------------------------------------------------------------------ the pending-request guard


@pytest.fixture
def guarded_server(make_settings, db_url: str, redis_url: str) -> Iterator[LiveServer]:
    """A server of its own, on SQLite and PostgreSQL (the guard reads pending payloads from the db)."""
    with serving(make_settings(database_url=db_url, redis_url=redis_url, serving_poll_seconds=0.2)) as live:
        yield live


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_guard_refuses_a_pending_item_until_its_job_ends(guarded_server, db_url):
    server = guarded_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=create_key(db_url, "inference"), max_retries=0)
    text = sampled_completion(client, max_tokens=60).choices[0].text
    assert len(words_of(text)) >= 8, f"the sampled text has too few words for the test: {text!r}"
    requester = {"Authorization": f"Bearer {create_key(db_url, 'requester')}"}
    # control characters (NUL is refused by PostgreSQL) are not words: the item has the same words
    body = {"subject_ref": "case-9", "reason": "gdpr_art17", "forget": [{"text": re.sub(r"[\x00-\x1f]", " ", text)}]}
    created = httpx.post(f"{server.url}/v1/deletion-requests", json=body, headers=requester)
    assert created.status_code == 202, created.text
    request_id, job_id = created.json()["id"], created.json()["job"]["id"]
    wait_until(lambda: request_id in server.holder.guard.request_ids)

    refused = sampled_completion(client, max_tokens=60)
    assert refused.choices[0].finish_reason == "content_filter"
    assert refused.choices[0].text == REFUSAL
    streamed = list(sampled_completion(client, max_tokens=60, stream=True))
    streamed_text = "".join(c.choices[0].text for c in streamed)
    assert streamed[-1].choices[0].finish_reason == "content_filter" and streamed_text.endswith(REFUSAL)
    assert " ".join(words_of(text)[:8]) not in " ".join(words_of(streamed_text))  # no window leaked mid-stream

    assert httpx.post(f"{server.url}/v1/jobs/{job_id}/cancel", headers=requester).status_code == 202
    wait_until(lambda: request_id not in server.holder.guard.request_ids)
    assert sampled_completion(client, max_tokens=60).choices[0].text == text
