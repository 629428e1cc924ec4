"""POST /v1/chat/completions: OpenAI chat completions on the active model version."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service.api.deps import GenerateDep, SettingsDep
from service.api.openai_protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Usage,
)
from service.api.serving import endpoint
from service.api.serving.endpoint import Delta, Generation, RequestMetrics
from service.api.serving.generation import chat_prompt_ids, content_text
from service.api.serving.scheduler import Prompt

router = APIRouter(prefix="/v1", tags=["inference"])

STREAM_DOC = {200: {"content": {"text/event-stream": {}},
                    "description": "chat.completion, or chunks when stream=true"}}


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_DOC)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, settings: SettingsDep, principal: GenerateDep,
) -> Response:
    """Chat completion with the tokenizer's chat template. The version that answered is in the
    `X-Model-Version` header and in `system_fingerprint` ("v{N}"). With `stream: true`: server-sent events of
    `chat.completion.chunk` objects, then `data: [DONE]`. `finish_reason` "content_filter": the output
    reproduced data of a pending deletion request (a stopgap guard until the request's version is served)."""
    holder, served = endpoint.pin_model(request, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": content_text(m.content)}
                for m in body.messages]
    await run_in_threadpool(endpoint.refuse_only_special_tokens, served.tokenizer,
                            [m["content"] for m in messages], "messages")
    prompt_ids = await run_in_threadpool(chat_prompt_ids, served.tokenizer, messages)
    requested = body.max_completion_tokens or body.max_tokens
    params = endpoint.sampling_params(body, len(prompt_ids), served.context_length, requested,
                                      settings.max_new_tokens)
    generation = Generation(holder, served, [Prompt(prompt_ids)], params, bool(body.stream))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name,
            "system_fingerprint": served.fingerprint}
    metrics = RequestMetrics(request, "chat", bool(body.stream))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(generation, meta, params.n, include_usage, metrics)
        return endpoint.sse_response(served, endpoint.sse_events(chunks))
    result = await generation.result()
    metrics.done(result)
    return endpoint.json_response(served, ChatCompletionResponse(
        **meta,
        choices=[ChatCompletionChoice(index=c.index, message=ChatCompletionMessage(content=c.text),
                                      finish_reason=c.finish_reason) for c in result.choices],
        usage=Usage(**endpoint.usage(result)),
    ))


async def _chunks(generation: Generation, meta: dict, n: int, include_usage: bool,
                  metrics: RequestMetrics) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**meta, choices=choices, usage=usage)

    yield chunk([ChatCompletionChunkChoice(index=i, delta=ChatCompletionDelta(role="assistant", content=""))
                 for i in range(n)])
    async for item in generation.deltas():
        if isinstance(item, Delta):
            if item.text:
                metrics.text()
                delta = ChatCompletionDelta(content=item.text)
                yield chunk([ChatCompletionChunkChoice(index=item.index, delta=delta)])
            if item.finish_reason:
                yield chunk([ChatCompletionChunkChoice(index=item.index, delta=ChatCompletionDelta(),
                                                       finish_reason=item.finish_reason)])
            continue
        metrics.done(item)
        if include_usage:
            yield chunk([], Usage(**endpoint.usage(item)))
