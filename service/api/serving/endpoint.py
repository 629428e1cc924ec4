"""What the chat and completions routers share: pinning the served version, sampling parameters, queueing a
generation on the version's batch scheduler (never on the event loop), server-sent events and metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from service.api.openai_protocol import OpenAIRequest
from service.api.serving.generation import GenerationResult, SamplingParams
from service.api.serving.scheduler import Prompt, SubmitCallbacks
from service.domain.errors import NotFound, ServiceError, Unavailable, error_body

VERSION_HEADER = "X-Model-Version"


class ContextLengthExceeded(ServiceError):
    status_code, code = 400, "context_length_exceeded"


class OnlySpecialTokens(ServiceError):
    status_code, code = 400, "prompt_only_special_tokens"


def refuse_only_special_tokens(tokenizer: Any, texts: list[str], param: str) -> None:
    """A prompt (or message) that is nothing but special tokens (`<|endoftext|>`, role markers...) asks the
    model to continue its own control sequence: refuse it (400) rather than answer with noise."""
    special = set(tokenizer.all_special_ids)
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and all(token in special for token in ids):
            raise OnlySpecialTokens(f"{param}[{index}] holds only special tokens; send text", param=f"{param}.{index}")


def current_model(request: Request) -> tuple[Any, Any]:
    """(holder, the ServedModel it serves now); 503 while this process serves none or is still loading."""
    holder = getattr(request.app.state, "serving", None)
    if holder is None:
        raise Unavailable("this API process does not serve a model (start it with `unlearn serve`)")
    served = holder.current()
    if served is None:
        raise Unavailable("the model is loading; retry shortly", headers={"Retry-After": "2"},
                          code="model_loading")
    return holder, served


def pin_model(request: Request, model: str) -> tuple[Any, Any]:
    """(holder, the ServedModel this request will use to the end, even if a swap happens meanwhile)."""
    holder, served = current_model(request)
    if model != served.name:
        raise NotFound(f"model '{model}' is not served here; GET /v1/models lists '{served.name}'",
                       param="model", code="model_not_found")
    return holder, served


def sampling_params(body: OpenAIRequest, prompt_tokens: int, context_length: int, requested: int | None,
                    cap: int) -> SamplingParams:
    """max_new_tokens = requested (must fit the context) or what fits, both at most `cap` (the setting)."""
    room = context_length - prompt_tokens
    if room <= 0 or (requested is not None and requested > room):
        asked = f" + {requested} requested" if requested is not None else ""
        raise ContextLengthExceeded(
            f"the model's context is {context_length} tokens; the prompt has {prompt_tokens}{asked}",
            param="messages" if hasattr(body, "messages") else "prompt",
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=min(requested or room, room, cap),
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        n=body.n or 1,
        seed=body.seed,
        stop=tuple(body.stop_list()),
    )


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None


class Generation:
    """One request's generation on its pinned version's batch scheduler. Created inside the request handler:
    the request is queued at once, so a full queue is a 429 before any response (or stream) starts."""

    def __init__(self, holder: Any, served: Any, prompts: list[Prompt], params: SamplingParams,
                 stream: bool) -> None:
        self.served, self.params = served, params
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancel = threading.Event()
        on_delta = (lambda i, t, f: self._put(Delta(i, t, f))) if stream else None
        holder.submit(served, prompts, params, SubmitCallbacks(self._put, on_delta, self._cancel.is_set))

    def _put(self, item: Any) -> None:
        """From the scheduler thread: hand a delta, the result or an exception to the request's task."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self._cancel.set()

    async def result(self) -> GenerationResult:
        async for item in self._events():
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("generation ended without a result")

    async def deltas(self) -> AsyncIterator[Delta | GenerationResult]:
        """Text deltas as they are generated, then the GenerationResult."""
        async for item in self._events():
            yield item

    async def _events(self) -> AsyncIterator[Delta | GenerationResult]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self._cancel.set()  # client gone or request finished: its rows leave the batch at the next step


def usage(result: GenerationResult) -> dict[str, int]:
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": total}


def json_response(served: Any, body: BaseModel) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), headers={VERSION_HEADER: str(served.version)})


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_response(served: Any, events: AsyncIterator[str]) -> StreamingResponse:
    headers = {VERSION_HEADER: str(served.version), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def sse_events(chunks: AsyncIterator[BaseModel | dict[str, Any]]) -> AsyncIterator[str]:
    """chunks -> `data: {...}` lines, `data: [DONE]` at the end; an error mid-stream becomes an error event
    (the OpenAI SDK raises it as an APIError) instead of a silently cut stream."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except ServiceError as exc:
        yield sse(exc.body())
        return
    except Exception as exc:  # noqa: BLE001
        yield sse(error_body(f"generation failed: {type(exc).__name__}", "server_error", "generation_failed"))
        return
    yield "data: [DONE]\n\n"


class RequestMetrics:
    """Per-request Prometheus bookkeeping: latency, time to first text, tokens, finish reasons."""

    def __init__(self, request: Request, endpoint: str, stream: bool) -> None:
        self.metrics = request.app.state.metrics
        self.endpoint, self.stream = endpoint, stream
        self.started = time.perf_counter()
        self.first_text_seen = False

    def text(self) -> None:
        if not self.first_text_seen:
            self.first_text_seen = True
            self.metrics.first_token.labels(self.endpoint).observe(time.perf_counter() - self.started)

    def done(self, result: GenerationResult) -> None:
        self.metrics.inference_latency.labels(self.endpoint).observe(time.perf_counter() - self.started)
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.generated_tokens.inc(result.completion_tokens)
        self.metrics.guard_refusals.inc(result.guard_refusals)
        reasons = {c.finish_reason for c in result.choices}
        finish = next((r for r in ("content_filter", "length", "stop") if r in reasons), "cancelled")
        self.metrics.inference_requests.labels(self.endpoint, str(self.stream).lower(), finish).inc()
