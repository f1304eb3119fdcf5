"""The code, the JSON Schemas in schemas/ and the committed examples agree."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from sovpack.convert import artifact_metadata
from sovpack.model import open_model
from sovpack.schemas_io import SCHEMA_FILES, load_schema, validate
from sovpack.spec import ModelSpec
from sovpack.targets.base import TargetRef

EXAMPLES = Path(__file__).parent.parent / "schemas" / "examples"


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema(name))


def test_every_fixture_spec_fits_the_schema_and_round_trips(checkpoints: dict[str, Path]) -> None:
    for path in checkpoints.values():
        spec = open_model(path).spec
        validate(spec.to_dict(), "model-spec")
        assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_schema_lists_every_dataclass_field() -> None:
    schema = load_schema("model-spec")
    fields = set(ModelSpec.__dataclass_fields__)
    assert set(schema["properties"]) == fields and set(schema["required"]) == fields


def test_artifact_metadata_fits_the_schema(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama3"])
    ref = TargetRef(format="onnx", precision="fp32")
    validate(artifact_metadata(model, ref, ["model.onnx"], {"opset": 17}), "artifact")
    bad = artifact_metadata(model, ref, ["/etc/passwd"], {})
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "artifact")


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.example.json")), ids=lambda p: p.name)
def test_committed_examples_validate(example: Path) -> None:
    validate(json.loads(example.read_text()), example.name.removesuffix(".example.json"))
