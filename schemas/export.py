"""Generate (or check) the JSON Schema files for non-Python producers and consumers.

    python -m schemas.export           # rewrite schemas/json/*.schema.json
    python -m schemas.export --check   # exit 1 naming the files that drifted

The files are generated, never hand-edited: the pydantic models are the
source of truth, and CI runs ``--check`` so the files cannot drift from them.
A schema cannot say everything the models enforce (the encoded payload byte
limit, byte-length limits, reserved data keys); the descriptions say so.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from schemas.events import DeadLetter, InvalidTokenEvent
from schemas.job import NotificationJob

__all__ = ["JSON_DIR", "SCHEMAS", "drifted", "main", "render", "write"]

JSON_DIR: Final = Path(__file__).parent / "json"

SCHEMAS: Final[dict[str, type[BaseModel]]] = {
    "notification-job.v1.schema.json": NotificationJob,
    "invalid-token-event.v1.schema.json": InvalidTokenEvent,
    "dead-letter.v1.schema.json": DeadLetter,
}

_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
_SUFFIX: Final = ".schema.json"


def _schema_id(model: type[BaseModel]) -> str:
    for name, candidate in SCHEMAS.items():
        if candidate is model:
            return "urn:pushfan:schema:" + name.removesuffix(_SUFFIX)
    return "urn:pushfan:schema:" + model.__name__


def render(model: type[BaseModel]) -> str:
    """``model``'s validation JSON Schema (draft 2020-12) as stable, sorted, indented text.

    The output is deterministic, so it can be committed and compared byte for byte.
    """
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = _DIALECT
    schema["$id"] = _schema_id(model)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def drifted(directory: Path = JSON_DIR) -> list[str]:
    """Names of schema files in ``directory`` that are missing, stale or unexpected."""
    names = []
    for name, model in SCHEMAS.items():
        path = directory / name
        if not path.is_file() or path.read_bytes() != render(model).encode():
            names.append(name)
    names.extend(
        path.name for path in sorted(directory.glob("*" + _SUFFIX)) if path.name not in SCHEMAS
    )
    return names


def write(directory: Path = JSON_DIR) -> list[Path]:
    """(Re)write every schema file in ``directory``, deleting ones no model backs."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*" + _SUFFIX):
        if path.name not in SCHEMAS:
            path.unlink()
    written = []
    for name, model in SCHEMAS.items():
        path = directory / name
        path.write_bytes(render(model).encode())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 if any file differs"
    )
    parser.add_argument("--dir", type=Path, default=JSON_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    if args.check:
        stale = drifted(directory)
        if stale:
            print(
                f"JSON Schemas out of date in {directory}: {', '.join(stale)}; "
                "run `python -m schemas.export`",
                file=sys.stderr,
            )
            return 1
        print(f"JSON Schemas in {directory} are up to date")
        return 0
    for path in write(directory):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
