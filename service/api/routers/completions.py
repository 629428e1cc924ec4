"""POST /v1/completions: OpenAI (legacy) text completions on the active model version."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service.api.deps import GenerateDep, SettingsDep
from service.api.openai_protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from service.api.serving import endpoint
from service.api.serving.endpoint import Delta, Generation, RequestMetrics
from service.api.serving.generation import completion_prompt_ids
from service.api.serving.scheduler import Prompt

router = APIRouter(prefix="/v1", tags=["inference"])

STREAM_DOC = {200: {"content": {"text/event-stream": {}},
                    "description": "text_completion, streamed when stream=true"}}


@router.post("/completions", response_model=CompletionResponse, responses=STREAM_DOC)
async def create_completion(
    body: CompletionRequest, request: Request, settings: SettingsDep, principal: GenerateDep,
) -> Response:
    """Continue a prompt (or each prompt of a list: choice index = prompt index * n + i). The version that
    answered is in the `X-Model-Version` header and in `system_fingerprint` ("v{N}"). With `stream: true`:
    server-sent events of `text_completion` objects, then `data: [DONE]`."""
    holder, served = endpoint.pin_model(request, body.model)
    prompts = body.prompts()
    await run_in_threadpool(endpoint.refuse_only_special_tokens, served.tokenizer, prompts, "prompt")
    encoded = await run_in_threadpool(lambda: [completion_prompt_ids(served.tokenizer, p) for p in prompts])
    n = body.n or 1
    params = [endpoint.sampling_params(body, len(ids), served.context_length, body.max_tokens,
                                       settings.max_new_tokens) for ids in encoded]
    jobs = [Prompt(ids, prompt, i * n) for i, (ids, prompt) in enumerate(zip(encoded, prompts))]
    # one SamplingParams for all prompts: the tightest max_new_tokens (differs only near the context limit)
    generation = Generation(holder, served, jobs, min(params, key=lambda p: p.max_new_tokens), bool(body.stream))
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name,
            "system_fingerprint": served.fingerprint}
    metrics = RequestMetrics(request, "completions", bool(body.stream))
    echoes = [p if body.echo else "" for p in prompts for _ in range(n)]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(generation, meta, echoes, include_usage, metrics)
        return endpoint.sse_response(served, endpoint.sse_events(chunks))
    result = await generation.result()
    metrics.done(result)
    return endpoint.json_response(served, CompletionResponse(
        **meta,
        choices=[CompletionChoice(text=echoes[c.index] + c.text, index=c.index, finish_reason=c.finish_reason)
                 for c in result.choices],
        usage=Usage(**endpoint.usage(result)),
    ))


async def _chunks(generation: Generation, meta: dict, echoes: list[str], include_usage: bool,
                  metrics: RequestMetrics) -> AsyncIterator[CompletionResponse]:
    def chunk(index: int, text: str, finish_reason: str | None = None) -> CompletionResponse:
        choice = CompletionChoice(text=text, index=index, finish_reason=finish_reason)
        return CompletionResponse(**meta, choices=[choice])

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk(index, echo)
    async for item in generation.deltas():
        if isinstance(item, Delta):
            if item.text:
                metrics.text()
            if item.text or item.finish_reason:
                yield chunk(item.index, item.text, item.finish_reason)
            continue
        metrics.done(item)
        if include_usage:
            yield CompletionResponse(**meta, choices=[], usage=Usage(**endpoint.usage(item)))
