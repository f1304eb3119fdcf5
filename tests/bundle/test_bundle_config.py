"""sovpack.toml and policy files, and the small pure helpers of the bundle format (no conversion: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sovpack._io import check_relative_path, source_date
from sovpack._schemas import SCHEMA_FILES, validate
from sovpack.attest.oms import OmsManifest, parse_statement
from sovpack.bundle import layer_media_type, modelpack_precision, param_size
from sovpack.bundle.config import BuildConfig, BundleMetadata, load_build_config
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.media import MT_DOC, MT_WEIGHT, MT_WEIGHT_CONFIG
from sovpack.targets.base import TargetRef
from sovpack.verify import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
BUNDLE_SCHEMAS = SCHEMA_FILES[SCHEMA_FILES.index("bundle-config"):]  # everything build and verify write

TOML = """
checkpoint = "models/tiny"
output = "dist/tiny.oci"
tag = "v1.2"
targets = ["onnx:fp16", "gguf:q8_0"]

[signing]
key = "keys/private.pem"
password_file = "/run/secrets/key-password"

[metadata]
name = "tiny"
license = "MIT"
authors = ["a@example.test"]

[parity]
prompts = ["Hello there"]
thresholds = { mean_kl = "none", warn_factor = 3.0 }

[parity.targets."gguf:q8_0"]
min_greedy = 0.5
"""


def test_every_bundle_schema_is_registered_and_has_an_example() -> None:
    for name in BUNDLE_SCHEMAS:
        assert name in SCHEMA_FILES
        example = EXAMPLES / f"{name}.example.json"
        assert example.is_file(), example
        validate(json.loads(example.read_text()), name)


def test_toml_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "release" / "sovpack.toml"
    path.parent.mkdir()
    path.write_text(TOML)
    config = load_build_config(path)
    assert config.checkpoint == path.parent / "models/tiny"
    assert config.output == path.parent / "dist/tiny.oci"
    assert config.key == path.parent / "keys/private.pem"
    assert config.password_file == Path("/run/secrets/key-password")
    assert config.tag == "v1.2" and config.targets == ("onnx:fp16", "gguf:q8_0")
    assert config.prompts == ("Hello there",)
    assert config.metadata == BundleMetadata(name="tiny", licenses=("MIT",), authors=("a@example.test",))
    assert config.overrides_for("onnx:fp16") == {"mean_kl": None, "warn_factor": 3.0}
    assert config.overrides_for("gguf:q8_0") == {"mean_kl": None, "warn_factor": 3.0, "min_greedy": 0.5}
    validate(config.to_dict(), "bundle-config")
    assert BuildConfig.from_dict(config.to_dict()).overrides_for("gguf:q8_0") == config.overrides_for("gguf:q8_0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('targets = "onnx"', "invalid at targets"),
        ("unknown = 1", "invalid at (top level)"),
        ('[parity]\nthresholds = { max_abs = "lots" }', "invalid at parity/thresholds/max_abs"),
        ('[signing]\npassword_file = "a"\npassword_env = "B"', "invalid at signing"),
        ("tag = [", "not valid TOML"),
    ],
)
def test_bad_config_files_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sovpack.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_build_config(path)


def test_policy_files(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"keys": ["k.pem"], "required_targets": ["gguf:q8_0"],
                                                 "allowed_parity": ["PASSED"]}))
    policy = Policy.load(tmp_path / "p.json")
    assert policy.keys == (tmp_path / "k.pem",) and policy.allowed_parity == ("PASSED",)
    (tmp_path / "p.toml").write_text('required_targets = ["onnx:fp16"]\n')
    assert Policy.load(tmp_path / "p.toml").allowed_parity == ("PASSED", "WARNED")
    (tmp_path / "bad.json").write_text(json.dumps({"allowed_parity": ["GREAT"]}))
    with pytest.raises(UsageError, match="invalid policy at allowed_parity"):
        Policy.load(tmp_path / "bad.json")


def test_modelpack_names() -> None:
    def names(target: str) -> tuple[str, str | None]:
        return modelpack_precision(TargetRef.parse(target).info)  # from the target's own precision table

    assert names("onnx:fp16") == ("float16", None)
    assert names("gguf:bf16") == ("bfloat16", None)
    assert names("gguf:q8_0") == ("int8", "q8_0")
    assert names("gguf:q4_k_m") == ("uint8", "q4_k_m")  # ModelPack has no 4-bit type: the packed bytes
    assert names("openvino:int4_sym") == ("uint8", "int4_sym")
    assert [param_size(n) for n in (600, 151_488, 1_234_567, 6_740_000_000, 70_600_000_000)] == [
        "0.6K", "151.5K", "1.2M", "6.7B", "70.6B",
    ]


def test_layer_media_types() -> None:
    assert layer_media_type("model.onnx.data") == MT_WEIGHT
    assert layer_media_type("llama3-q8_0.gguf") == MT_WEIGHT
    assert layer_media_type("openvino_model.bin") == MT_WEIGHT
    assert layer_media_type("openvino_tokenizer.bin") == MT_WEIGHT_CONFIG
    assert layer_media_type("tokenizer.model") == MT_WEIGHT_CONFIG
    assert layer_media_type("sovpack-artifact.json") == MT_DOC  # packager metadata
    assert layer_media_type("parity.json") == MT_DOC


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "C:/x", "a\x00b"])
def test_unsafe_paths_are_refused(bad: str) -> None:
    with pytest.raises(VerificationError):
        check_relative_path(bad, "test")


def test_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date() is None
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert source_date() == "1970-01-01T00:00:00Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError):
        source_date()


def test_oms_statement_round_trip_and_root_digest() -> None:
    manifest = OmsManifest(model_name="m", files={"b/x": "11" * 32, "a": "22" * 32, "a-b": "33" * 32})
    statement = manifest.statement()
    # model-signing orders resources as POSIX paths: "a" < "a-b" < "b/x"
    assert [r["name"] for r in statement.predicate["resources"]] == ["a", "a-b", "b/x"]
    import hashlib

    expected = hashlib.sha256(bytes.fromhex("22" * 32 + "33" * 32 + "11" * 32)).hexdigest()
    assert statement.subjects[0].digest["sha256"] == expected
    assert parse_statement(statement).files == manifest.files
    validate(statement.to_dict(), "in-toto-statement")
