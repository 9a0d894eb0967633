"""Bearer tokens for the registry: RS256 keys, scopes, the cache and setup errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
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
