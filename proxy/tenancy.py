"""PURE: who is asking, decided on the server side.

A tenant is never taken from a client-chosen header. In pass-through mode it is a keyed hash of
the client's Authorization (so two clients with different upstream keys never share answers, and
the hash reveals nothing without the proxy's secret); in keys mode it is the name configured for
the proxy key the client presents, compared in constant time against stored SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .config import TenancyConfig
from .errors import AuthenticationFailed

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    #: the Authorization header to forward upstream in pass-through mode, else None
    upstream_auth: str | None


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def identify(authorization: str | None, config: TenancyConfig, secret: bytes) -> Caller:
    if config.mode == "keys":
        token = _bearer(authorization)
        if token is None:
            raise AuthenticationFailed(
                "Missing bearer token: send your proxy key as 'Authorization: Bearer <key>'.")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        match = None
        for entry in config.keys:
            # compare against every key so the time taken says nothing about which one matched
            if hmac.compare_digest(digest, entry.key_sha256):
                match = entry.tenant
        if match is None:
            raise AuthenticationFailed("Incorrect proxy key provided.")
        return Caller(tenant="k:" + match, upstream_auth=None)
    if not authorization:
        return Caller(tenant=ANONYMOUS, upstream_auth=None)
    mac = hmac.new(secret, authorization.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return Caller(tenant="h:" + mac.hexdigest()[:32], upstream_auth=authorization)
