"""GET/POST /console: the compliance web console, server-rendered HTML over the JSON API's own code.

Thin on purpose: every page calls the v1 route functions (the same queries, tenant scoping and view builders)
and applies the same role check as its v1 counterpart (the named checks in service.api.deps, so a rule lives
in one place). What the console adds is only the browser's side:
- sign-in: the API key is kept in a cookie (HttpOnly, SameSite=Strict, Path=/console, Secure over https),
  checked on every request like a bearer key (a revoked key is signed out at once); never in a URL or a page;
- CSRF: SameSite=Strict first, and every POST but sign-in carries a token (HMAC of the cookie under a key
  derived from the service's secret) in a hidden field; missing or wrong -> 403; sign-in itself (no cookie
  yet) is refused when its Origin header names another site;
- errors as HTML pages with the API's status and message; a page without a valid cookie -> 303 to sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_args
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from pydantic import ValidationError

from service.api.auth import authenticate
from service.api.console import STATIC_URL, TEMPLATES_DIR
from service.api.console.charts import before_after_bars
from service.api.deps import SessionDep, SettingsDep, can_audit, can_read, can_request, can_submit, is_admin
from service.api.errors import validation_error_items
from service.api.routers import audit as audit_api
from service.api.routers import deletion_requests as requests_api
from service.api.routers import model_versions as versions_api
from service.domain.errors import Forbidden, NotFound, ServiceError, Unauthorized
from service.domain.job_states import ENDED
from service.domain.principal import Principal
from service.domain.repositories import audit, model_versions
from service.domain.submission import DeletionRequestCreate, Method, Reason

COOKIE = "unlearn_console"
SIGN_IN = "/console/sign-in"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
PAIR_SEPARATOR = " => "  # a forget/retain line "prompt => answer" is a question/answer pair
REFRESH_SECONDS = 3  # pages with a running job reload themselves (a meta refresh: the console has no script)

templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True))

class SignInRequired(Exception):
    """No cookie, or its key is unknown or revoked: answer with a redirect to the sign-in page."""


# ---------------------------------------------------------------- errors as pages, security headers


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    principal = getattr(request.state, "principal", None)
    base = {"principal": principal, "nav": _nav(principal), "csrf_token": _csrf_token(request), "static": STATIC_URL}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def _error_page(request: Request, status_code: int, message: str) -> Response:
    return _page(request, "error.html", {"status_code": status_code, "message": message}, status_code)


def _to_sign_in() -> Response:
    response = RedirectResponse(SIGN_IN, status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


class ConsoleRoute(APIRoute):
    """Errors of the domain and of validation become HTML pages with the same status and message the JSON API
    would give; every console response carries the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired:
                response = _to_sign_in()
            except ServiceError as exc:
                response = _error_page(request, exc.status_code, exc.message)
            except RequestValidationError as exc:
                messages = validation_error_items(exc.errors())
                response = _error_page(request, 422, "; ".join(f"{e['param']}: {e['message']}" for e in messages))
            for header, value in SECURITY_HEADERS.items():
                response.headers.setdefault(header, value)
            return response

        return console_handler


router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False, route_class=ConsoleRoute)


# ---------------------------------------------------------------- sign-in and CSRF


def signed_in(request: Request, session: SessionDep) -> Principal:
    """The principal of the console cookie's key, checked exactly like a bearer key."""
    token = request.cookies.get(COOKIE)
    if not token:
        raise SignInRequired
    try:
        principal = authenticate(session, token)
    except Unauthorized:
        raise SignInRequired from None
    request.state.principal = principal
    return principal


SignedInDep = Annotated[Principal, Depends(signed_in)]


def _csrf_token(request: Request) -> str | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    secret = hmac.new(request.app.state.hmac_key, b"unlearn-console-csrf/1", hashlib.sha256).digest()
    return hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()


async def csrf_checked(request: Request, principal: SignedInDep) -> Principal:
    """A signed-in POST whose form carries this session's CSRF token."""
    sent = (await request.form()).get("csrf_token")
    expected = _csrf_token(request)
    if not isinstance(sent, str) or expected is None or not hmac.compare_digest(sent, expected):
        raise Forbidden("missing or invalid CSRF token: reload the page and try again")
    return principal


CsrfDep = Annotated[Principal, Depends(csrf_checked)]


def _same_rule_as(check: Callable[..., Principal], *, post: bool = False) -> Any:
    """A console dependency applying one of service.api.deps' named checks (its roles, and for submissions
    the same rate budget) to the console's signed-in (and for POSTs, CSRF-checked) key."""
    takes_settings = "settings" in inspect.signature(check).parameters

    def from_cookie(principal: SignedInDep, settings: SettingsDep) -> Principal:
        return check(principal, settings) if takes_settings else check(principal)

    def from_form(principal: CsrfDep, settings: SettingsDep) -> Principal:
        return check(principal, settings) if takes_settings else check(principal)

    return Annotated[Principal, Depends(from_form if post else from_cookie)]


