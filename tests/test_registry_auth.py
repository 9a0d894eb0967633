"""Bearer tokens for the registry: RS256 keys, scopes, the cache and setup errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from pushfan.errors import SetupError
from pushfan.settings import RegistrySettings
from registry.auth import LEEWAY_S, Authenticator, AuthError


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("jwt") / "issuer.pub.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, path


def _token(key: Any, algorithm: str = "RS256", **claims: Any) -> str:
    body = {"sub": "u1", "iss": "pushfan", "aud": "pushfan-registry", "exp": time.time() + 60}
    body.update(claims)
    return jwt.encode(body, key, algorithm=algorithm)


def test_rs256_tokens_verify_with_the_public_key(rsa_key: tuple[Any, Path]) -> None:
    key, public = rsa_key
    auth = Authenticator(RegistrySettings(jwt_algorithm="RS256", jwt_public_key_file=public))

    caller = auth.authenticate("Bearer " + _token(key, scope="devices:admin other"))

    assert (caller.subject, caller.service) == ("u1", True)
    assert caller.acting_for("someone") == "someone"


def test_an_hs256_token_is_refused_by_an_rs256_registry(rsa_key: tuple[Any, Path]) -> None:
    _, public = rsa_key
    auth = Authenticator(RegistrySettings(jwt_algorithm="RS256", jwt_public_key_file=public))
    # key confusion: HS256 "signed" with the public key, which an attacker has
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": "u1", "iss": "pushfan", "aud": "pushfan-registry", "exp": time.time() + 60}
    payload = _b64(json.dumps(claims).encode())
    mac = hmac.new(public.read_bytes(), f"{header}.{payload}".encode(), hashlib.sha256)
    forged = f"{header}.{payload}.{_b64(mac.digest())}"

    with pytest.raises(AuthError) as caught:
        auth.authenticate("Bearer " + forged)
    assert caught.value.status == 401


def test_a_user_token_acts_only_for_its_user() -> None:
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr("s" * 32)))
    caller = auth.authenticate("Bearer " + _token("s" * 32, algorithm="HS256"))

    assert caller.acting_for(None) == "u1"
    with pytest.raises(AuthError) as caught:
        caller.acting_for("u2")
    assert caught.value.status == 403


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_remembered_token_still_expires() -> None:
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr("s" * 32)))
    exp = int(time.time()) - LEEWAY_S + 2  # good for 1-2 s more, leeway included
    token = _token("s" * 32, algorithm="HS256", exp=exp)
    assert auth.authenticate("Bearer " + token).subject == "u1"
    assert auth.authenticate("Bearer " + token).subject == "u1"  # remembered

    time.sleep(exp + LEEWAY_S + 1.05 - time.time())  # PyJWT compares whole seconds
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate("Bearer " + token)


def test_missing_keys_are_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="JWT_SECRET"):
        Authenticator(RegistrySettings())
    with pytest.raises(SetupError, match="cannot read"):
        Authenticator(
            RegistrySettings(jwt_algorithm="RS256", jwt_public_key_file=tmp_path / "none.pem")
        )
    with pytest.raises(ValidationError):
        RegistrySettings(jwt_algorithm="RS256", jwt_secret=SecretStr("x"))


# -- the fast path: plainly valid tokens are checked without PyJWT, never more leniently --

HS_KEY = "k" * 32
_ABSENT = object()


_PARTS = ["alg", "typ", "kid", "header", "sub", "iss", "aud", "exp", "iat", "nbf", "jti"]
_PARTS += ["scope", "key", "encoding"]


@st.composite
def _tokens(draw: st.DrawFn) -> str:
    """Tokens valid but for one part at most (each part's wrong values are tried far
    more often than random tokens would): a quarter of them valid."""
    defect = draw(st.sampled_from([None] * 4 + _PARTS))

    def pick(part: str, good: list[Any], bad: list[Any]) -> Any:
        return draw(st.sampled_from(bad if part == defect else good))

    now = int(time.time())
    # times at least ten seconds from any boundary PyJWT draws (clocks move meanwhile)
    past, future = now - LEEWAY_S + 10, now + LEEWAY_S + 10
    header: dict[str, Any] = {
        "alg": pick("alg", ["HS256"], ["HS512", "RS256", "none", None]),
        "typ": pick("typ", ["JWT", _ABSENT], ["at+jwt", 7]),
        "kid": pick("kid", [_ABSENT, "key-1"], [7, None]),
    }
    if defect == "header":
        name, value = pick("header", [], [("crit", ["b64"]), ("b64", False), ("jku", "x")])
        header[name] = value
    claims: dict[str, Any] = {
        "sub": pick("sub", ["u1"], ["", 7, None, ["u1"], _ABSENT]),
        "iss": pick("iss", ["pushfan"], ["other", 7, None, _ABSENT]),
        "aud": pick(
            "aud",
            ["pushfan-registry", ["pushfan-registry"], ["x", "pushfan-registry"]],
            [["pushfan-registry", 7], ["other"], [], "other", 7, None, _ABSENT],
        ),
        "exp": pick(
            "exp",
            [now + 7200, float(now + 7200), past, past + 0.5, 10**30, 1e300],
            [
                *(now - LEEWAY_S - 10, now - 7200, str(now + 7200), [now + 7200]),
                *(True, None, float("inf"), float("nan"), _ABSENT),
            ],
        ),
        "iat": pick("iat", [_ABSENT, now - 60, float(now), now + 10], [future, "now", True]),
        "nbf": pick("nbf", [_ABSENT, now - 60, now + 10.5], [future, str(now), None]),
        "jti": pick("jti", [_ABSENT, "j-1"], [7, None]),
        "scope": pick("scope", [_ABSENT, "devices:admin", "a b"], [7, ["devices:admin"]]),
    }
    header = {k: v for k, v in header.items() if v is not _ABSENT}
    claims = {k: v for k, v in claims.items() if v is not _ABSENT}
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    key = pick("key", [HS_KEY], ["x" * 32])
    mac = _b64(hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest())
    token = f"{signing}.{mac}"
    encoding = pick("encoding", ["plain"], list(_MISENCODED))
    if encoding == "cut":
        return token[: draw(st.integers(0, len(token) - 1))]
    return _MISENCODED.get(encoding, str)(token)


_BASE64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
_MISENCODED: dict[str, Callable[[str], str]] = {
    "padded": lambda t: t + "=",  # PyJWT takes '=' padding; the fast path leaves it to PyJWT
    # the same signature bytes with the last character's unused low bit set
    "bits": lambda t: t[:-1] + _BASE64URL[_BASE64URL.index(t[-1]) ^ 1],
    "alphabet": lambda t: t.replace("-", "+").replace("_", "/") + "/",
    "dots": lambda t: t + ".x",
    "cut": lambda t: t[:-1],
    "space": lambda t: t.replace(".", ". ", 1),
    "non-ascii": lambda t: t.replace(".", "é.", 1),
}


@settings(max_examples=400)
@given(_tokens())
def test_the_fast_path_accepts_nothing_pyjwt_refuses(token: str) -> None:
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr(HS_KEY)))
    fast = auth.plain_claims(token, time.time())
    if fast is not None:
        assert auth.pyjwt_claims(token) == fast


@pytest.mark.parametrize("encoding", sorted(_MISENCODED))
def test_misencoded_tokens_are_left_to_pyjwt(encoding: str) -> None:
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr(HS_KEY)))
    token = _MISENCODED[encoding](_token(HS_KEY, algorithm="HS256"))

    assert auth.plain_claims(token, time.time()) is None


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"exp": time.time() + 600},  # a float, as PyJWT's own tests write it
        {"aud": ["other", "pushfan-registry"], "iat": int(time.time()), "jti": "j"},
        {"nbf": int(time.time()) - 5, "scope": "devices:admin"},
    ],
)
def test_plain_tokens_take_the_fast_path(claims: dict[str, Any]) -> None:
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr(HS_KEY)))
    token = _token(HS_KEY, algorithm="HS256", **claims)

    assert auth.plain_claims(token, time.time()) == auth.pyjwt_claims(token)


def test_plain_rs256_tokens_take_the_fast_path(rsa_key: tuple[Any, Path]) -> None:
    key, public = rsa_key
    auth = Authenticator(RegistrySettings(jwt_algorithm="RS256", jwt_public_key_file=public))
    token = _token(key, exp=int(time.time()) + 600)
    forged = _token(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    assert auth.plain_claims(token, time.time()) == auth.pyjwt_claims(token)
    assert auth.plain_claims(forged, time.time()) is None


def test_a_short_secret_leaves_every_token_to_pyjwt() -> None:
    # PyJWT warns about a short HMAC key on every token; the fast path must not hide that
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr("short")))
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):  # PyJWT signing it, too
        token = _token("short", algorithm="HS256")

    assert auth.plain_claims(token, time.time()) is None
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        assert auth.authenticate("Bearer " + token).subject == "u1"


def test_an_exp_past_a_floats_range_is_remembered_for_good() -> None:
    auth = Authenticator(RegistrySettings(jwt_secret=SecretStr(HS_KEY)))
    token = _token(HS_KEY, algorithm="HS256", exp=10**400)  # float() of it overflows

    assert auth.authenticate("Bearer " + token).subject == "u1"
    assert auth.authenticate("Bearer " + token).subject == "u1"  # remembered
