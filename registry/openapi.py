"""The registry API's OpenAPI 3.1 document, built from the same pydantic models that
validate requests, so the document cannot drift from what the API accepts.

``tests/test_registry_fuzz.py`` holds the server to it: every status an operation can
answer is listed here, and every body matches the schema listed for its status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from registry.models import (
    DeviceIn,
    DeviceList,
    DeviceRef,
    PreferencesBody,
    RegisteredOut,
    TimeZone,
    TokenIn,
    UserRef,
)

_MODELS: list[type[BaseModel]] = [DeviceIn, DeviceList, PreferencesBody, RegisteredOut, TokenIn]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "reason"],
                        "additionalProperties": False,
                        "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
                    },
                },
            },
        }
    },
}

_STATUS = {
    "type": "object",
    "required": ["status"],
    "additionalProperties": False,
    "properties": {"status": {"type": "string"}},
}


_DESCRIPTION = (
    "Apps register their push tokens here and log them out; app backends may do so for"
    " their users with a service token. Tokens appear in no URL or response (only their"
    ' fingerprints). Every bad request is a 4xx with {"error": {"code", "message",'
    ' "details"?}}, where details names each field. Every call is safe to repeat, so a'
    " 503 is retried."
)
_BEARER = (
    "A JWT in `Authorization: Bearer <JWT>`: HS256 (the registry's shared secret) or"
    " RS256 (the issuer's public key), as the registry is configured"
    " (PUSHFAN_REGISTRY__JWT_*). `iss`, `aud`, `exp` and `sub` are required; `iss` and"
    " `aud` must be the configured ones (by default `pushfan` and `pushfan-registry`)."
    " The caller is the token's `sub` and acts for itself. A token whose `scope`"
    " (space-separated) holds the service scope (PUSHFAN_REGISTRY__SERVICE_SCOPE, by"
    " default `devices:admin`) may act for any user, named with `?user_id=`."
)


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": ref}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        401: "No or bad bearer token.",
        403: "Acting for another user without the service scope.",
        404: "Nothing of the caller's matched.",
        413: "Body too large.",
        422: "Invalid body or parameters; `details` names each field.",
        503: "The database does not answer; retry (every call is safe to repeat).",
    }
    answers = {
        str(c): {"description": text[c], **_json("#/components/schemas/Error")} for c in codes
    }
    if "503" in answers:
        answers["503"]["headers"] = {
            "Retry-After": {"required": False, "schema": {"type": "string"}}
        }
    if "401" in answers:
        answers["401"]["headers"] = {
            "WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}}
        }
    return answers


def _field(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The JSON Schema of one field of ``model``, for a parameter validated by it."""
    schema = dict(model.model_json_schema()["properties"][name])
    schema.pop("title", None)
    schema.pop("default", None)
    # An optional query parameter is absent, never null: keep the string branch.
    for branch in schema.pop("anyOf", []):
        if branch.get("type") != "null":
            schema.update(branch)
    return schema


def _keys_must_match(node: Any) -> None:
    """Move the key pattern of ``dict[Constrained, V]`` into ``propertyNames``.

    pydantic writes it as ``patternProperties``, which leaves a key that misses the
    pattern unconstrained, while the API refuses it: the document would call a body
    valid that gets a 422."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        names = node.get("propertyNames")
        if isinstance(patterns, dict) and len(patterns) == 1 and isinstance(names, dict):
            ((pattern, values),) = patterns.items()
            node["propertyNames"] = {**names, "pattern": pattern}
            node["additionalProperties"] = values
            del node["patternProperties"]
        for child in node.values():
            _keys_must_match(child)
    elif isinstance(node, list):
        for child in node:
            _keys_must_match(child)


def _shared(node: Any, schema: dict[str, Any], ref: str) -> None:
    """Point every inline copy of ``schema`` (its ``enum``) at ``ref`` instead: the
    time zone list is hundreds of names, written once rather than in every body."""
    if isinstance(node, dict):
        if node.get("enum") == schema["enum"]:
            for key in schema:
                node.pop(key, None)
            node["$ref"] = ref
        for child in node.values():
            _shared(child, schema, ref)
    elif isinstance(node, list):
        for child in node:
            _shared(child, schema, ref)


def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    components = dict(schemas.get("$defs", {}))
    components["Error"] = _ERROR
    components["Status"] = _STATUS
    _keys_must_match(components)
    zones = TypeAdapter(TimeZone).json_schema()
    _shared(components, zones, "#/components/schemas/TimeZone")
    components["TimeZone"] = {**zones, "description": "An IANA time zone, e.g. Europe/Berlin."}
    user_param = {
        "name": "user_id",
        "in": "query",
        "required": False,
        "description": "Service tokens only: the user to act for.",
        "schema": _field(UserRef, "user_id"),
    }
    secured = {"security": [{"bearer": []}], "parameters": [user_param]}
    ref = "#/components/schemas/"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pushfan token registry",
            "version": "1",
            "description": _DESCRIPTION,
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": _BEARER,
                }
            },
        },
        "paths": {
            "/v1/devices": {
                "post": {
                    **secured,
                    "summary": "Register or refresh a device token for the user",
                    "requestBody": {"required": True, **_json(ref + "DeviceIn")},
                    "responses": {
                        "201": {"description": "A new token.", **_json(ref + "RegisteredOut")},
                        "200": {"description": "Known token.", **_json(ref + "RegisteredOut")},
                        **_errors(401, 403, 413, 422, 503),
                    },
                },
                "get": {
                    **secured,
                    "summary": "The user's active devices (tokens masked)",
                    "responses": {
                        "200": {"description": "Devices.", **_json(ref + "DeviceList")},
                        **_errors(401, 403, 422, 503),
                    },
                },
            },
            "/v1/devices/{device_id}": {
                "delete": {
                    "security": [{"bearer": []}],
                    "summary": "Log out a device: its token stops receiving at once",
                    "parameters": [
                        {
                            "name": "device_id",
                            "in": "path",
                            "required": True,
                            "schema": _field(DeviceRef, "device_id"),
                        },
                        {
                            "name": "app_id",
                            "in": "query",
                            "required": False,
                            "description": "Only the device's token of this app.",
                            "schema": _field(DeviceRef, "app_id"),
                        },
                        user_param,
                    ],
                    "responses": {
                        "204": {"description": "Logged out."},
                        **_errors(401, 403, 404, 422, 503),
                    },
                }
            },
            "/v1/devices/unregister": {
                "post": {
                    **secured,
                    "summary": "Log out a token (sent in the body, never in a URL)",
                    "requestBody": {"required": True, **_json(ref + "TokenIn")},
                    "responses": {
                        "204": {"description": "Logged out."},
                        **_errors(401, 403, 404, 413, 422, 503),
                    },
                }
            },
            "/v1/preferences": {
                "get": {
                    **secured,
                    "summary": "Quiet hours and push on/off per notification type",
                    "responses": {
                        "200": {"description": "Preferences.", **_json(ref + "PreferencesBody")},
                        **_errors(401, 403, 422, 503),
                    },
                },
                "put": {
                    **secured,
                    "summary": "Replace the preferences",
                    "requestBody": {"required": True, **_json(ref + "PreferencesBody")},
                    "responses": {
                        "200": {"description": "Stored.", **_json(ref + "PreferencesBody")},
                        **_errors(401, 403, 413, 422, 503),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": {"description": "Up.", **_json(ref + "Status")}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the database answers",
                    "responses": {
                        "200": {"description": "Ready.", **_json(ref + "Status")},
                        **_errors(503),
                    },
                }
            },
        },
    }
