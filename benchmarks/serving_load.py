"""Serving under load through the HTTP API: a live `unlearn serve --no-worker` process and C concurrent
clients, for each C in `clients`, each client sending greedy chat completions back to back.

Each client sends `rounds` requests; request k of every client asks question k % len(QUESTIONS), so every
level asks the same questions and produces the same answers (greedy). Aggregate tokens/s = completion
tokens of all requests / wall time of the level; latency = each request's time to its last byte.
Targets (issue 14): at 8 clients, aggregate tokens/s >= 3x and p50 latency <= 2x the single-client figures.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .api import ApiOptions, create_key, free_port, start_server, stop_server, wait_ready
from .common import markdown_table, percentile

QUESTIONS = (
    "Write two sentences about a lighthouse keeper.",
    "Explain in two sentences why the sky is blue.",
    "Describe a busy market in the morning.",
    "Give two tips for learning a new language.",
    "What makes a good cup of tea? Answer briefly.",
    "Describe the sound of rain on a roof.",
)
TARGET_THROUGHPUT_X, TARGET_LATENCY_X = 3.0, 2.0


@dataclass
class LoadOptions:
    model: str
    cache_dir: Path
    clients: tuple[int, ...] = (1, 8, 16)
    tokens: int = 48
    rounds: int = 3
    startup_timeout: float = 300.0


@dataclass
class Level:
    clients: int
    requests: int
    tokens: int
    wall_s: float
    latencies_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s)


async def one_level(url: str, key: str, model: str, clients: int, opts: LoadOptions) -> Level:
    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for k in range(opts.rounds):
            body = {"model": model, "max_tokens": opts.tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]}
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    return Level(clients, len(latencies), tokens, wall, latencies)


def served_model_name(url: str, key: str) -> str:
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    return models["data"][0]["id"]


def measure_load(opts: LoadOptions, bar) -> list[Level]:
    task = bar.add_task("serving load", total=len(opts.clients), info="starting server")
    api = ApiOptions(model=opts.model, cache_dir=opts.cache_dir, startup_timeout=opts.startup_timeout)
    with tempfile.TemporaryDirectory(prefix="unlearn-bench-serving-") as tmp:
        data_dir, port = Path(tmp), free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(data_dir, api, port)
        try:
            wait_ready(url, server, opts.startup_timeout, data_dir / "server.log")
            key = create_key(data_dir, api, role="inference")
            model = served_model_name(url, key)
            warm = LoadOptions(opts.model, opts.cache_dir, tokens=8, rounds=1)
            asyncio.run(one_level(url, key, model, 2, warm))  # first passes allocate; not measured
            levels = []
            for clients in opts.clients:
                bar.update(task, info=f"{clients} clients")
                levels.append(asyncio.run(one_level(url, key, model, clients, opts)))
                bar.advance(task)
        finally:
            stop_server(server)
    return levels


def load_section(levels: list[Level]) -> tuple[str, dict]:
    """The markdown table with ratios to the single-client level, the verdict and the raw data."""
    single = next((level for level in levels if level.clients == 1), None)
    rows = []
    for level in levels:
        ratio_tps = level.tokens_per_s / single.tokens_per_s if single else float("nan")
        ratio_p50 = level.p50_s / single.p50_s if single else float("nan")
        rows.append([level.clients, level.requests, level.tokens, level.tokens_per_s, ratio_tps,
                     level.p50_s, ratio_p50, percentile(level.latencies_s, 95)])
    table = markdown_table(["clients", "requests", "completion tokens", "aggregate tokens/s", "vs 1 client",
                            "latency p50 s", "vs 1 client", "latency p95 s"], rows)
    at8 = next((level for level in levels if level.clients == 8), None)
    verdict = ""
    if single and at8:
        tps_x, p50_x = at8.tokens_per_s / single.tokens_per_s, at8.p50_s / single.p50_s
        met = tps_x >= TARGET_THROUGHPUT_X and p50_x <= TARGET_LATENCY_X
        verdict = (f"\n\nAt 8 clients: {tps_x:.2f}x the single-client tokens/s (target >= {TARGET_THROUGHPUT_X:.0f}x), "
                   f"p50 latency {p50_x:.2f}x (target <= {TARGET_LATENCY_X:.0f}x): {'met' if met else 'NOT met'}.")
    data = {str(level.clients): {"requests": level.requests, "tokens": level.tokens, "wall_s": level.wall_s,
                                 "tokens_per_s": level.tokens_per_s, "latencies_s": level.latencies_s}
            for level in levels}
    return table + verdict, data