def _allowed(check: Callable[[Principal], Principal], principal: Principal | None) -> bool:
    if principal is None:
        return False
    try:
        check(principal)
    except Forbidden:
        return False
    return True


def _nav(principal: Principal | None) -> list[tuple[str, str]]:
    links = [("/console", "Requests", can_read), ("/console/requests/new", "New request", can_request),
             ("/console/audit", "Audit log", can_audit), ("/console/versions", "Model versions", is_admin)]
    return [(href, label) for href, label, check in links if _allowed(check, principal)]


Reader = _same_rule_as(can_read)
Requester = _same_rule_as(can_request)
Submitter = _same_rule_as(can_submit, post=True)
Auditor = _same_rule_as(can_audit)
Admin = _same_rule_as(is_admin)
AdminPost = _same_rule_as(is_admin, post=True)
AuditorPost = _same_rule_as(can_audit, post=True)


@router.get("/sign-in")
def sign_in_form(request: Request) -> Response:
    return _page(request, "sign_in.html", {"error": None})


@router.post("/sign-in")
def sign_in(request: Request, session: SessionDep, api_key: Annotated[str, Form()] = "") -> Response:
    """A valid key -> the session cookie and 303 to /console; a wrong or revoked one -> the form again (401).
    A sign-in posted from another site is refused (403): it would sign the browser in with someone else's key."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.url.netloc:
        raise Forbidden("sign-in must be posted from this console's own page")
    try:
        authenticate(session, api_key.strip())
    except Unauthorized as exc:
        return _page(request, "sign_in.html", {"error": exc.message}, status_code=401)
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(COOKIE, api_key.strip(), path="/console", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/sign-out")
def sign_out(principal: CsrfDep) -> Response:
    return _to_sign_in()


# ---------------------------------------------------------------- deletion requests


@router.get("")
def request_list(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Reader,
    offset: requests_api.PageOffset = 0, limit: requests_api.PageLimit = 50,
) -> Response:
    page = requests_api.list_deletion_requests(
        session, settings, principal, status=None, subject_ref=None, since=None, until=None, offset=offset, limit=limit
    )
    live = any(item.job.status not in ENDED for item in page.data)
    return _page(request, "requests.html", {"page": page, "can_submit": _allowed(can_request, principal),
                                            "refresh_seconds": REFRESH_SECONDS if live else None})


def _blank_form() -> dict[str, str]:
    return {"subject_ref": "", "reason": "", "forget": "", "retain": "", "method": "",
            "idempotency_key": uuid.uuid4().hex}


def _form_page(
    request: Request, values: dict[str, str], errors: list[dict[str, Any]], status_code: int = 200
) -> Response:
    by_field: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        by_field.setdefault(str(error.get("param") or "").split(".")[0], []).append(error)
    context = {"values": values, "errors": errors, "by_field": by_field, "reasons": get_args(Reason),
               "methods": get_args(Method), "separator": PAIR_SEPARATOR.strip()}
    return _page(request, "submit.html", context, status_code)


@router.get("/requests/new")
def submit_form(request: Request, principal: Requester) -> Response:
    return _form_page(request, _blank_form(), [])


def _items(text: str) -> list[dict[str, str]]:
    """One item per non-empty line: "text", or "prompt => answer" for a question/answer pair."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        prompt, separator, answer = line.partition(PAIR_SEPARATOR)
        rows.append({"prompt": prompt.strip(), "answer": answer.strip()} if separator else {"text": line.strip()})
    return rows


@router.post("/requests")
async def submit(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Submitter,
    subject_ref: Annotated[str, Form()] = "", reason: Annotated[str, Form()] = "",
    forget: Annotated[str, Form()] = "", retain: Annotated[str, Form()] = "", method: Annotated[str, Form()] = "",
    idempotency_key: Annotated[str, Form()] = "",
) -> Response:
    """The form, through the v1 schema and route: same validation messages, same submission, enqueued the same
    way after commit. The form's one-time key makes a double submit one request."""
    values = {"subject_ref": subject_ref, "reason": reason, "forget": forget, "retain": retain, "method": method,
              "idempotency_key": idempotency_key}
    data: dict[str, Any] = {"subject_ref": subject_ref, "forget": _items(forget), "retain": _items(retain)}
    if reason:
        data["reason"] = reason
    if method:
        data["method"] = method
    try:
        body = DeletionRequestCreate.model_validate(data)
    except ValidationError as exc:
        return _form_page(request, values, validation_error_items(exc.errors()), 422)
    once = idempotency_key if re.fullmatch(r"[0-9a-f]{32}", idempotency_key) else None
    try:
        created = await run_in_threadpool(
            requests_api.create_deletion_request, body, request, Response(), session, settings, principal, once
        )
    except ServiceError as exc:
        error = {"param": exc.param, "message": exc.message, **({"limit": exc.details["limit"]}
                                                                 if "limit" in exc.details else {})}
        return _form_page(request, values, [error], exc.status_code)
    return RedirectResponse(f"/console/requests/{created.id}", status_code=303)


