"""The registry API's documentation for people, as one HTML page (``GET /docs``).

``render(document)`` turns an OpenAPI 3 document (``openapi.py`` builds the registry's)
into a self-contained page: no script, and no stylesheet, font or image from elsewhere,
so it reads the same on a machine without internet. In order: the API's title, version
and description; authentication (each security scheme's description); every operation,
grouped by path, as METHOD path with its summary, description, parameters, request body
(its fields: name, type, whether required, description; ``$ref``s resolved in the
document) and responses (status and description); then the schemas the operations name.
It links the machine-readable document at ``/openapi.json``. Every string taken from
the document is escaped with ``html.escape``, so no description can add markup.

The app renders the page once at start; it is served without authentication.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_CSS = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    "section{border-top:1px solid #ccc;margin-top:1.5em}table{border-collapse:collapse}"
    "th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}"
    ".m{font-family:monospace;padding:0 .4em;background:#def}"
)


def render(document: dict[str, Any]) -> bytes:
    """The page for ``document``, as UTF-8 HTML."""
    info, components = document.get("info", {}), document.get("components", {})
    title, version = _e(info.get("title", "API")), _e(info.get("version"))
    out = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title} {version}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title} <small>version {version}</small></h1>{_para(info.get('description'))}",
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>'
        f" (OpenAPI {_e(document.get('openapi'))}).</p><h2>Authentication</h2>",
    ]
    for name, scheme in components.get("securitySchemes", {}).items():
        kind = " ".join(str(scheme[k]) for k in ("scheme", "bearerFormat") if k in scheme)
        kind = _e(kind or scheme.get("type"))
        out.append(f"<h3>{_e(name)} <small>({kind})</small></h3>{_para(scheme.get('description'))}")
    out.append("<h2>Operations</h2>")
    for path, operations in document.get("paths", {}).items():
        for method in (m for m in _METHODS if m in operations):
            out += _operation(document, method, path, operations[method])
    out.append("<h2>Schemas</h2>")
    for name, schema in components.get("schemas", {}).items():
        out.append(f'<section id="schema-{_e(name)}"><h3>{_e(name)}</h3>')
        out += [_para(schema.get("description")), *_fields(document, schema), "</section>"]
    return "\n".join([*(part for part in out if part), "</body></html>\n"]).encode()


def _operation(document: dict[str, Any], method: str, path: str, op: dict[str, Any]) -> list[str]:
    security = op.get("security", document.get("security", []))
    needs = " or ".join(_e(name) for requirement in security for name in requirement)
    out = [
        f'<section><h3><span class="m">{method.upper()}</span> {_e(path)}</h3>',
        _para(op.get("summary"), "<b>", "</b>"),
        _para(op.get("description")),
        f"<p>Authentication: {needs}</p>" if needs else "<p>No authentication.</p>",
    ]
    if params := [_deref(document, p) for p in op.get("parameters", [])]:
        out += ["<h4>Parameters</h4>", _row("th", "name", "in", "type", "required", "description")]
        for p in params:
            name, where = f"<code>{_e(p.get('name'))}</code>", _e(p.get("in"))
            shape, required = _type(p.get("schema", {})), "yes" if p.get("required") else ""
            out.append(_row("td", name, where, shape, required, _e(p.get("description"))))
        out.append("</table>")
    body = _deref(document, op.get("requestBody", {}))
    for media, content in body.get("content", {}).items():
        required = " (required)" if body.get("required") else ""
        out.append(f"<h4>Request body</h4><p>{_e(media)}{required}</p>")
        out += _fields(document, content.get("schema", {}))
    out += ["<h4>Responses</h4>", _row("th", "status", "description", "body")]
    for status, answer in op.get("responses", {}).items():
        answer = _deref(document, answer)
        shapes = ", ".join(_type(c.get("schema", {})) for c in answer.get("content", {}).values())
        out.append(_row("td", _e(status), _e(answer.get("description")), shapes))
    return [*out, "</table></section>"]


def _fields(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """A table of the object's properties, or the schema's type when it has none."""
    resolved = _deref(document, schema)
    if not resolved.get("properties"):
        return [f"<p>{_type(schema)}</p>"]
    out = [_row("th", "field", "type", "required", "description")]
    for name, prop in resolved["properties"].items():
        described = prop.get("description") or _deref(document, prop).get("description")
        required = "yes" if name in resolved.get("required", []) else ""
        out.append(_row("td", f"<code>{_e(name)}</code>", _type(prop), required, _e(described)))
    return [*out, "</table>"]


def _deref(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or what its local ``$ref`` (``#/components/...``) points at."""
    ref = node.get("$ref")
    if not (isinstance(ref, str) and ref.startswith("#/")):
        return node
    target: Any = document
    for key in ref[2:].split("/"):  # a JSON Pointer
        key = key.replace("~1", "/").replace("~0", "~")
        target = target.get(key, {}) if isinstance(target, dict) else {}
    return target if isinstance(target, dict) else {}


def _type(schema: dict[str, Any]) -> str:
    """The schema's type as HTML; a named schema links to its table."""
    if isinstance(schema.get("$ref"), str):
        name = _e(schema["$ref"].rsplit("/", 1)[-1])
        return f'<a href="#schema-{name}">{name}</a>'
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " or ".join(_type(branch) for branch in schema[key])
    if "const" in schema:
        return escape(json.dumps(schema["const"]))
    kind = schema.get("type", "any")
    kind = " or ".join(map(str, kind)) if isinstance(kind, list) else str(kind)
    values = schema.get("enum")
    if isinstance(values, list):
        if len(values) > 12:
            return f"{escape(kind)}, one of {len(values)} values"
        return " | ".join(escape(json.dumps(value)) for value in values)
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return escape(kind)


def _e(text: Any) -> str:
    """``text`` escaped for HTML; nothing for None or empty."""
    return escape(str(text)) if text else ""


def _para(text: Any, before: str = "", after: str = "") -> str:
    return f"<p>{before}{_e(text)}{after}</p>" if text else ""


def _row(tag: str, *cells: str) -> str:
    """A table row of ``cells``, HTML already (escaped by the caller); "th" opens a table."""
    row = "<tr>" + "".join(f"<{tag}>{cell}</{tag}>" for cell in cells) + "</tr>"
    return "<table>" + row if tag == "th" else row
