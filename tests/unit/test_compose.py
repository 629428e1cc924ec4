"""docker/compose.yaml and the Dockerfiles, checked for structure (Docker cannot run in CI): the services,
health checks, start order, GPU reservation, the single fusion consumer, the shared data volume, and every
UNLEARN_* variable being a real setting with a valid value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.domain.settings import Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
UNLEARN_SERVICES = ("api", "worker-gpu", "worker-fusion")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def command_text(service: str) -> str:
    command = SERVICES[service]["command"]
    return command if isinstance(command, str) else " ".join(command)


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_all_services_are_defined():
    assert set(SERVICES) >= {"postgres", "redis", "api", "worker-gpu", "worker-fusion", "flower"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_has_a_healthcheck(service):
    check = SERVICES[service]["healthcheck"]
    assert check["test"] and check.get("interval") and check.get("retries", 0) >= 1


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_dependency_waits_for_health(service):
    for name, condition in SERVICES[service].get("depends_on", {}).items():
        assert name in SERVICES
        assert condition == {"condition": "service_healthy"}, f"{service} -> {name}"


@pytest.mark.parametrize("service,needs", [
    ("api", {"postgres", "redis"}), ("worker-gpu", {"postgres", "redis", "api"}),
    ("worker-fusion", {"postgres", "redis", "api"}), ("flower", {"redis"}),
])
def test_start_order(service, needs):
    assert set(SERVICES[service]["depends_on"]) >= needs


def test_redis_keeps_messages_append_only_and_never_evicts():
    command = command_text("redis")
    assert re.search(r"--appendonly\s+yes", command)
    assert re.search(r"--maxmemory-policy\s+noeviction", command)
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_api_migrates_first_then_serves_without_a_worker_on_all_interfaces():
    command = command_text("api")
    assert "unlearn migrate" in command or "alembic upgrade head" in command
    migrate_at = max(command.find("unlearn migrate"), command.find("alembic upgrade head"))
    serve_at = command.find("unlearn serve")
    assert 0 <= migrate_at < serve_at and "&&" in command[migrate_at:serve_at]
    assert "--no-worker" in command and "--host 0.0.0.0" in command


def gpu_devices(service: str) -> list[dict]:
    return SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]


@pytest.mark.parametrize("service", ["worker-gpu", "worker-fusion"])
def test_workers_reserve_one_nvidia_gpu(service):
    [device] = gpu_devices(service)
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]


def test_workers_consume_their_queues():
    assert re.search(r"unlearn worker --queues gpu\b", command_text("worker-gpu"))
    assert re.search(r"unlearn worker --queues fusion\b", command_text("worker-fusion"))
    assert "fusion" not in command_text("worker-gpu")


def test_exactly_one_fusion_consumer():
    assert SERVICES["worker-fusion"]["deploy"]["replicas"] == 1
    consumers = [
        s for s in SERVICES if "--queues" in str(SERVICES[s].get("command", "")) and "fusion" in command_text(s)
    ]
    assert consumers == ["worker-fusion"]


def test_api_and_workers_share_one_data_volume_at_the_data_dir():
    mounts = set()
    for service in UNLEARN_SERVICES:
        data_dir = environment(service)["UNLEARN_DATA_DIR"]
        [volume] = [v.split(":")[0] for v in SERVICES[service]["volumes"] if v.split(":")[1] == data_dir]
        mounts.add(volume)
    assert len(mounts) == 1 and mounts.pop() in COMPOSE["volumes"]


def test_api_and_workers_use_postgres_and_redis_services():
    for service in UNLEARN_SERVICES:
        env = environment(service)
        assert (env["UNLEARN_DATABASE_URL"].startswith("postgresql+psycopg://")
                and "@postgres:5432/" in env["UNLEARN_DATABASE_URL"])
        assert env["UNLEARN_REDIS_URL"].startswith("redis://redis:6379/")


def unlearn_names_in_files() -> set[str]:
    text = "\n".join(p.read_text() for p in DOCKER.iterdir() if p.is_file())
    return set(re.findall(r"\bUNLEARN_[A-Z0-9_]+", text))


def test_every_unlearn_variable_is_a_setting():
    fields = {f"UNLEARN_{name.upper()}" for name in Settings.model_fields}
    unknown = unlearn_names_in_files() - fields
    assert not unknown, f"not fields of service.domain.settings.Settings: {sorted(unknown)}"


@pytest.mark.parametrize("service", UNLEARN_SERVICES)
def test_environment_values_are_valid_settings(service, tmp_path):
    """${VAR:-default} resolved to its default: the settings each container starts with must validate."""
    values = {}
    for name, raw in environment(service).items():
        if name.startswith("UNLEARN_"):
            value = INTERPOLATION.sub(lambda m: m.group(2) or "", str(raw))
            values[name.removeprefix("UNLEARN_").lower()] = value
    values["data_dir"] = tmp_path
    Settings(_env_file=None, **values)


def test_api_image_is_python_311_slim_with_cpu_torch():
    dockerfile = (DOCKER / "Dockerfile.api").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "download.pytorch.org/whl/cpu" in dockerfile


def test_worker_image_is_cuda_with_cuda_torch():
    dockerfile = (DOCKER / "Dockerfile.worker").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime", dockerfile, re.M)
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", dockerfile)


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_images_run_as_a_non_root_user_with_the_data_volume(name):
    dockerfile = (DOCKER / name).read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert 'VOLUME ["/data"]' in dockerfile and "UNLEARN_DATA_DIR=/data" in dockerfile
