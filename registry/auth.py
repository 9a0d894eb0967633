"""Who is calling the registry: bearer JWTs, checked once and remembered until they expire.

A caller is the token's ``sub``. A token whose ``scope`` (space-separated, as OAuth 2
has it) holds the service scope may act for any user; every other caller acts for
itself only. Tokens are HS256 (shared secret) or RS256 (the issuer's public key), with
``iss``, ``aud``, ``exp`` and ``sub`` required. Verifying an RS256 signature costs more
than the rest of a registration, and apps send the same token on every launch, so a
verified token is remembered by its exact text until its ``exp``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from pushfan.errors import SetupError
from pushfan.settings import RegistrySettings

LEEWAY_S = 30  # clock skew allowed on exp/iat/nbf
CACHE_SIZE = 10_000


class AuthError(Exception):
    """Answered as ``status`` (401: who are you; 403: not yours) with this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str
    service: bool  # may act for any user

    def acting_for(self, user_id: str | None) -> str:
        """The user this request is about: the caller's own, or (service callers
        only) the one named."""
        if user_id is None or user_id == self.subject:
            return self.subject
        if not self.service:
            raise AuthError(403, "only a service token may act for another user")
        return user_id


class Authenticator:
    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.algorithm = settings.jwt_algorithm
        self.key: str | bytes
        if self.algorithm == "HS256":
            if settings.jwt_secret is None:
                raise SetupError("PUSHFAN_REGISTRY__JWT_SECRET is required for HS256")
            self.key = settings.jwt_secret.get_secret_value()
        else:
            path = settings.jwt_public_key_file
            if path is None:
                raise SetupError("PUSHFAN_REGISTRY__JWT_PUBLIC_KEY_FILE is required for RS256")
            try:
                self.key = path.read_bytes()
            except OSError as exc:
                raise SetupError(f"cannot read the JWT public key {path}: {exc}") from exc
        self._verified: dict[str, tuple[Caller, float]] = {}

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a request with this ``Authorization`` header; raises
        :class:`AuthError` (401)."""
        if not authorization:
            raise AuthError(401, "missing bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "expected 'Authorization: Bearer <token>'")
        now = time.time()
        known = self._verified.get(token)
        if known is not None and known[1] > now:
            return known[0]
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                issuer=self.settings.jwt_issuer,
                audience=self.settings.jwt_audience,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "bearer token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid bearer token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 1 <= len(subject) <= 128:
            raise AuthError(401, "invalid bearer token: sub must be a string of 1-128 characters")
        scope = claims.get("scope", "")
        scopes = scope.split() if isinstance(scope, str) else []
        caller = Caller(subject, self.settings.service_scope in scopes)
        if len(self._verified) >= CACHE_SIZE:
            self._verified = {t: v for t, v in self._verified.items() if v[1] > now}
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
        self._verified[token] = (caller, float(claims["exp"]) + LEEWAY_S)
        return caller
