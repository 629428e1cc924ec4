"""Bearer-key authentication and role checks. Every key has one role and one tenant; admin keys see all
tenants (operators), every other role sees only its own tenant."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from service.domain.errors import Forbidden, Unauthorized
from service.domain.principal import Principal
from service.domain.repositories import api_keys


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def authenticate(session: Session, token: str) -> Principal:
    key = api_keys.authenticate(session, token)
    session.commit()  # end the read transaction: later writes start from a fresh snapshot (SQLite WAL)
    if key is None:
        raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return Principal(key_id=key.id, role=key.role, tenant=key.tenant)


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role != "admin" and principal.role not in roles:
        raise Forbidden(f"role '{principal.role}' may not do this; needs one of: {', '.join(('admin',) + roles)}")
