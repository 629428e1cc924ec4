"""Tenant isolation (OWASP API1) and mass assignment: every route of the OpenAPI schema x (own tenant,
other tenant, no key, wrong role), on the real app, database (SQLite and PostgreSQL) and Redis.

A new route without a row in MATRIX fails `test_matrix_covers_every_route_of_the_schema`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select

from service.domain.db.models import AuditEvent, DeletionRequest, ForgetPayload, Job
from service.domain.db.session import session_scope

pytestmark = pytest.mark.integration

BODY = {"subject_ref": "case-7", "reason": "gdpr_art17", "forget": [{"text": "Jane Roe was born in Tromso."}]}
CHAT = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny-random-llama", "prompt": "hi", "max_tokens": 4}
ROLES = ("requester", "auditor", "inference")


@dataclass(frozen=True)
class Route:
    roles: tuple[str, ...] | None  # roles allowed besides admin; () = admin only; None = public
    owned: str | None = None  # "item": the path names one tenant's resource; "list": rows are filtered
    own_status: int = 200
    body: dict | None = None

    def wrong_role(self) -> str:
        return next(r for r in ROLES if r not in (self.roles or ()))

    def allowed_role(self) -> str:
        return self.roles[0] if self.roles else "admin"


MATRIX: dict[tuple[str, str], Route] = {
    ("GET", "/healthz"): Route(None),
    ("GET", "/readyz"): Route(None),
    ("POST", "/v1/deletion-requests"): Route(("requester",), own_status=202, body=BODY),
    ("GET", "/v1/deletion-requests"): Route(("requester", "auditor"), owned="list"),
    ("GET", "/v1/deletion-requests/{request_id}"): Route(("requester", "auditor"), owned="item"),
    ("GET", "/v1/jobs/{job_id}"): Route(("requester", "auditor"), owned="item"),
    ("POST", "/v1/jobs/{job_id}/cancel"): Route(("requester",), owned="item", own_status=202),
    # admin only (all tenants); the owned request's job is still queued: nothing to withdraw yet
    ("POST", "/v1/deletion-requests/{request_id}/withdraw"): Route((), own_status=409, body={"reason": "duplicate"}),
    ("GET", "/v1/audit"): Route(("auditor",), owned="list"),
    ("GET", "/v1/audit/verify"): Route(("auditor",)),
    # JSON Lines, not a page: other tenants' rows redacted (test_audit_trail checks what it holds)
    ("POST", "/v1/audit/export"): Route(("auditor",)),
    ("GET", "/v1/model-versions"): Route(()),
    ("POST", "/v1/model-versions/{version}/activate"): Route(()),
    # the `api` app serves no model: a request that passes auth gets 503, never 401/403
    ("POST", "/v1/chat/completions"): Route(("inference",), own_status=503, body=CHAT),
    ("POST", "/v1/completions"): Route(("inference",), own_status=503, body=COMPLETION),
    ("GET", "/v1/models"): Route(("inference",), own_status=503),
}


def test_matrix_covers_every_route_of_the_schema(make_settings):
    from service.api.app import create_app

    app = create_app(make_settings(redis_url="redis://127.0.0.1:6379/9"))
    routes = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    assert routes == set(MATRIX), f"routes without an isolation row: {routes - set(MATRIX)}"
    for (method, path), route in MATRIX.items():  # the schema declares bearer auth exactly where it is needed
        declared = app.openapi()["paths"][path][method.lower()].get("security")
        assert (declared == [{"bearerAuth": []}]) == (route.roles is not None), (method, path)


@dataclass
class Owned:
    """acme's deletion request, job and audit events; the callers of every cell."""

    request_id: str
    job_id: str
    key: Callable[..., dict[str, str]]

    def path(self, template: str) -> str:
        return template.format(request_id=self.request_id, job_id=self.job_id, version=0)


@pytest.fixture
def owned(api, make_key) -> Owned:
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key("requester", "acme"))
    assert created.status_code == 202
    return Owned(created.json()["id"], created.json()["job"]["id"], make_key)


def call(api, method: str, path: str, route: Route, headers: dict[str, str] | None = None):
    return api.request(method, path, json=route.body, headers=headers or {})


def ids_in(response) -> set[str]:
    return {row.get("request_id") or row.get("id") for row in response.json()["data"]}


@pytest.mark.parametrize("method,template", sorted(MATRIX))
def test_no_key_and_bad_key_get_401(api, owned, method, template):
    route = MATRIX[(method, template)]
    path = owned.path(template)
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic abc"}):
        response = call(api, method, path, route, headers)
        if route.roles is None:
            assert response.status_code == 200
        else:
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
            assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("method,template", sorted(k for k, r in MATRIX.items() if r.roles is not None))