def _metric_rows(metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    """metrics.before / metrics.after as rows (section, metric, before, after) of their numbers."""
    before, after = (metrics or {}).get("before") or {}, (metrics or {}).get("after") or {}
    rows = []
    for section in sorted(set(before) | set(after)):
        b, a = before.get(section), after.get(section)
        b, a = b if isinstance(b, dict) else {}, a if isinstance(a, dict) else {}
        for name in sorted(set(b) | set(a)):
            pair = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in (b.get(name),
                                                                                                     a.get(name))]
            if pair != [None, None]:
                rows.append({"section": section, "metric": name, "before": pair[0], "after": pair[1]})
    return rows


@router.get("/requests/{request_id}")
def request_detail(request: Request, request_id: str, session: SessionDep, principal: Reader) -> Response:
    found = requests_api.get_deletion_request(request_id, session, principal)
    events = None
    if _allowed(can_audit, principal):  # the audit log is the auditor's, as in the JSON API
        events = audit_api.list_audit_events(session, principal, cursor=0, limit=500, type=None,
                                             request_id=request_id, subject_ref=None, since=None, until=None).data
    verdict = found.job.verdict or {}
    rows = _metric_rows(found.job.metrics)
    checks = [{"name": name, **check} for name, check in (verdict.get("checks") or {}).items() if check]
    return _page(request, "request.html", {
        "item": found, "job": found.job, "checks": checks, "verdict": verdict, "events": events,
        "metric_rows": rows, "bars": before_after_bars(rows), "ended": found.job.status in ENDED,
        "refresh_seconds": None if found.job.status in ENDED else REFRESH_SECONDS,
    })


# ---------------------------------------------------------------- audit


@router.get("/audit")
def audit_page(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Auditor,
    cursor: audit_api.Cursor = 0, limit: audit_api.Limit = 100, type: audit_api.EventType = None,  # noqa: A002
    request_id: audit_api.RequestId = None,
) -> Response:
    event_type, request_id = type or None, request_id or None  # an empty filter box means no filter
    page = audit_api.list_audit_events(session, principal, cursor=cursor, limit=limit, type=event_type,
                                       request_id=request_id, subject_ref=None, since=None, until=None)
    return _page(request, "audit.html", {
        "page": page, "verification": audit_api.verify_audit_chain(session, settings, principal),
        "checkpoint": audit.latest_checkpoint(session),
        "filters": {"type": event_type or "", "request_id": request_id or ""},
        "limit": limit,
    })


@router.post("/audit/export")
def audit_export(session: SessionDep, settings: SettingsDep, principal: AuditorPost) -> Response:
    """The v1 export: signs the head, then the auditor's tenant view (admin: the whole chain) as the JSONL
    that `unlearn audit verify` checks offline."""
    return audit_api.export_audit_chain(session, settings, principal, tenant=None)


# ---------------------------------------------------------------- model versions


@router.get("/versions")
def versions_page(request: Request, session: SessionDep, settings: SettingsDep, principal: Admin) -> Response:
    return _page(request, "versions.html", {"versions": versions_api.list_model_versions(session, settings, principal)})


@router.get("/versions/{version}/activate")
def activate_confirm(request: Request, version: versions_api.VersionNumber, session: SessionDep, settings: SettingsDep,
                     principal: Admin) -> Response:
    listing = versions_api.list_model_versions(session, settings, principal)
    if version not in {v.version for v in listing.data}:
        raise NotFound(f"model version {version} not found", param="version")
    reexposed = model_versions.requests_not_in(session, version, than=listing.active_version)
    return _page(request, "activate.html", {"version": version, "active": listing.active_version,
                                            "reexposed": reexposed})


@router.post("/versions/{version}/activate")
def activate(
    version: versions_api.VersionNumber, session: SessionDep, settings: SettingsDep, principal: AdminPost,
) -> Response:
    versions_api.activate_model_version(version, session=session, settings=settings, principal=principal)
    return RedirectResponse("/console/versions", status_code=303)
