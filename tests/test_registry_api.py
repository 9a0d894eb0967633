"""The registry API over real HTTP (uvicorn) against the real database."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from pushfan.settings import RegistrySettings, Settings
from registry.server import Served, running
from tests.test_registry_docs import Outline

SECRET = "test-secret-of-enough-length-for-hs256"


@pytest.fixture(scope="module")
async def served(settings: Settings, migrated: str) -> AsyncIterator[Served]:
    registry = RegistrySettings(jwt_secret=SecretStr(SECRET), max_body_bytes=4096)
    async with running(settings.model_copy(update={"registry": registry}), port=0) as served:
        yield served


@pytest.fixture
async def http(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url) as client:
        yield client


def bearer(sub: str, *, scope: str = "", key: str = SECRET, **claims: Any) -> dict[str, str]:
    body = {"sub": sub, "iss": "pushfan", "aud": "pushfan-registry", "exp": time.time() + 600}
    if scope:
        body["scope"] = scope
    body.update(claims)
    return {"authorization": "Bearer " + jwt.encode(body, key, algorithm="HS256")}


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def apns_token() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def device(token: str, device_id: str, platform: str = "ios", **extra: Any) -> dict[str, Any]:
    return {"token": token, "platform": platform, "device_id": device_id, "app_id": "com.ex.app"}


async def test_register_refresh_list_and_logout(http: httpx.AsyncClient) -> None:
    user, token, dev = _id("u"), apns_token(), _id("dev")
    auth = bearer(user)

    first = await http.post("/v1/devices", json=device(token.upper(), dev), headers=auth)
    again = await http.post("/v1/devices", json=device(token, dev), headers=auth)
    listed = await http.get("/v1/devices", headers=auth)

    assert (first.status_code, first.json()["change"]) == (201, "created")
    assert (again.status_code, again.json()["change"]) == (200, "refreshed")  # case folded
    (only,) = listed.json()["devices"]
    assert only["device_id"] == dev
    assert only["token"].startswith("sha256:")
    for response in (first, again, listed):
        assert token not in response.text.lower()  # tokens never go back out

    gone = await http.delete(f"/v1/devices/{dev}", headers=auth)
    assert gone.status_code == 204
    assert (await http.get("/v1/devices", headers=auth)).json() == {"devices": []}
    assert (await http.delete(f"/v1/devices/{dev}", headers=auth)).status_code == 404


async def test_unregister_by_token_in_the_body(http: httpx.AsyncClient) -> None:
    user, token = _id("u"), apns_token()
    auth = bearer(user)
    await http.post("/v1/devices", json=device(token, _id("dev")), headers=auth)

    # as the app may send it: APNs hex in capitals is the same token
    response = await http.post(
        "/v1/devices/unregister", json={"token": token.upper()}, headers=auth
    )

    assert response.status_code == 204
    assert (await http.get("/v1/devices", headers=auth)).json() == {"devices": []}


async def test_a_user_cannot_touch_another_users_devices(http: httpx.AsyncClient) -> None:
    alice, mallory, token, dev = _id("alice"), _id("mallory"), apns_token(), _id("dev")
    await http.post("/v1/devices", json=device(token, dev), headers=bearer(alice))
    evil = bearer(mallory)

    assert (await http.get(f"/v1/devices?user_id={alice}", headers=evil)).status_code == 403
    assert (await http.delete(f"/v1/devices/{dev}", headers=evil)).status_code == 404
    response = await http.post("/v1/devices/unregister", json={"token": token}, headers=evil)
    assert response.status_code == 404
    other = await http.post(
        f"/v1/devices?user_id={alice}", json=device(apns_token(), _id("d")), headers=evil
    )
    assert other.status_code == 403
    assert len((await http.get("/v1/devices", headers=bearer(alice))).json()["devices"]) == 1


async def test_a_service_token_acts_for_any_user(http: httpx.AsyncClient) -> None:
    user, token = _id("u"), apns_token()
    backend = bearer("orders-backend", scope="openid devices:admin")

    created = await http.post(
        f"/v1/devices?user_id={user}", json=device(token, _id("dev")), headers=backend
    )

    assert created.status_code == 201
    assert len((await http.get("/v1/devices", headers=bearer(user))).json()["devices"]) == 1


async def test_registering_a_token_for_another_user_moves_it(http: httpx.AsyncClient) -> None:
    alice, bob, token, dev = _id("alice"), _id("bob"), apns_token(), _id("dev")
    await http.post("/v1/devices", json=device(token, dev), headers=bearer(alice))

    moved = await http.post("/v1/devices", json=device(token, dev), headers=bearer(bob))

    assert moved.json()["change"] == "moved"
    assert (await http.get("/v1/devices", headers=bearer(alice))).json() == {"devices": []}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Bearer not-a-jwt"},
        bearer("u", exp=time.time() - 3600),
        bearer("u", aud="someone-else"),
        bearer("u", iss="someone-else"),
        bearer("u", key="the-wrong-secret-of-enough-length-too"),
    ],
    ids=["none", "basic", "garbage", "expired", "audience", "issuer", "signature"],
)
async def test_bad_credentials_are_401(http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await http.get("/v1/devices", headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (device("zz" * 32, "d"), "body"),  # not hex
        (device("ab" * 31, "d"), "body"),  # 62 characters
        (device("short", "d", platform="android"), "body"),
        (device("x" * 200, "d", platform="blackberry"), "platform"),
        ({**device("ab" * 32, "d"), "time_zone": "Mars/Olympus"}, "time_zone"),
        ({**device("ab" * 32, "d"), "extra": 1}, "extra"),
        ({**device("ab" * 32, "d"), "device_id": ""}, "device_id"),
        ({"platform": "ios"}, "token"),
        ([1, 2], "body"),
    ],
    ids=["hex", "length", "fcm", "platform", "zone", "unknown", "device", "missing", "list"],
)
async def test_invalid_registrations_are_422_and_name_the_field(
    http: httpx.AsyncClient, body: Any, field: str
) -> None:
    response = await http.post("/v1/devices", json=body, headers=bearer(_id("u")))

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert any(field in d["field"] for d in error["details"])
    assert "zz" * 32 not in response.text


async def test_malformed_json_too_big_unknown_route_and_method(http: httpx.AsyncClient) -> None:
    auth = bearer(_id("u"))
    bad_json = await http.post("/v1/devices", content=b"{not json", headers=auth)
    too_big = await http.post("/v1/devices", content=b"x" * 5000, headers=auth)
    no_route = await http.get("/v2/nothing", headers=auth)
    method = await http.patch("/v1/devices", headers=auth)

    assert bad_json.status_code == 422
    assert too_big.status_code == 413
    assert no_route.status_code == 404
    assert method.status_code == 405
    assert method.headers["allow"] == "GET, POST"
    assert "content-type" in method.headers


async def test_a_wrong_method_on_a_device_is_405_allowing_delete(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/devices/dev-1", headers=bearer(_id("u")))

    assert (response.status_code, response.headers["allow"]) == (405, "DELETE")
    assert (await http.get("/v1/devices/a/b", headers=bearer(_id("u")))).status_code == 404


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v1/devices/%00", "device_id"),  # PostgreSQL refuses NUL bytes (was a 500)
        ("/v1/devices/tab%09tab", "device_id"),
        ("/v1/devices/" + "d" * 129, "device_id"),
        ("/v1/devices/dev-1?app_id=", "app_id"),
        ("/v1/devices/dev-1?app_id=no%20spaces", "app_id"),
        ("/v1/devices/dev-1?user_id=", "user_id"),  # blank is no user id, not "myself"
    ],
    ids=["nul", "tab", "long", "blank-app", "app", "blank-user"],
)
async def test_path_and_query_parameters_are_checked_like_bodies(
    http: httpx.AsyncClient, url: str, field: str
) -> None:
    response = await http.delete(url, headers=bearer(_id("u")))

    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]


async def test_a_device_id_is_percent_decoded_once(http: httpx.AsyncClient) -> None:
    # "%2500" is the device id "%00": decoded twice it was a NUL byte, and a 500
    response = await http.delete("/v1/devices/%2500", headers=bearer(_id("u")))

    assert response.status_code == 404


async def test_a_blank_user_id_is_422_for_every_caller(http: httpx.AsyncClient) -> None:
    service = bearer("orders-backend", scope="devices:admin")

    assert (await http.get("/v1/devices?user_id=", headers=service)).status_code == 422
    assert (await http.get("/v1/preferences?user_id=", headers=bearer("u"))).status_code == 422


async def test_a_device_id_holding_a_slash_can_be_logged_out(http: httpx.AsyncClient) -> None:
    auth, dev = bearer(_id("u")), _id("dev") + "/tablet"
    await http.post("/v1/devices", json=device(apns_token(), dev), headers=auth)

    response = await http.delete("/v1/devices/" + dev.replace("/", "%2F"), headers=auth)

    assert response.status_code == 204
    assert "content-type" not in response.headers  # no content, so no type
    assert (await http.get("/v1/devices", headers=auth)).json() == {"devices": []}


async def test_unregister_refuses_a_token_no_platform_issues(http: httpx.AsyncClient) -> None:
    for token in ("\x00", "not a token", "ü" * 30):
        response = await http.post(
            "/v1/devices/unregister", json={"token": token}, headers=bearer(_id("u"))
        )
        assert response.status_code == 422, token  # a NUL byte was a 500


async def test_preferences_round_trip_and_defaults(http: httpx.AsyncClient) -> None:
    auth = bearer(_id("u"))
    default = await http.get("/v1/preferences", headers=auth)
    prefs = {
        "time_zone": "Europe/Berlin",
        "quiet_hours": {"start": "22:00:00", "end": "07:00:00"},
        "types": {"marketing": False, "order.shipped": True},
    }
    put = await http.put("/v1/preferences", json=prefs, headers=auth)
    fewer = await http.put(
        "/v1/preferences", json={"time_zone": "UTC", "types": {"news": False}}, headers=auth
    )
    got = await http.get("/v1/preferences", headers=auth)

    assert default.json() == {"time_zone": "UTC", "quiet_hours": None, "types": {}}
    assert put.status_code == 200
    assert fewer.status_code == 200
    assert got.json() == {"time_zone": "UTC", "quiet_hours": None, "types": {"news": False}}


async def test_invalid_preferences_are_422(http: httpx.AsyncClient) -> None:
    auth = bearer(_id("u"))
    for body in (
        {"time_zone": "Nowhere/Land"},
        {"quiet_hours": {"start": "25:00", "end": "07:00"}},
        {"quiet_hours": {"start": "22:00"}},
        {"quiet_hours": {"start": "22:00+02:00", "end": "07:00"}},  # local times only
        {"quiet_hours": {"start": 79200, "end": "07:00"}},
        {"types": {"Bad Type!": True}},
        {"types": {"news": 0}},  # a boolean, not a number
    ):
        response = await http.put("/v1/preferences", json=body, headers=auth)
        assert response.status_code == 422, body


@pytest.mark.parametrize("end", ["22:00", "22:00:00"])
async def test_quiet_hours_that_start_when_they_end_are_422(
    http: httpx.AsyncClient, end: str
) -> None:
    auth = bearer(_id("u"))
    body = {"time_zone": "UTC", "quiet_hours": {"start": "22:00", "end": end}}

    response = await http.put("/v1/preferences", json=body, headers=auth)

    assert response.status_code == 422
    error = response.json()["error"]
    assert [d["field"] for d in error["details"]] == ["quiet_hours"]
    assert "an empty window: omit quiet_hours to turn them off" in error["message"]
    assert (await http.get("/v1/preferences", headers=auth)).json()["quiet_hours"] is None


async def test_quiet_hours_stored_before_the_rule_still_read(
    http: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = _id("u")
    await db.execute(
        "INSERT INTO user_preferences (user_id, quiet_start, quiet_end) VALUES ($1, $2, $2)",
        user,
        dt.time(22, 0),
    )

    response = await http.get("/v1/preferences", headers=bearer(user))

    assert response.status_code == 200
    assert response.json()["quiet_hours"] == {"start": "22:00:00", "end": "22:00:00"}


async def samples(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The registry's /metrics, parsed: (sample name, labels) -> value."""
    text = (await http.get("/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], route: str, method: str, status: int
) -> float:
    labels = frozenset({("route", route), ("method", method), ("status", str(status))})
    return found.get(("pushfan_registry_requests_total", labels), 0.0)


def latencies(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], route: str, method: str
) -> float:
    labels = frozenset({("route", route), ("method", method)})
    return found.get(("pushfan_registry_request_seconds_count", labels), 0.0)


