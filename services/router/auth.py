"""API keys -> tenants. Keys come as `Authorization: Bearer <key>` (HTTP header or gRPC
metadata) or `x-api-key: <key>`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from services.router.config import TenantConfig
from services.router.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    tenant: TenantConfig


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_from_headers(headers: Iterable[tuple[str, str]]) -> str | None:
    """The API key from (lower-case or not) header pairs, or None when absent."""
    for name, value in headers:
        lname = name.lower()
        if lname == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization header must be 'Bearer <api key>'")
            return token.strip()
        if lname == "x-api-key":
            return value.strip()
    return None


class Authenticator:
    """Maps API keys to tenants. Keys are held as SHA-256 digests and compared in constant
    time, so neither a memory dump nor response timing reveals them."""

    def __init__(self, tenants: Iterable[TenantConfig]):
        self._by_digest: dict[bytes, TenantConfig] = {}
        self._by_name: dict[str, TenantConfig] = {}
        for t in tenants:
            self._by_name[t.name] = t
            for key in t.api_keys:
                self._by_digest[_digest(key)] = t

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <api key>'")
        digest = _digest(key)
        for known, tenant in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return Principal(tenant)
        raise Unauthenticated("invalid API key")

    def resolve(self, key: str | None, claimed_tenant: str, trust_claims: bool) -> Principal:
        """The caller's principal: from the key; or, for trusted internal callers without a
        key, from the request's tenant field. A claim that differs from the key's tenant is
        PERMISSION_DENIED."""
        if key is None and claimed_tenant and trust_claims:
            tenant = self._by_name.get(claimed_tenant)
            if tenant is None:
                raise Unauthenticated(f"unknown tenant {claimed_tenant!r}")
            return Principal(tenant)
        principal = self.authenticate(key)
        if claimed_tenant and claimed_tenant != principal.tenant.name:
            raise PermissionDenied(f"tenant: the API key belongs to tenant "
                                   f"{principal.tenant.name!r}, not {claimed_tenant!r}")
        return principal
