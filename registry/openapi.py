"""The registry API's OpenAPI 3.1 document, built from the same pydantic models that
validate requests, so the document cannot drift from what the API accepts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from registry.models import (
    DeviceIn,
    DeviceOut,
    DeviceRef,
    PreferencesBody,
    RegisteredOut,
    TokenIn,
    UserRef,
)

_MODELS: list[type[BaseModel]] = [DeviceIn, DeviceOut, PreferencesBody, RegisteredOut, TokenIn]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": ref}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        401: "No or bad bearer token.",
        403: "Acting for another user without the service scope.",
        404: "Nothing of the caller's matched.",
        413: "Body too large.",
        422: "Invalid body or parameters; `details` names each field.",
    }
    answers = {
        str(c): {"description": text[c], **_json("#/components/schemas/Error")} for c in codes
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


def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    components = dict(schemas.get("$defs", {}))
    components["Error"] = _ERROR
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
        "info": {"title": "pushfan token registry", "version": "1"},
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
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
                        **_errors(401, 403, 413, 422),
                    },
                },
                "get": {
                    **secured,
                    "summary": "The user's active devices (tokens masked)",
                    "responses": {"200": {"description": "Devices."}, **_errors(401, 403, 422)},
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
                        **_errors(401, 403, 404, 422),
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
                        **_errors(401, 403, 404, 413, 422),
                    },
                }
            },
            "/v1/preferences": {
                "get": {
                    **secured,
                    "summary": "Quiet hours and push on/off per notification type",
                    "responses": {
                        "200": {"description": "Preferences.", **_json(ref + "PreferencesBody")},
                        **_errors(401, 403, 422),
                    },
                },
                "put": {
                    **secured,
                    "summary": "Replace the preferences",
                    "requestBody": {"required": True, **_json(ref + "PreferencesBody")},
                    "responses": {
                        "200": {"description": "Stored.", **_json(ref + "PreferencesBody")},
                        **_errors(401, 403, 413, 422),
                    },
                },
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": {"description": "Up."}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the database answers",
                    "responses": {"200": {"description": "Ready."}, "503": {"description": "Not."}},
                }
            },
        },
    }
