"""Sealed probes: how every later model version answers for an earlier request after its raw text is purged.

When a job ends `forgotten`, the request's forget items are sealed in the same transaction that purges the
payload: encrypted with AES-256-GCM under a key made for that request alone (the request id is the
associated data, so a ciphertext cannot be passed off as another request's). The ciphertext goes to the
`request_probes` table; the key to a 0600 file under <data_dir>/keys/probes/, never into the database, so
a database dump or backup holds no readable forget text. The row also keeps, as plain numbers, what the
request was accepted on: its forget metrics on the base model and the verdict thresholds.

Publishing a new version opens the probes of every request in its lineage and checks each against the
candidate model (workers/verification.py `reverify`); a request that came back keeps the version from
being published.

The request's own fusion terms (its Gram matrices and G_i W_i, workers/engine/fusion.py `contribution`)
are sealed under the same key, in a file under <data_dir>/store/contributions/: withdrawing the request
subtracts them from a version's sums (service/domain/withdrawals.py).

At the end of the retention window (UNLEARN_PROBE_RETENTION_DAYS) the sweeper deletes the key file, then
the contribution file and the ciphertext (crypto-shredding: with the key gone, any copy of the ciphertext
is noise). From then on later versions list the request as not re-verifiable, and it can no longer be
withdrawn. Sealing and shredding are both audited; neither event holds any of the text. Retention 0 seals
nothing: no text outlives the job, nothing is re-verified, no request can be withdrawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from sqlalchemy.orm import Session

from service.domain.audit.keyfile import keys_dir
from service.domain.db.models import RequestProbe, utcnow
from service.domain.repositories import audit, probes
from service.domain.sealing import Sealer
from service.domain.settings import Settings
from workers.engine.files import fsync_dir, replace_synced


@dataclass(frozen=True)
class OpenedProbe:
    """One earlier request's items, decrypted for a check in this process only (never logged or stored)."""

    request_id: str
    tenant: str
    items: list[dict[str, Any]]  # the forget rows as submitted ({text} or {prompt, answer})
    baseline: dict[str, Any]  # {"before": forget metrics on the base model, "thresholds": its verdict's}


@dataclass(frozen=True)
class Lineage:
    """The requests of a version's lineage: those whose probes opened, and why the others cannot be checked."""

    opened: list[OpenedProbe] = field(default_factory=list)
    unverifiable: dict[str, str] = field(default_factory=dict)  # request id -> reason


def key_path(settings: Settings, request_id: str) -> Path:
    folder = keys_dir(settings.data_dir) / "probes"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{request_id}.key"


def contribution_path(settings: Settings, request_id: str) -> Path:
    return settings.store_dir / "contributions" / f"{request_id}.sealed"


def seal(session: Session, settings: Settings, request_id: str, tenant: str, items: list[dict[str, Any]],
         baseline: dict[str, Any], contribution: bytes | None = None) -> RequestProbe | None:
    """Encrypt `items` (and the request's fusion `contribution`, safetensors bytes) under a new per-request
    key and add the row and its `request.probes_sealed` event (flushes; the caller commits). None when
    retention is 0: nothing is kept."""
    if settings.probe_retention_days <= 0:
        return None
    sealer = Sealer(key_path(settings, request_id))  # a new key (or the one a rolled-back try made)
    ciphertext = sealer.seal(json.dumps(items).encode(), request_id)
    if contribution is not None:
        sealed_terms = sealer.seal(contribution, _contribution_label(request_id))
        replace_synced(contribution_path(settings, request_id), sealed_terms)
    now = utcnow()
    row = probes.add_probe(session, RequestProbe(
        request_id=request_id, tenant=tenant, ciphertext=ciphertext, n_items=len(items),
        baseline=baseline, sealed_at=now, expires_at=now + timedelta(days=settings.probe_retention_days),
    ))
    audit.append_event(session, "request.probes_sealed",
                       {"request_id": request_id, "n_items": len(items), "expires_at": row.expires_at.isoformat(),
                        "contribution": contribution is not None},
                       tenant=tenant, request_id=request_id)
    return row


def open_contribution(settings: Settings, request_id: str) -> bytes:
    """The request's sealed fusion terms, decrypted. OSError / InvalidTag when gone or not its own."""
    path = key_path(settings, request_id)
    if not path.exists():
        raise FileNotFoundError(f"probe key of request {request_id}")  # Sealer would create a new key
    return Sealer(path).open(contribution_path(settings, request_id).read_bytes(), _contribution_label(request_id))


def _contribution_label(request_id: str) -> str:
    return f"{request_id}/contribution"


def open_lineage(session: Session, settings: Settings, request_ids: list[str]) -> Lineage:
    """Decrypt the probes of `request_ids`; a request without an openable probe is listed with the reason."""
    rows = probes.probes_for(session, request_ids)
    lineage = Lineage()
    for request_id in request_ids:
        row = rows.get(request_id)
        reason = _why_closed(settings, row)
        if reason is not None:
            lineage.unverifiable[request_id] = reason
            continue
        try:
            plain = Sealer(key_path(settings, request_id)).open(row.ciphertext, request_id)
        except (OSError, InvalidTag, ValueError):
            lineage.unverifiable[request_id] = "its probe key is unreadable or does not match"
            continue
        lineage.opened.append(OpenedProbe(request_id, row.tenant, json.loads(plain), dict(row.baseline)))
    return lineage


def _why_closed(settings: Settings, row: RequestProbe | None) -> str | None:
    if row is None:
        return "no probes were kept (published before probes existed, or retention 0)"
    if row.shredded_at is not None or row.ciphertext is None:
        return f"probes shredded at {_iso(row.shredded_at)} (retention window ended, or the request was withdrawn)"
    if not key_path(settings, row.request_id).exists():
        return "its probe key is gone"
    return None


def shred(session: Session, settings: Settings, row: RequestProbe, reason: str, actor: str | None = None) -> None:
    """Destroy the key file first (that alone makes the ciphertext unreadable), then the ciphertext, and
    audit it (flushes; the caller commits). Idempotent: a shredded row is left as it is."""
    if row.shredded_at is not None:
        return
    path = key_path(settings, row.request_id)
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
    contribution_path(settings, row.request_id).unlink(missing_ok=True)
    row.ciphertext, row.shredded_at = None, utcnow()
    session.flush()
    audit.append_event(session, "request.probes_shredded",
                       {"request_id": row.request_id, "reason": reason, "sealed_at": _iso(row.sealed_at)},
                       actor=actor, tenant=row.tenant, request_id=row.request_id)


def shred_expired(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Shred every probe past its retention window; returns their request ids (the caller commits)."""
    expired = probes.expired_probes(session, now or utcnow())
    for row in expired:
        shred(session, settings, row, "retention window ended")
    return [row.request_id for row in expired]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
