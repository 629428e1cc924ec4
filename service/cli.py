"""`unlearn` command line: serve, worker, migrate, keys, audit, forget, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.commands.export import export as export_command
from service.commands.forget import forget as forget_command
from service.domain.processes import die_with_parent, stop_process
from service.domain.settings import ConfigError, Settings, check_data_dir, get_settings

app = typer.Typer(help="Machine-unlearning service for language models.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
audit_app = typer.Typer(help="The compliance audit trail.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        settings = get_settings()
        check_data_dir(settings)
        return settings
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except Exception as exc:  # pydantic ValidationError: names the bad variable
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _migrate(settings: Settings) -> None:
    from service.domain.db.migrate import upgrade
    from service.domain.db.session import ping

    try:
        ping(settings.db_url)
    except Exception as exc:
        where = settings.db_url.split("@")[-1]
        raise ConfigError(f"database {where} is not reachable: {type(exc).__name__}: {exc}") from exc
    upgrade(settings.db_url)


@app.command()
def migrate() -> None:
    """Apply database migrations (Alembic) up to the latest."""
    settings = _settings()
    try:
        _migrate(settings)
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print("database is at the latest migration")


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Do not start a worker process")] = False,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, max=64, help="API processes on this port (each serves the model; use PostgreSQL)")] = 1,
) -> None:
    """Start everything on one machine: embedded Redis (unless UNLEARN_REDIS_URL), migrations, one worker, the API."""
    from service.domain.broker import check_redis

    settings = _settings()
    _sigterm_as_sigint()
    try:
        with ExitStack() as children:  # unwound last in, first out: the worker stops before its broker
            settings = _start_embedded_redis(settings, children)
            check_redis(settings.redis_url or "")
            _migrate(settings)
            _bootstrap_admin(settings)
            if not no_worker:
                children.callback(stop_process, _start_worker(), timeout=30)
            _run_api(settings, host, port, workers)
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _sigterm_as_sigint() -> None:
    """Make SIGTERM (how systemd, Docker and Kubernetes stop a service) raise KeyboardInterrupt, as SIGINT does.

    uvicorn.run handles both signals itself: it shuts the API down, restores the previous handlers and then
    re-raises the signal. A re-raised SIGINT is a KeyboardInterrupt, which uvicorn.run swallows, so serve
    goes on to stop what it started; a re-raised SIGTERM met the default action and killed the process on
    the spot, leaving the worker and the embedded redis-server running. Now both take SIGINT's path, also
    while serve is still starting (Redis, migrations)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _start_embedded_redis(settings: Settings, children: ExitStack) -> Settings:
    """Without UNLEARN_REDIS_URL: start the embedded Redis, stopped when `children` unwinds, and hand its URL
    to this process's settings and, through the environment, to the worker.

    Only the embedded Redis locks the data dir (a second serve there exits 2): with UNLEARN_REDIS_URL several
    `serve --no-worker` share one data dir by design (README, "Scaling out")."""
    if settings.redis_url is not None:
        return settings
    from service.domain.broker import EmbeddedRedis
    from service.domain.settings import reset_settings_cache

    embedded = EmbeddedRedis(settings.data_dir)
    children.callback(embedded.stop)
    os.environ["UNLEARN_REDIS_URL"] = embedded.start()
    reset_settings_cache()
    return get_settings()


def _start_worker() -> subprocess.Popen[bytes]:
    """`unlearn worker` as a child that the kernel sends SIGTERM if serve dies without stopping it: a Celery
    warm shutdown, which stops its pool children too (Celery gives those PDEATHSIG=SIGKILL itself)."""
    return subprocess.Popen([sys.executable, "-m", "service", "worker"], env=dict(os.environ),
                            preexec_fn=die_with_parent())


