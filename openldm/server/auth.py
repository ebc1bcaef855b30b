"""Access: HTTP basic auth (`--api-auth user:pass,...`, as A1111) and a bearer key (`--api-key`).

Credentials are compared with `hmac.compare_digest`, so the time taken does not tell how much of a
guess was right. With either set, every route answers 401 to a request that lacks them.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse


def parse_auth(text: str) -> tuple[tuple[str, str], ...]:
    """`user:pass[,user2:pass2]` -> pairs; a malformed entry is a ValueError naming it."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth entry {item.split(':')[0]!r}...: expected user:password")
        pairs.append((user, password))
    return tuple(pairs)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def allowed(header: str | None, users: tuple[tuple[str, str], ...], api_key: str | None) -> bool:
    """Whether an Authorization header carries one of the configured credentials."""
    scheme, _, value = (header or "").partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and api_key is not None:
        return _same(value.strip(), api_key)
    if scheme != "basic" or not users:
        return False
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    matches = [_same(user, u) & _same(password, p) for u, p in users]  # no early exit: same time for all
    return any(matches)


def auth_middleware(users: tuple[tuple[str, str], ...], api_key: str | None):
    """An HTTP middleware refusing every request without valid credentials."""
    realm = 'Basic realm="openldm"' if users else 'Bearer realm="openldm"'

    async def check(request: Request, call_next):
        if not allowed(request.headers.get("authorization"), users, api_key):
            return JSONResponse({"error": "authentication required (basic auth or a bearer key)"},
                                status_code=401, headers={"WWW-Authenticate": realm})
        return await call_next(request)

    return check
