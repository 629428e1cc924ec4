"""`unlearn` command line: serve, worker, migrate, keys, audit, forget, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from service.commands.export import export as export_command
from service.commands.forget import forget as forget_command
from service.settings import ConfigError, Settings, check_data_dir, get_settings

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
    from service.db.migrate import upgrade
    from service.db.session import ping

    try:
        ping(settings.db_url)
    except Exception as exc:
        raise ConfigError(f"database {settings.db_url.split('@')[-1]} is not reachable: {type(exc).__name__}: {exc}") from exc
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
) -> None:
    """Start everything on one machine: embedded Redis (unless UNLEARN_REDIS_URL), migrations, one worker, the API."""
    import uvicorn

    from service.app import create_app
    from service.broker import EmbeddedRedis, check_redis
    from service.logging import configure_logging
    from service.settings import reset_settings_cache

    settings = _settings()
    embedded = None
    worker = None
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir)
            os.environ["UNLEARN_REDIS_URL"] = embedded.start()
            reset_settings_cache()
            settings = get_settings()
        check_redis(settings.redis_url or "")
        _migrate(settings)
        _bootstrap_admin(settings)
        if not no_worker:
            worker = subprocess.Popen([sys.executable, "-m", "service", "worker"], env=dict(os.environ))
        configure_logging()
        console.print(f"[green]unlearn[/green] API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
        console.print(f"data dir {settings.data_dir}; database {settings.db_url.split('@')[-1]}; broker {settings.redis_url}")
        console.print("create a key:  unlearn keys create --role requester --tenant acme")
        uvicorn.run(create_app(settings, serve_model=True), host=host, port=port, log_level="info")
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if embedded is not None:
            embedded.stop()


def _bootstrap_admin(settings: Settings) -> None:
    if not settings.admin_key:
        return
    from service.db.session import session_scope
    from service.repositories import api_keys

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
    from service.broker import configured_redis_url

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
    name: Optional[str] = None,
) -> None:
    """Create an API key. The key is printed once, as the last line of output."""
    from service.db.session import session_scope
    from service.repositories import api_keys, audit

    settings = _settings()
    _migrate(settings)
    if role not in api_keys.ROLES:
        console.print(f"[red]role must be one of {', '.join(api_keys.ROLES)}[/red]")
        raise typer.Exit(2)
    with session_scope(settings.db_url) as session:
        key, plaintext = api_keys.create_key(session, role, tenant, name)
        audit.append_event(session, "key.created", {"key_id": key.id, "role": role, "tenant": tenant, "name": name}, tenant=tenant)
        session.commit()
    console.print(f"created {role} key {key.id} for tenant {tenant} (store it now: it is not shown again)")
    print(plaintext)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="key id or its public prefix")]) -> None:
    """Revoke a key at once (rotation: create the new key, switch clients, revoke the old one)."""
    from service.db.session import session_scope
    from service.repositories import api_keys, audit

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
    from service.db.session import session_scope
    from service.repositories import api_keys

    settings = _settings()
    with session_scope(settings.db_url) as session:
        for key in api_keys.list_keys(session):
            state = "revoked" if key.revoked_at else "active"
            print(f"{key.id}  {key.prefix}  {key.role:10s} {key.tenant:20s} {state}  {key.name or ''}")


@audit_app.command("export")
def audit_export(out: Annotated[Path, typer.Option("--out", help="JSONL file to write")]) -> None:
    """Export events, signed checkpoints and the public key for offline verification."""
    from service.audit.service import checkpoint_now, export_jsonl
    from service.db.session import session_scope

    settings = _settings()
    with session_scope(settings.db_url) as session:
        checkpoint_now(session, settings.data_dir)
        session.commit()
        count = export_jsonl(session, settings.data_dir, out)
    console.print(f"wrote {count} events to {out}")


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="an export written by `unlearn audit export`")],
    public_key: Annotated[Optional[str], typer.Option(help="pin the operator's Ed25519 public key (base64)")] = None,
) -> None:
    """Verify an export offline (no database): exit 0 and the head when intact, 1 and the first bad seq if not.

    Without --public-key the key in the export's header is used: that proves integrity since the export,
    pin the operator's published key to also rule out a re-signed forgery."""
    from service.audit.offline import verify_export

    result = verify_export(file, public_key)
    if result.valid:
        print(f"valid: {result.length} events, head seq {result.head_seq} {result.head_hash}")
        return
    print(f"INVALID: first bad seq {result.first_bad_seq}: {result.reason}")
    raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign the current head of the chain now."""
    from service.audit.service import checkpoint_now
    from service.db.session import session_scope

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