async def test_health_readiness_metrics_and_openapi(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    await http.post("/v1/devices", json=device(apns_token(), _id("d")), headers=bearer("m"))
    metrics = (await http.get("/metrics")).text
    assert 'pushfan_registrations_total{change="created"}' in metrics
    assert 'pushfan_registry_requests_total{method="POST",route="/v1/devices",status="201"}' in (
        metrics
    )
    document = (await http.get("/openapi.json")).json()
    assert set(document["paths"]) >= {"/v1/devices", "/v1/devices/{device_id}", "/v1/preferences"}
    assert "DeviceIn" in document["components"]["schemas"]


async def test_the_docs_page_is_served_without_a_token(http: httpx.AsyncClient) -> None:
    response = await http.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text.startswith("<!DOCTYPE html>")
    metrics = (await http.get("/metrics")).text
    assert 'pushfan_registry_requests_total{method="GET",route="/docs",status="200"}' in metrics
    assert (await http.post("/docs")).status_code == 405


async def test_requests_are_counted_by_route_template_and_method(
    http: httpx.AsyncClient,
) -> None:
    """One route template, two methods: two series. The device id of a logout is not a
    label (the route template is), nor is a method HTTP does not define."""
    user, dev = _id("u"), _id("dev")
    auth = bearer(user)
    before = await samples(http)
    assert (
        await http.post("/v1/devices", json=device(apns_token(), dev), headers=auth)
    ).status_code == 201
    for _ in range(2):
        assert (await http.get("/v1/devices", headers=auth)).status_code == 200
    assert (await http.delete(f"/v1/devices/{dev}", headers=auth)).status_code == 204
    assert (await http.request("PROPFIND", "/v1/devices", headers=auth)).status_code == 405
    after = await samples(http)

    def moved(route: str, method: str, status: int) -> float:
        return requests(after, route, method, status) - requests(before, route, method, status)

    assert moved("/v1/devices", "POST", 201) == 1
    assert moved("/v1/devices", "GET", 200) == 2
    assert moved("/v1/devices/{device_id}", "DELETE", 204) == 1
    assert moved("unmatched", "other", 405) == 1
    for route, method, n in (("/v1/devices", "POST", 1), ("/v1/devices", "GET", 2)):
        assert latencies(after, route, method) - latencies(before, route, method) == n
    text = repr(after)
    assert dev not in text
    assert user not in text
    assert "PROPFIND" not in text


async def test_the_docs_page_shows_every_operation_of_the_document(
    http: httpx.AsyncClient,
) -> None:
    document = (await http.get("/openapi.json")).json()
    outline = Outline((await http.get("/docs")).text)

    operations = outline.operations()
    documented = {(p, m): op for p, ops in document["paths"].items() for m, op in ops.items()}
    assert set(operations) == {f"{m.upper()} {p}" for p, m in documented}
    for (path, method), op in documented.items():
        tables = operations[f"{method.upper()} {path}"]
        statuses = [row[0] for row in tables["Responses"]]
        assert statuses == list(op["responses"]), (method, path)
        if "requestBody" not in op:
            assert "Request body" not in tables
            continue
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        fields = {row[0]: row[2] for row in tables["Request body"]}
        assert set(fields) == set(schema["properties"]), (method, path)
        required = {name for name, flag in fields.items() if flag == "yes"}
        assert required == set(schema.get("required", [])), (method, path)
    # not vacuous: a registration's required fields are on the page
    registration = operations["POST /v1/devices"]["Request body"]
    assert {"token", "platform", "device_id", "app_id"} <= {r[0] for r in registration if r[2]}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_bodies = (
    st.fixed_dictionaries(
        {  # each field mostly valid, sometimes anything: the mixes reach every check
            "token": st.sampled_from(["ab" * 32, "AB" * 32, "f" * 40]) | st.text(max_size=80),
            "platform": st.sampled_from(["ios", "android", "web"]) | _json_values,
            "device_id": st.sampled_from(["dev-1", "dev-2"]) | _json_values,
            "app_id": st.just("com.ex.app") | _json_values,
        },
        optional={
            "app_version": st.just("1.2.3") | _json_values,
            "time_zone": st.sampled_from(["UTC", "Europe/Berlin", "Nope/Zone", ""]) | _json_values,
            "locale": st.sampled_from(["de_DE", "en-US"]) | _json_values,
        },
    )
    | _json_values
)


@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_bodies)
async def test_no_body_makes_a_5xx(http: httpx.AsyncClient, body: Any) -> None:
    response = await http.post(
        "/v1/devices", content=json.dumps(body).encode(), headers=bearer("fuzz")
    )
    assert response.status_code < 500, response.text


async def test_an_unreachable_database_is_a_503_to_retry(settings: Settings) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = settings.database.model_copy(
        update={
            "url": SecretStr(f"postgresql://postgres@127.0.0.1:{port}/none"),
            "min_pool_size": 0,
        }
    )
    registry = RegistrySettings(jwt_secret=SecretStr(SECRET))
    down = settings.model_copy(update={"database": database, "registry": registry})
    async with running(down, port=0) as served, httpx.AsyncClient(base_url=served.url) as http:
        sent = await http.post(
            "/v1/devices", json=device(apns_token(), _id("dev")), headers=bearer(_id("u"))
        )
        listed = await http.get("/v1/devices", headers=bearer(_id("u")))
        ready = await http.get("/readyz")

    for answer in (sent, listed):
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "unavailable"
    assert ready.status_code == 503
