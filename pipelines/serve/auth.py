"""Bearer-key authentication of ``mmrag serve`` as a FastAPI dependency.

Auth is required when the key store holds any key, or when the server is bound to a non-loopback
address (``required``; ``mmrag serve`` refuses such a bind while the store is empty, and this keeps
the door shut if every key is revoked later). With no keys and a loopback bind every request is
allowed: the machine's own users are trusted, as with ``chroma run`` on 127.0.0.1; a key sent
anyway is then not checked.
"""

from __future__ import annotations

from typing import Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import AuthenticationError, PermissionDeniedError
from .keys import ApiKey, KeyStore, scope_rank

_bearer = HTTPBearer(auto_error=False, description="an API key from `mmrag keys create`: `Authorization: Bearer KEY`")


class Authenticator:
    def __init__(self, keys: KeyStore, *, required: bool = False):
        self.keys = keys
        self.required = required

    def require(self, scope: str) -> Callable[..., ApiKey | None]:
        """A dependency that lets a request through when its key grants ``scope``."""
        scope_rank(scope)  # a typo in a route fails at import, not on a request

        def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> ApiKey | None:
            if not self.required and not self.keys.has_keys():
                return None
            if credentials is None:
                raise AuthenticationError(
                    "This server needs an API key: send `Authorization: Bearer KEY` (its owner creates one with "
                    "`mmrag keys create --kb DIR --scope read`).")
            key = self.keys.authenticate(credentials.credentials)
            if key is None:
                raise AuthenticationError("The API key is not valid: it is malformed, unknown or revoked.")
            if not key.allows(scope):
                raise PermissionDeniedError(f"The API key {key.id!r} has scope {key.scope!r}; this endpoint needs "
                                            f"{scope!r} (or a higher scope).")
            return key

        return check