def _run_api(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """Serve the API until SIGINT or SIGTERM (in the main thread: the children's PDEATHSIG is tied to it).

    workers > 1: uvicorn's supervisor forks that many API processes sharing the port; each builds its app
    from the environment (service.api.app:serving_app), serves the model and batches its own requests."""
    import uvicorn

    from service.api.app import create_app
    from service.domain.logging import configure_logging

    configure_logging()
    console.print(f"[green]unlearn[/green] API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    database = settings.db_url.split("@")[-1]
    console.print(f"data dir {settings.data_dir}; database {database}; broker {settings.redis_url}")
    console.print("create a key:  unlearn keys create --role requester --tenant acme")
    if workers == 1:
        uvicorn.run(create_app(settings, serve_model=True), host=host, port=port, log_level="info")
        return
    if settings.db_url.startswith("sqlite"):
        console.print(f"[yellow]{workers} API processes on SQLite: writes queue on one file lock; "
                      "use PostgreSQL (UNLEARN_DATABASE_URL) to scale[/yellow]")
    uvicorn.run("service.api.app:serving_app", factory=True, workers=workers, host=host, port=port,
                log_level="info")


def _bootstrap_admin(settings: Settings) -> None:
    if not settings.admin_key:
        return
    from service.domain.db.session import session_scope
    from service.domain.repositories import api_keys

    with session_scope(settings.db_url) as session:
        api_keys.import_key(session, settings.admin_key, role="admin", tenant="*", name="bootstrap (UNLEARN_ADMIN_KEY)")
        session.commit()


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="gpu (training), fusion (single consumer), or both")] = "gpu,fusion",
    concurrency: int = 1,
) -> None:
    """Run a Celery worker (prefork, a fresh child per job so GPU memory is returned after each)."""
    settings = _settings()
    from service.domain.broker import configured_redis_url

    if configured_redis_url(settings) is None:
        console.print("[red]no broker:[/red] set UNLEARN_REDIS_URL or start `unlearn serve` first")
        raise typer.Exit(2)
    from workers.tasks import app as celery_app

    celery_app.worker_main([
        "worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork",
        "--max-tasks-per-child", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        "--hostname", f"unlearn-{os.getpid()}@%h",
    ])


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | requester | auditor | inference")],
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to")],
    name: str | None = None,
) -> None:
    """Create an API key. The key is printed once, as the last line of output."""
    from service.domain.db.session import session_scope
    from service.domain.repositories import api_keys, audit

    settings = _settings()
    _migrate(settings)
    if role not in api_keys.ROLES:
        console.print(f"[red]role must be one of {', '.join(api_keys.ROLES)}[/red]")
        raise typer.Exit(2)
    with session_scope(settings.db_url) as session:
        key, plaintext = api_keys.create_key(session, role, tenant, name)
        created = {"key_id": key.id, "role": role, "tenant": tenant, "name": name}
        audit.append_event(session, "key.created", created, tenant=tenant)
        session.commit()
    console.print(f"created {role} key {key.id} for tenant {tenant} (store it now: it is not shown again)")
    print(plaintext)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="key id or its public prefix")]) -> None:
    """Revoke a key at once (rotation: create the new key, switch clients, revoke the old one)."""
    from service.domain.db.session import session_scope
    from service.domain.repositories import api_keys, audit

    settings = _settings()
    with session_scope(settings.db_url) as session:
        key = api_keys.find_key(session, key_id)
        if key is None:
            console.print(f"[red]no key {key_id}[/red]")
            raise typer.Exit(1)
        api_keys.revoke_key(session, key)
        audit.append_event(session, "key.revoked", {"key_id": key.id}, tenant=key.tenant)
        session.commit()
    console.print(f"revoked {key.id}")


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    from service.domain.db.session import session_scope
    from service.domain.repositories import api_keys

    settings = _settings()
    with session_scope(settings.db_url) as session:
        for key in api_keys.list_keys(session):
            state = "revoked" if key.revoked_at else "active"
            print(f"{key.id}  {key.prefix}  {key.role:10s} {key.tenant:20s} {state}  {key.name or ''}")


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write")],
    tenant: Annotated[str | None, typer.Option(help="that tenant's export: its rows, others redacted")] = None,
) -> None:
    """Sign the head, then export the chain (events, signed checkpoints, public key) for offline verification."""
    from service.domain.audit.service import checkpoint_now, export_chain
    from service.domain.db.session import session_scope

    settings = _settings()
    with session_scope(settings.db_url) as session:
        checkpoint_now(session, settings.data_dir)
        session.commit()
        count = export_chain(session, settings.data_dir, out, tenant=tenant)
    scope = "every tenant" if tenant is None else f"tenant {tenant} in full, others redacted"
    console.print(f"wrote {count} rows ({scope}) to {out}")


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="an export written by `unlearn audit export`")],
    public_key: Annotated[str | None, typer.Option(help="pin the operator's Ed25519 public key (base64)")] = None,
) -> None:
    """Verify an export offline (no database): exit 0 and the head when intact, 1 and the first bad seq if not.

    Without --public-key the key in the export's header is used: that proves integrity since the export,
    pin the operator's published key to also rule out a re-signed forgery."""
    from service.domain.audit.offline import verify_export

    result = verify_export(file, public_key)
    if not result.valid:
        print(f"INVALID: first bad seq {result.first_bad_seq}: {result.reason}")
        raise typer.Exit(1)
    redacted = f" ({result.redacted} of other tenants, redacted)" if result.redacted else ""
    print(f"valid: {result.length} rows{redacted}, head seq {result.head_seq} {result.head_hash}, "
          f"{result.checkpoints} signed checkpoints")
    if result.unproven_through is not None:
        print(f"note: rows up to seq {result.unproven_through} lie before redacted rows in the old hash format, "
              "whose links are taken on trust: only the operator's whole-chain export proves them")


@audit_app.command("public-key")
def audit_public_key() -> None:
    """Print the audit signing key's public half (base64) and its id: publish it, so auditors can pin it."""
    from service.domain.audit.signing import key_id, load_or_create_signing_key, public_key_b64

    public = public_key_b64(load_or_create_signing_key(_settings().data_dir))
    print(f"{public}  key_id {key_id(public)}")


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign the current head of the chain now."""
    from service.domain.audit.service import checkpoint_now
    from service.domain.db.session import session_scope

    settings = _settings()
    with session_scope(settings.db_url) as session:
        signed = checkpoint_now(session, settings.data_dir)
        session.commit()
    print("empty chain" if signed is None else f"signed head seq {signed['seq']} {signed['row_hash']}")


app.command("forget", help="Unlearn data from a model offline (no service needed).")(forget_command)
app.command("export", help="Write a model version as a standard Hugging Face model directory.")(export_command)


def _register_bench_commands() -> None:
    """`unlearn bench ...` (benchmarks/): registered when the package is importable (a source checkout)."""
    try:
        from benchmarks.cli import bench_app
    except ImportError:
        return
    app.add_typer(bench_app, name="bench")


_register_bench_commands()
