"""FastAPI dependency aliases: keep route signatures one line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.api import ratelimit
from service.api.auth import authenticate, bearer_token, require_role
from service.domain.broker import configured_redis_url
from service.domain.db.session import get_sessionmaker
from service.domain.principal import Principal
from service.domain.rates import parse_rate
from service.domain.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.db_url)()
    try:
        yield session
    finally:
        session.close()  # uncommitted work is rolled back: the route commits explicitly


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request, session: SessionDep) -> Principal:
    principal = authenticate(session, bearer_token(request))
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def role(*roles: str) -> Callable[[Principal], Principal]:
    def check(principal: PrincipalDep) -> Principal:
        require_role(principal, *roles)
        return principal

    return check


def rate_limited(scope: str, setting: str, *roles: str) -> Callable[..., Principal]:
    """Role check, then one hit on the key's budget for `scope` (Settings.<setting>, e.g. "30/minute")."""

    def check(principal: PrincipalDep, settings: SettingsDep) -> Principal:
        require_role(principal, *roles)
        rate_text = getattr(settings, setting)
        url = configured_redis_url(settings)
        if rate_text and url is not None:
            ratelimit.hit(url, scope, principal.key_id, parse_rate(rate_text))
        return principal

    return check


# the role checks by name (the console applies the same ones to its cookie's key)
can_request = role("requester")
can_submit = rate_limited("submit", "rate_limit_requests", "requester")
can_read = role("requester", "auditor")
can_audit = role("auditor")
is_admin = role()

RequesterDep = Annotated[Principal, Depends(can_request)]
SubmitterDep = Annotated[Principal, Depends(can_submit)]
ReaderDep = Annotated[Principal, Depends(can_read)]
AuditorDep = Annotated[Principal, Depends(can_audit)]
AdminDep = Annotated[Principal, Depends(is_admin)]
InferenceDep = Annotated[Principal, Depends(role("inference"))]
GenerateDep = Annotated[Principal, Depends(rate_limited("inference", "rate_limit_inference", "inference"))]
