"""The registry's HTML documentation page (``registry/docs.py``), read back as a browser
would (``html.parser``): what the page says, and that nothing in the document becomes
markup. ``tests/test_registry_api.py`` fetches the served page over HTTP."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from typing import Any

from registry.docs import render
from registry.openapi import openapi_document

METHODS = {"GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"}


class Outline(HTMLParser):
    """The page's tags, links, ids and text, and its tables' body rows (cell texts)
    under each ``h3`` (an operation, "METHOD path") and ``h4`` ("Request body", ...)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.tables: dict[str, dict[str, list[list[str]]]] = {}
        self._h3 = self._h4 = ""
        self._buffer: list[str] = []
        self._row: list[str] = []
        self.feed(page)
        self.close()

    def operations(self) -> dict[str, dict[str, list[list[str]]]]:
        return {h3: t for h3, t in self.tables.items() if h3.split(" ")[0] in METHODS}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name == "href":
                self.hrefs.append(value or "")
            elif name == "id":
                self.ids.add(value or "")
        if tag in ("h3", "h4", "td", "th"):
            self._buffer = []
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self._buffer).strip()
        if tag == "h3":
            self._h3, self._h4 = text, ""
            self.tables.setdefault(text, {})
        elif tag == "h4":
            self._h4 = text
        elif tag == "td":
            self._row.append(text)
        elif tag == "tr" and self._row:  # a header row (th) leaves it empty
            self.tables[self._h3].setdefault(self._h4, []).append(self._row)

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        self._buffer.append(data)


EVIL = '<script>alert("pwned")</script>'


def evil_document() -> dict[str, Any]:
    """An OpenAPI document with markup in every string the page shows."""
    thing = {
        "type": "object",
        "description": EVIL,
        "required": ["name", "<blink>"],
        "properties": {
            "name": {"type": "string", "description": EVIL},
            "<blink>": {"type": "integer"},
            "note": {"enum": [EVIL, "plain"]},
        },
    }
    operation = {
        "summary": EVIL,
        "description": EVIL,
        "security": [{"bearer": []}],
        "parameters": [{"name": EVIL, "in": "query", "description": EVIL, "schema": {}}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}},
        },
        "responses": {"200": {"description": EVIL}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": EVIL, "version": EVIL, "description": EVIL},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "description": EVIL}},
            "schemas": {"Thing": thing},
        },
        "paths": {"/things/{<id>}": {"post": operation}},
    }


def test_no_string_of_the_document_becomes_markup() -> None:
    page = render(evil_document()).decode()
    outline = Outline(page)

    assert "<script" not in page.lower()
    assert "<blink" not in page.lower()
    assert outline.tags.isdisjoint({"script", "blink"})
    # ... and each is still there, as text: title, description, scheme, summary, fields
    assert "".join(outline.text).count(EVIL) >= 10


def test_a_referenced_request_body_lists_its_fields() -> None:
    outline = Outline(render(evil_document()).decode())

    (operation,) = outline.operations()
    assert operation == "POST /things/{<id>}"
    assert outline.tables[operation]["Request body"] == [
        ["name", "string", "yes", EVIL],
        ["<blink>", "integer", "yes", ""],
        ["note", f'{json.dumps(EVIL)} | "plain"', "", ""],
    ]
    assert outline.tables[operation]["Responses"] == [["200", EVIL, ""]]


def test_the_page_needs_nothing_from_elsewhere() -> None:
    page = render(openapi_document()).decode()
    outline = Outline(page)

    assert outline.tags.isdisjoint({"script", "link", "img", "iframe", "object", "embed"})
    assert "src=" not in page
    assert "url(" not in page  # no font or image pulled in by the stylesheet
    assert "/openapi.json" in outline.hrefs
    # Every other link is to a schema table on the page itself.
    assert {h.removeprefix("#") for h in outline.hrefs if h != "/openapi.json"} <= outline.ids
