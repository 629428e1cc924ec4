"""Prometheus metrics of the API process, served at GET /metrics (no auth, like /healthz).

One registry per app (not the global one): several apps in one process (tests) do not collide.
HTTP metrics are labelled by route template (/v1/jobs/{job_id}), never by raw path, to bound cardinality.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

router = APIRouter(tags=["health"])


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("unlearn_http_requests", "HTTP requests", ["method", "route", "status"],
                                     registry=r)
        self.http_latency = Histogram("unlearn_http_request_duration_seconds",
                                      "HTTP request duration, to the last byte", ["method", "route"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.inference_requests = Counter("unlearn_inference_requests", "Completion requests",
                                          ["endpoint", "stream", "finish"], registry=r)
        self.inference_latency = Histogram("unlearn_inference_duration_seconds", "Generation time per request",
                                           ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("unlearn_inference_time_to_first_token_seconds", "Time to the first streamed text",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("unlearn_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("unlearn_generated_tokens", "Tokens generated", registry=r)
        self.served_version = Gauge("unlearn_served_model_version", "Model version this process serves", registry=r)
        self.swaps = Counter("unlearn_model_swaps", "Model version swaps after the first load", registry=r)
        self.swap_failures = Counter("unlearn_model_swap_failures", "Versions that failed to load", registry=r)
        self.load_seconds = Histogram("unlearn_model_load_seconds", "Time to load a model version",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.guard_refusals = Counter("unlearn_guard_refusals", "Choices refused by the pending-request guard",
                                      registry=r)
        self.guard_pending_requests = Gauge("unlearn_guard_pending_requests", "Deletion requests the guard covers",
                                            registry=r)
        self.serving_batch = Histogram("unlearn_serving_batch_sequences", "Sequences decoded per step",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.serving_queue = Gauge("unlearn_serving_queue_requests", "Requests waiting for room in the batch",
                                   registry=r)
        self.serving_rejected = Counter("unlearn_serving_rejected", "Requests refused with 429: queue full",
                                        registry=r)
        self.served_version.set(-1)  # -1 until a model is loaded (or when this process serves none)


class HttpMetricsMiddleware:
    """Pure ASGI middleware (a streamed response is timed to its last byte, not to its headers)."""

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(method, route, str(status[0])).inc()
            self.metrics.http_latency.labels(method, route).observe(time.perf_counter() - started)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
