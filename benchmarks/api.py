"""`unlearn bench api`: latency percentiles and throughput of POST /v1/deletion-requests and GET /v1/jobs/{id}.

A live `unlearn serve --no-worker --workers W` (for each W in `workers`: W API processes on one port;
embedded Redis, SQLite in a fresh data dir or the given database, the configured model loaded for serving)
on a free loopback port; `clients` concurrent asyncio httpx clients, each
looping POST a small deletion request -> GET its job, until `requests` POSTs are done or `duration`
seconds pass (bounded in count and time). The per-key submit rate limit (default 30/minute) is raised
for the run (UNLEARN_RATE_LIMIT_REQUESTS), and so is the tenant's active-job cap (jobs stay queued with
no worker): both checks stay on the path but never answer 429. Jobs stay queued (no worker): this measures the API path
(validation, db write, audit append, enqueue), not unlearning. The driver shares the machine's cores
with the server, so the numbers are pessimistic on a small machine.
Target (DESIGN section 9 / issue 5): POST p99 <= 50 ms.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .common import Report, markdown_table, percentile

TARGET_POST_P99_MS = 50.0


@dataclass
class ApiOptions:
    model: str = "smollm2-135m-instruct"
    cache_dir: Path = Path(".unlearn/models")
    clients: int = 50
    requests: int = 1000
    duration: float = 60.0
    startup_timeout: float = 180.0
    rate_limit: str = "1000000/minute"  # per key; the default 30/minute would answer 429 to a load test
    workers: tuple[int, ...] = (1,)  # API processes, one server start each
    database_url: str | None = None  # an empty database (PostgreSQL to scale); None: SQLite in the data dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(data_dir: Path, opts: ApiOptions) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_")}
    env.update(UNLEARN_DATA_DIR=str(data_dir), UNLEARN_MODEL=opts.model, HF_HUB_OFFLINE="1",
               UNLEARN_RATE_LIMIT_REQUESTS=opts.rate_limit,
               UNLEARN_MAX_ACTIVE_JOBS_PER_TENANT=str(len(opts.workers) * opts.requests + 1))
    if opts.database_url:
        env["UNLEARN_DATABASE_URL"] = opts.database_url
    return env


def start_server(data_dir: Path, opts: ApiOptions, port: int, workers: int = 1) -> subprocess.Popen:
    """`unlearn serve --no-worker --workers N`; the model cache is linked in so the base is not rebuilt."""
    if not (data_dir / "models").exists():
        cache = Path(opts.cache_dir).resolve()
        cache.mkdir(parents=True, exist_ok=True)  # a link to a missing dir would fail the server's model load
        (data_dir / "models").symlink_to(cache, target_is_directory=True)
    command = [sys.executable, "-m", "service", "serve", "--no-worker", "--port", str(port), "--workers", str(workers)]
    with open(data_dir / "server.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=server_env(data_dir, opts), stdout=log, stderr=subprocess.STDOUT)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_ready(url: str, server: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited ({server.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready in {timeout}s:\n{log.read_text()[-2000:]}")


def create_key(data_dir: Path, opts: ApiOptions, role: str = "requester") -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service", "keys", "create", "--role", role, "--tenant", "bench"],
        env=server_env(data_dir, opts), capture_output=True, text=True, check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def request_body(n: int) -> dict:
    return {"subject_ref": f"bench-{n}", "reason": "gdpr_art17",
            "forget": [{"prompt": f"Where was author {n} born?", "answer": f"Author {n} was born in Springfield."}]}


@dataclass
class Samples:
    post_ms: list[float]
    get_ms: list[float]
    errors: int
    wall_s: float
    statuses: dict[str, int] = field(default_factory=dict)  # "POST 202" -> count
    first_error: str = ""


async def drive(url: str, key: str, opts: ApiOptions, on_post) -> Samples:
    post_ms, get_ms, errors, counter = [], [], 0, iter(range(opts.requests))
    statuses: Counter[str] = Counter()
    first_error: list[str] = []
    deadline = time.monotonic() + opts.duration
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=opts.clients, max_keepalive_connections=opts.clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for n in counter:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            posted = await http.post(f"{url}/v1/deletion-requests", json=request_body(n), headers=headers)
            post_ms.append((time.perf_counter() - start) * 1000)
            on_post()
            statuses[f"POST {posted.status_code}"] += 1
            if posted.status_code != 202:
                errors += 1
                first_error[:] = first_error or [posted.text[:300]]
                continue
            start = time.perf_counter()
            got = await http.get(f"{url}/v1/jobs/{posted.json()['job']['id']}", headers=headers)
            get_ms.append((time.perf_counter() - start) * 1000)
            statuses[f"GET {got.status_code}"] += 1
            errors += got.status_code != 200

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        await asyncio.gather(*(client(http) for _ in range(opts.clients)))
    return Samples(post_ms, get_ms, errors, time.perf_counter() - started, dict(statuses),
                   first_error[0] if first_error else "")


def run_api(opts: ApiOptions, bar, out_dir: Path) -> Report:
    task = bar.add_task("api", total=opts.requests * len(opts.workers), info="starting server")
    levels: dict[int, Samples] = {}
    with tempfile.TemporaryDirectory(prefix="unlearn-bench-api-") as tmp:
        data_dir = Path(tmp)
        for workers in opts.workers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = start_server(data_dir, opts, port, workers)
            try:
                wait_ready(url, server, opts.startup_timeout, data_dir / "server.log")
                key = create_key(data_dir, opts)
                bar.update(task, info=f"{workers} API processes, {opts.clients} clients")
                levels[workers] = asyncio.run(drive(url, key, opts, lambda: bar.advance(task)))
            finally:
                stop_server(server)
    return build_report(opts, levels)


def build_report(opts: ApiOptions, levels: dict[int, Samples]) -> Report:
    def stats(values: list[float]) -> list[float]:
        return [percentile(values, q) for q in (50, 95, 99)] + [max(values, default=float("nan"))]

    rows = []
    for workers, samples in levels.items():
        rows += [[workers, "POST /v1/deletion-requests", len(samples.post_ms), *stats(samples.post_ms),
                  len(samples.post_ms) / samples.wall_s],
                 [workers, "GET /v1/jobs/{id}", len(samples.get_ms), *stats(samples.get_ms),
                  len(samples.get_ms) / samples.wall_s]]
    database = "SQLite" if not opts.database_url else opts.database_url.split("://")[0].split("+")[0]
    report = Report("api", f"API latency under {opts.clients} concurrent clients, {database}")
    report.data = {str(w): {"post_ms": s.post_ms, "get_ms": s.get_ms, "errors": s.errors, "wall_s": s.wall_s,
                            "post_p99_ms": percentile(s.post_ms, 99), "statuses": s.statuses,
                            "first_error": s.first_error} for w, s in levels.items()}
    report.add("Setup", __doc__.split("\n\n", 1)[1].strip() +
               f"\n\n{opts.clients} clients, at most {opts.requests} POSTs or {opts.duration:.0f} s per level; "
               f"model {opts.model}; database {database}; submit rate limit {opts.rate_limit}.")
    lines = []
    for workers, samples in levels.items():
        p99 = percentile(samples.post_ms, 99)
        ops = len(samples.post_ms) + len(samples.get_ms)
        lines.append(f"- {workers} API process(es): {ops} requests in {samples.wall_s:.1f} s "
                     f"({ops / samples.wall_s:.0f}/s), {samples.errors} errors (status counts {samples.statuses}"
                     + (f"; first error body: `{samples.first_error}`" if samples.first_error else "")
                     + f"); POST p99 {p99:.1f} ms (target <= {TARGET_POST_P99_MS:.0f} ms: "
                     f"{'met' if p99 <= TARGET_POST_P99_MS else 'NOT met'}).")
    report.add("Results", markdown_table(["API processes", "endpoint", "count", "p50 ms", "p95 ms", "p99 ms",
                                          "max ms", "per s"], rows) + "\n\n" + "\n".join(lines))
    return report
