"""Loading the JSON Schemas shipped in ``sovpack.schemas`` and validating documents against them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_FILES = (
    "model-spec",
    "artifact",
    "parity-report",
    # sovpack build/verify (bundle): see sovpack/bundle/ and sovpack/verify/
    "bundle-config",
    "bundle-policy",
    "modelpack-config",
    "parity-reference",
    "embedding-reference",
    "provenance-predicate",
    "parity-predicate",
    "model-signing-predicate",
    "in-toto-statement",
    "sigstore-bundle",
    "release-predicate",
)


@cache
def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("sovpack.schemas").joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def validate(document: Any, name: str) -> None:
    """Raise jsonschema.ValidationError if ``document`` does not fit schema ``name`` (refs resolved locally)."""
    import jsonschema
    from referencing import Registry, Resource

    registry: Registry = Registry()
    for other in SCHEMA_FILES:
        try:
            schema = load_schema(other)
        except FileNotFoundError:
            continue
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
    jsonschema.Draft202012Validator(load_schema(name), registry=registry).validate(document)
