"""`--api-key` for the embedded engine, with SGLang's semantics.

When a key is set, every request must carry `Authorization: Bearer <key>` (scheme
case-insensitive, key compared in constant time), else HTTP 401 `{"error": "Unauthorized"}`
and nothing of the request is read or run. Health/readiness/metrics probes stay open
(prefix `/health`, `/ready`, `/metrics`), so launchers and load balancers can poll without
the secret, exactly as SGLang 0.5.23 decides it (tests compare with its `decide_request_auth`).
"""

from __future__ import annotations

import hmac

OPEN_PREFIXES = ("/health", "/ready", "/metrics")


def request_allowed(method: str, path: str, authorization: str | None, api_key: str | None) -> bool:
    if not api_key or method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not _:
        return False
    return hmac.compare_digest(token.encode(), api_key.encode())
