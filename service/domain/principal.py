"""Who is acting: an API key's id, role and tenant. Admin keys see all tenants, every other role its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str
    tenant: str

    @property
    def tenant_scope(self) -> str | None:
        """Tenant filter for queries: None (all tenants) for admins."""
        return None if self.role == "admin" else self.tenant
