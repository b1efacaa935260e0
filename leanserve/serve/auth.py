"""Optional API keys: ``Authorization: Bearer <key>``, checked against sha256 digests.

Keys come from ``--api-key KEY`` (repeatable) and ``--api-keys-file F``: one sha256 hex digest of a
key per line, ``#`` starts a comment, so the file never holds a key in the clear. Make a line with
``printf %s "$KEY" | sha256sum``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from leanserve.serve.errors import APIError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_bearer = HTTPBearer(auto_error=False, description="an API key given to the server with --api-key or --api-keys-file")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_keys_file(path: Path) -> set[str]:
    """The digests in an API keys file. ValueError naming the line for anything that is not one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API keys file {path}: {e.strerror or e}") from None
    digests = set()
    for i, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        if not _HEX64.fullmatch(text):
            raise ValueError(f"{path}:{i}: expected the sha256 hex digest of a key (64 hex digits), got {text[:20]!r}; "
                             "make one with: printf %s \"$KEY\" | sha256sum")
        digests.add(text)
    return digests


class APIKeyAuth:
    """A FastAPI dependency; a no-op when no key is configured."""

    def __init__(self, digests: set[str] | frozenset[str]) -> None:
        self.digests = frozenset(d.lower() for d in digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, authorization: str | None) -> bool:
        if not self.digests:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = key_digest(token.strip())
        ok = False
        for d in self.digests:  # compare with every digest: the time taken says nothing about which matched
            ok |= hmac.compare_digest(digest, d)
        return ok

    async def __call__(self, request: Request,
                       _: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:  # shows in /docs
        if not self.check(request.headers.get("authorization")):
            missing = not request.headers.get("authorization")
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'" if missing
                           else "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
