"""Who is calling the registry: bearer JWTs, checked once and remembered until they expire.

A caller is the token's ``sub``. A token whose ``scope`` (space-separated, as OAuth 2
has it) holds the service scope may act for any user; every other caller acts for
itself only. Tokens are HS256 (shared secret) or RS256 (the issuer's public key), with
``iss``, ``aud``, ``exp`` and ``sub`` required. Verifying an RS256 signature costs more
than the rest of a registration, and apps send the same token on every launch, so a
verified token is remembered by its exact text until its ``exp``.

Most registrations still bring a token not seen before, and ``jwt.decode`` spent about
80 µs on each (it prepares the key again and checks the base64 character by character
in Python on every call): a quarter of the API's CPU. So a plainly valid token is
checked here with the key prepared once and the same rules, and PyJWT decides every
token that is anything but plain, so the refusals and their wording are PyJWT's.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from jwt.algorithms import Algorithm, get_default_algorithms

from pushfan.errors import SetupError
from pushfan.settings import RegistrySettings

LEEWAY_S = 30  # clock skew allowed on exp/iat/nbf
CACHE_SIZE = 10_000

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# Header parameters the fast path knows PyJWT to ignore or to check as it does; any
# other (crit, b64, jku, ...) goes to PyJWT.
_PLAIN_HEADER = frozenset({"alg", "typ", "kid"})


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
        self._signer: Algorithm = get_default_algorithms()[self.algorithm]
        self._prepared: Any = None  # the key as the signer takes it; None: PyJWT for all
        try:
            prepared = self._signer.prepare_key(self.key)
        except (jwt.PyJWTError, ValueError, TypeError, UnsupportedAlgorithm):
            pass  # PyJWT refuses every token with this key, in its words
        else:
            # a short key makes PyJWT warn on every token: leave that to it
            if self._signer.check_key_length(prepared) is None:
                self._prepared = prepared

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
        claims = self.plain_claims(token, now)
        if claims is None:
            claims = self.pyjwt_claims(token)
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
        self._verified[token] = (caller, _until(claims["exp"]))
        return caller

    def pyjwt_claims(self, token: str) -> dict[str, Any]:
        """PyJWT's verdict on ``token``: its claims, or :class:`AuthError` (401)."""
        try:
            claims: dict[str, Any] = jwt.decode(
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
        return claims

    def plain_claims(self, token: str, now: float) -> dict[str, Any] | None:
        """The claims of ``token`` if it is plainly valid at ``now`` by the rules
        ``pyjwt_claims`` gives PyJWT; None if it is not, or is unusual in any way (PyJWT then
        decides). It must never accept a token PyJWT refuses: the tests hold it to that."""
        if self._prepared is None:
            return None
        parts = token.split(".")
        if len(parts) != 3:
            return None
        header_raw, payload_raw, signature = (_segment(p) for p in parts)
        if header_raw is None or payload_raw is None or signature is None:
            return None
        try:
            header = json.loads(header_raw)
            claims = json.loads(payload_raw)
        except (ValueError, RecursionError):  # RecursionError: nesting too deep
            return None
        if (
            not isinstance(header, dict)
            or header.get("alg") != self.algorithm
            or not header.keys() <= _PLAIN_HEADER
            or not isinstance(header.get("kid", ""), str)
            or not isinstance(claims, dict)
            or not self._plain(claims, now)
        ):
            return None
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        return claims if self._signer.verify(signed, self._prepared, signature) else None

    def _plain(self, claims: dict[str, Any], now: float) -> bool:
        # PyJWT's checks, each as it makes them (int() of the times, the leeway both
        # ways, aud a string or a list of strings holding ours), but values PyJWT would
        # have to convert (strings, booleans, floats beyond range) are not plain.
        exp = claims.get("exp")
        if not _time(exp) or int(exp) <= now - LEEWAY_S:
            return False
        for name in ("iat", "nbf"):
            if name in claims and (not _time(claims[name]) or int(claims[name]) > now + LEEWAY_S):
                return False
        aud, ours = claims.get("aud"), self.settings.jwt_audience
        if aud != ours and not (
            type(aud) is list and ours in aud and all(type(a) is str for a in aud)
        ):
            return False
        return (
            claims.get("iss") == self.settings.jwt_issuer
            and type(claims.get("sub")) is str
            and type(claims.get("jti", "")) is str
        )


def _until(exp: Any) -> float:
    """When a token with this ``exp`` (one PyJWT took: a number, or digits) stops being
    remembered; an ``exp`` beyond a float's range never does (``float()`` would raise)."""
    try:
        return float(exp) + LEEWAY_S
    except OverflowError:
        return math.inf


def _time(value: object) -> TypeGuard[int | float]:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _segment(text: str) -> bytes | None:
    """The bytes of a compact JWS segment if it is canonical unpadded base64url, the
    only form the fast path takes (PyJWT tolerates padding; it gets those tokens)."""
    if len(text) % 4 == 1 or not _BASE64URL.fullmatch(text):
        return None
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # the unused low bits of the last character must be zero, as PyJWT demands
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != text.encode("ascii"):
        return None
    return raw
