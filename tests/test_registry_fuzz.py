"""The registry API fuzzed from its own OpenAPI document, over real HTTP, against the real
database: schemathesis generates requests for every operation the document lists (valid
ones, and ones that break the document on purpose) and checks every answer.

What the checks hold the server to: no 5xx ever; every status is one the document lists
for that operation; every body matches the schema listed for that status (errors are
``{"error": {"code", "message", "details"?}}``); content types and documented headers
match; invalid input is refused and valid input accepted; a request without or with a bad
token is refused; an undocumented method gets a 405 with ``Allow``. On top: fuzzed
``Authorization`` headers and JWT claims, and bodies over the size limit.

Two choices that the libraries forced:

- The server runs on a thread with its own event loop and database pool. schemathesis
  sends with blocking ``requests`` calls, which would stall a server sharing the test's
  loop.
- The document is loaded when this module is imported, not from the server in a fixture:
  schemathesis' fixture loader (``schemathesis.pytest.from_fixture``) reaches into a pytest
  internal that pytest 9 removed. ``test_the_fuzzed_document_is_the_served_one`` checks
  that the two are the same document.

The run is derandomized (the same requests every run, so CI cannot flake); set
``PUSHFAN_FUZZ_EXAMPLES`` higher to search further locally.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pushfan.settings import RegistrySettings, Settings
from registry.openapi import openapi_document
from registry.server import running

SECRET = "fuzz-secret-of-enough-length-for-hs256"
SERVICE_SCOPE = "devices:admin"
MAX_BODY = 4096
EXAMPLES = int(os.environ.get("PUSHFAN_FUZZ_EXAMPLES", "30"))
OPERATIONS = {
    ("POST", "/v1/devices"),
    ("GET", "/v1/devices"),
    ("DELETE", "/v1/devices/{device_id}"),
    ("POST", "/v1/devices/unregister"),
    ("GET", "/v1/preferences"),
    ("PUT", "/v1/preferences"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}
SECURED = sorted((m, p) for m, p in OPERATIONS if p.startswith("/v1/"))
WITH_BODY = sorted((m, p) for m, p in OPERATIONS if m in ("POST", "PUT"))
# The checks that judge one response on its own, for requests built here, not generated.
RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def token(sub: Any, *, key: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    body = {"sub": sub, "iss": "pushfan", "aud": "pushfan-registry", "exp": time.time() + 3600}
    body.update(claims)
    return jwt.encode(body, key, algorithm=algorithm)


_REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429"]


def _config(bearer: str | None, *, examples: int, coverage: bool) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            # "none": no example database, so nothing is replayed from an earlier run
            "generation": {"max-examples": examples, "deterministic": True, "database": "none"},
            "phases": {"coverage": {"enabled": coverage}},
            "checks": {
                # A body over the size limit is refused unread, with a 413 (documented).
                "negative_data_rejection": {"expected-statuses": [*_REJECTIONS, "413"]}
            },
            **({"auth": {"openapi": {"bearer": {"bearer": bearer}}}} if bearer else {}),
            "operations": [
                {
                    # The positive half of the coverage phase tries every value of every
                    # enum: each of ~600 time zones was a request of its own (over 40 s).
                    # Other operations still try the edges of user_id and friends.
                    "include-name": ["POST /v1/devices", "PUT /v1/preferences"],
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                },
                {
                    # Quiet hours whose start equals their end are refused (422), and JSON
                    # Schema cannot say so (it compares no two values): schema-valid bodies
                    # may get that 422. tests/test_registry_api.py pins the rule itself.
                    "include-path": "/v1/preferences",
                    "include-method": "PUT",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "403", "422"]
                        }
                    },
                },
            ],
        }
    )


# As the server serves it: JSON text, read back.
DOCUMENT: dict[str, Any] = json.loads(json.dumps(openapi_document()))
# A service token, so generated ``user_id`` values are acted on rather than refused.
as_service = schemathesis.openapi.from_dict(
    DOCUMENT, config=_config(token("fuzz", scope=SERVICE_SCOPE), examples=EXAMPLES, coverage=True)
)
# A plain user's token: any other ``user_id`` must be a 403 the document lists.
as_user = schemathesis.openapi.from_dict(
    DOCUMENT, config=_config(token("fuzz-user"), examples=EXAMPLES // 3, coverage=False)
)
anonymous = schemathesis.openapi.from_dict(
    DOCUMENT, config=_config(None, examples=1, coverage=False)
)


@pytest.fixture(scope="module")
def base_url(settings: Settings, migrated: str) -> Iterator[str]:
    registry = RegistrySettings(jwt_secret=SecretStr(SECRET), max_body_bytes=MAX_BODY)
    configured = settings.model_copy(update={"registry": registry})
    started: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]] = []
    failed: list[BaseException] = []
    ready = threading.Event()

    async def serve() -> None:
        stop = asyncio.Event()
        async with running(configured, port=0) as served:
            started.append((served.url, asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()

    def thread() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # handed to the test thread, which raises it
            failed.append(exc)
            ready.set()

    server = threading.Thread(target=thread, name="registry-under-fuzz", daemon=True)
    server.start()
    assert ready.wait(60), "the registry did not start"
    if failed:
        raise failed[0]
    url, loop, stop = started[0]
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        server.join(30)


def test_the_fuzzed_document_is_the_served_one(base_url: str) -> None:
    served = httpx.get(base_url + "/openapi.json").json()

    assert served == DOCUMENT
    listed = {(m.upper(), p) for p, ops in served["paths"].items() for m in ops}
    assert listed == OPERATIONS


@as_service.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case[Any], base_url: str) -> None:
    case.call_and_validate(base_url=base_url)


@as_user.parametrize()
def test_as_a_plain_user_too(case: schemathesis.Case[Any], base_url: str) -> None:
    case.call_and_validate(base_url=base_url)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def _send(
    http: httpx.Client, method: str, path: str, *, device_id: str = "fuzz-device", **kwargs: Any
) -> httpx.Response:
    """One request to the operation ``(method, path)``, its answer checked against the
    document: a documented status, content type, headers and body schema. ``device_id``
    goes into the path as it is: percent-encode it first, or not, on purpose."""
    # The case only names the operation whose document the answer is checked against.
    case = anonymous[path][method].Case(path_parameters={"device_id": "-"} if "{" in path else {})
    url = str(http.base_url) + path.replace("{device_id}", device_id)
    response = http.request(method, url, **kwargs)
    # The checks read the request back; a streamed (chunked) body is gone by then.
    response.request = httpx.Request(method, url, headers=response.request.headers)
    case.validate_response(response, checks=RESPONSE_CHECKS)
    return response


_SERVICE = {"authorization": "Bearer " + token("fuzz", scope=SERVICE_SCOPE)}
# Anything, with a bias to what breaks parsers and databases: controls, NUL, escapes.
_nasty = st.lists(
    st.characters(codec="utf-8") | st.sampled_from(["\x00", "%", "%00", "%25", "/", "%2F", " "]),
    max_size=140,
).map("".join)
_printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_words = st.text(_printable, min_size=1, max_size=60)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
_refused = st.one_of(
    st.builds(lambda w, v: f"{w} {v}", _words, _words),  # any scheme, any credentials
    st.builds("Bearer {}".format, _words),
    st.builds("Bearer {}.{}.{}".format, _words, _words, _words),
    st.just("Bearer"),
    st.sampled_from(["Basic dXNlcjpwYXNz", "bearer", "Token abc"]),
    st.builds(lambda sub: "Bearer " + token(sub, key="not-the-secret-" + SECRET), _words),
    st.builds(lambda sub: "Bearer " + token(sub, key="", algorithm="none"), _words),
    st.builds(lambda exp: "Bearer " + token("u", exp=exp), st.integers(max_value=0)),
    st.builds(lambda iss: "Bearer " + token("u", iss=iss), _words),
    st.builds(lambda aud: "Bearer " + token("u", aud=aud), _words),
    # a subject that is no user id: not a string, empty, or too long
    st.builds(lambda sub: "Bearer " + token(sub), st.integers() | st.just("") | st.just("u" * 200)),
)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(operation=st.sampled_from(SECURED), authorization=_refused)
def test_bad_credentials_are_a_documented_401(
    http: httpx.Client, operation: tuple[str, str], authorization: str
) -> None:
    method, path = operation

    response = _send(http, method, path, headers={"authorization": authorization})

    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthenticated"


# Each operation's body fields, every string one of _nasty: the fields are what the
# request gets past (extra fields are a 422 before anything reaches the database).
_BODIES: dict[tuple[str, str], st.SearchStrategy[dict[str, Any]]] = {
    ("POST", "/v1/devices"): st.fixed_dictionaries(
        {
            "token": _nasty,
            "platform": st.sampled_from(["ios", "android", "web"]),
            "device_id": _nasty,
            "app_id": _nasty,
        },
        optional={"app_version": _nasty, "locale": _nasty, "time_zone": _nasty},
    ),
    ("POST", "/v1/devices/unregister"): st.fixed_dictionaries({"token": _nasty}),
    ("PUT", "/v1/preferences"): st.fixed_dictionaries(
        {},
        optional={
            "time_zone": _nasty,
            "quiet_hours": st.fixed_dictionaries({"start": _nasty, "end": _nasty}),
            "types": st.dictionaries(_nasty, st.booleans(), max_size=3),
        },
    ),
}


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    operation=st.sampled_from(SECURED),
    device_id=_nasty.filter(bool),
    encode=st.booleans(),
    query=st.fixed_dictionaries({}, optional={"user_id": _nasty, "app_id": _nasty}),
    data=st.data(),
)
def test_any_parameter_or_body_text_is_answered_as_documented(
    http: httpx.Client,
    operation: tuple[str, str],
    device_id: str,
    encode: bool,
    query: dict[str, str],
    data: st.DataObject,
) -> None:
    # schemathesis keeps to what a URL can carry and seldom tries a NUL byte; PostgreSQL
    # refuses one in text, so a value that reaches SQL unchecked is a 500. Here every
    # path, query and body string may hold anything, raw or percent-encoded.
    method, path = operation
    raw = quote(device_id, safe="") if encode else quote(device_id, safe="%/")
    body = _BODIES.get(operation)
    content = None if body is None else json.dumps(data.draw(body, label="body"))

    _send(http, method, path, device_id=raw, params=query, headers=_SERVICE, content=content)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    operation=st.sampled_from(SECURED),
    sub=_words,
    scope=_json,
    # exp as far as a float reaches; further is test_an_exp_past_float_range below
    exp=st.integers(min_value=int(time.time()) + 600, max_value=2**1023),
    extra=st.dictionaries(st.sampled_from(["nbf", "iat", "jti", "azp"]), _json, max_size=2),
)
def test_signed_tokens_with_odd_claims_never_make_a_5xx(
    http: httpx.Client,
    operation: tuple[str, str],
    sub: str,
    scope: Any,
    exp: int,
    extra: dict[str, Any],
) -> None:
    method, path = operation
    bearer = token(sub, exp=exp, scope=scope, **extra)

    _send(http, method, path, headers={"authorization": "Bearer " + bearer})


def test_an_exp_past_float_range_is_not_a_5xx(http: httpx.Client) -> None:
    bearer = token("u", exp=10**400)

    _send(http, "GET", "/v1/devices", headers={"authorization": "Bearer " + bearer})


@pytest.mark.parametrize("operation", WITH_BODY, ids=" ".join)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [MAX_BODY + 1, 64 * MAX_BODY])
def test_an_oversized_body_is_a_documented_413(
    http: httpx.Client, operation: tuple[str, str], chunked: bool, size: int
) -> None:
    method, path = operation
    body = b"[" + b"0," * (size // 2) + b"0]"  # valid JSON, so only its size is wrong
    auth = {"authorization": "Bearer " + token("fuzz")}
    # A generator has no length, so httpx sends it chunked: the server must count as it reads.
    content = iter([body[i : i + 1024] for i in range(0, len(body), 1024)]) if chunked else body

    response = _send(http, method, path, headers=auth, content=content)

    assert response.status_code == 413
