"""The code, the JSON Schemas in schemas/ and the committed examples agree."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from sovpack import __version__
from sovpack._protocols import RunnerTraits
from sovpack._schemas import SCHEMA_FILES, load_schema, validate
from sovpack.artifact import ArtifactMetadata
from sovpack.errors import SourceError
from sovpack.source.model import open_model
from sovpack.source.spec import ModelSpec

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


def _artifact_metadata(path: Path, files: tuple[str, ...]) -> ArtifactMetadata:
    model = open_model(path)
    return ArtifactMetadata(
        sovpack_version=__version__,
        target="onnx:fp32",
        format="onnx",
        precision="fp32",
        name=model.name,
        files=files,
        spec=model.spec,
        source=model.checkpoint.source_files,
        format_metadata={"opset": 17},
        traits=RunnerTraits(parity_limits={"max_abs": 0.05}, known_tokenizer_divergences=("a  b",)),
    )


def test_artifact_metadata_fits_the_schema_and_round_trips(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    metadata = _artifact_metadata(checkpoints["llama3"], ("model.onnx", "sovpack-artifact.json"))
    validate(metadata.to_dict(), "artifact")
    metadata.save(tmp_path)
    assert ArtifactMetadata.load(tmp_path) == metadata
    bad = _artifact_metadata(checkpoints["llama3"], ("/etc/passwd",)).to_dict()
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "artifact")
    with pytest.raises(SourceError, match="invalid artifact metadata"):
        ArtifactMetadata.from_dict(bad, "sovpack-artifact.json")
    traversal = {**metadata.to_dict(), "files": ["a/../../etc/passwd"]}
    with pytest.raises(SourceError, match="path traversal"):
        ArtifactMetadata.from_dict(traversal, "sovpack-artifact.json")


def test_committed_artifact_example_round_trips() -> None:
    data = json.loads((EXAMPLES / "artifact.example.json").read_text())
    assert ArtifactMetadata.from_dict(data, "artifact.example.json").to_dict() == data


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.example.json")), ids=lambda p: p.name)
def test_committed_examples_validate(example: Path) -> None:
    validate(json.loads(example.read_text()), example.name.removesuffix(".example.json"))