def test_wrong_role_gets_403(api, owned, method, template):
    route = MATRIX[(method, template)]
    response = call(api, method, owned.path(template), route, owned.key(route.wrong_role(), "acme"))
    assert response.status_code == 403, response.text
    assert response.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("method,template", sorted(k for k, r in MATRIX.items() if r.owned == "item"))
def test_other_tenant_gets_404_for_a_tenant_owned_resource(api, owned, method, template):
    route = MATRIX[(method, template)]
    for role in route.roles or ():
        response = call(api, method, owned.path(template), route, owned.key(role, "globex"))
        assert response.status_code == 404, (role, response.text)
        # indistinguishable from an id that does not exist: no existence oracle across tenants
        missing = Owned("00000000-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000001", owned.key)
        absent = call(api, method, missing.path(template), route, owned.key(role, "globex"))
        assert absent.status_code == 404
        assert response.json()["error"]["code"] == absent.json()["error"]["code"]
        assert "tenant" not in response.text and "acme" not in response.text
    job = api.get(f"/v1/jobs/{owned.job_id}", headers=owned.key("requester", "acme")).json()
    assert job["status"] == "queued" and job["cancel_requested"] is False  # the 404 changed nothing


@pytest.mark.parametrize("method,template", sorted(k for k, r in MATRIX.items() if r.owned == "list"))
def test_other_tenant_list_omits_the_tenants_rows(api, owned, method, template):
    route = MATRIX[(method, template)]
    for role in route.roles or ():
        response = call(api, method, owned.path(template), route, owned.key(role, "globex"))
        assert response.status_code == 200
        assert owned.request_id not in ids_in(response)
        assert all(row.get("tenant") in (None, "globex") for row in response.json()["data"])
    mine = call(api, method, owned.path(template), route, owned.key(route.roles[-1], "acme"))
    assert owned.request_id in ids_in(mine)


@pytest.mark.parametrize("method,template", sorted(k for k, r in MATRIX.items() if r.roles is not None))
def test_own_tenant_with_an_allowed_role_gets_through(api, owned, method, template):
    route = MATRIX[(method, template)]
    for role in (route.allowed_role(), "admin"):
        if (method, template) == ("POST", "/v1/jobs/{job_id}/cancel") and role == "admin":
            continue  # the first cancel ended the job; a second is a 409
        response = call(api, method, owned.path(template), route, owned.key(role, "acme"))
        assert response.status_code == route.own_status, (role, response.text)


@pytest.mark.parametrize("method,template", sorted(k for k, r in MATRIX.items() if r.owned is None and r.roles))
def test_other_tenant_with_an_allowed_role_is_not_tenant_scoped_here(api, owned, method, template):
    """Routes with no tenant-owned resource answer the same to any tenant's key of the right role."""
    route = MATRIX[(method, template)]
    response = call(api, method, owned.path(template), route, owned.key(route.allowed_role(), "globex"))
    assert response.status_code == route.own_status


def test_admin_sees_every_tenant(api, owned):
    response = api.get(f"/v1/jobs/{owned.job_id}", headers=owned.key("admin", "ops"))
    assert response.status_code == 200 and response.json()["request_id"] == owned.request_id


# ------------------------------------------------------------------ mass assignment


def row_counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m))
                for m in (DeletionRequest, ForgetPayload, Job, AuditEvent)}


@pytest.mark.parametrize("extra", [
    {"tenant": "globex"}, {"status": "succeeded"}, {"model_version": 3}, {"version": 3}, {"id": "x"},
    {"created_by": "k"}, {"job": {"status": "succeeded"}}, {"payload_digest": "0" * 64},
])
def test_server_owned_fields_in_the_body_are_refused(api, make_key, extra):
    before = row_counts(api.settings.db_url)
    response = api.post("/v1/deletion-requests", json={**BODY, **extra}, headers=make_key())
    assert response.status_code == 422
    assert response.json()["error"]["param"] == next(iter(extra))
    assert row_counts(api.settings.db_url) == before


@pytest.mark.parametrize("where", ["forget_item", "params"])
def test_server_owned_fields_nested_in_the_body_are_refused(api, make_key, where):
    body = {**BODY, "forget": [{"text": "x y z", "tenant": "globex"}]} if where == "forget_item" else \
        {**BODY, "params": {"steps": 3, "status": "succeeded"}}
    before = row_counts(api.settings.db_url)
    assert api.post("/v1/deletion-requests", json=body, headers=make_key()).status_code == 422
    assert row_counts(api.settings.db_url) == before


def test_created_request_belongs_to_the_keys_tenant(api, make_key):
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key("requester", "acme")).json()
    assert created["tenant"] == "acme" and created["job"]["status"] == "queued"
    assert created["job"]["model_version"] is None
