"""What a bundle is on disk: an OCI layout of ModelPack manifests and signed attestations that skopeo can copy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sovpack._schemas import validate
from sovpack.attest.dsse import SigstoreBundle
from sovpack.bundle import param_size
from sovpack.errors import VerificationError
from sovpack.oci.media import ANN_FILEPATH, AT_MODEL, MT_DOC, MT_MODEL_CONFIG, MT_WEIGHT
from sovpack.verify import extract_target, verify_bundle
from tests.bundle.shared import Layout, available_targets

# ------------------------------------------------------------------------------------------------ format


def test_every_format_is_covered(built: Any) -> None:
    formats = {t.target.split(":")[0] for t in built.targets}
    assert {"onnx", "gguf", "openvino"} <= formats, f"built only {sorted(formats)}"
    assert len({t.target for t in built.targets}) == len(available_targets())


def test_layout_is_oci_with_modelpack_manifests(built: Any) -> None:
    layout = Layout(built.output)
    assert json.loads((built.output / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    top = layout.index_json
    assert top["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    index = layout.bundle_index
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["annotations"]["dev.sovpack.tag"] == "v1"
    assert "org.opencontainers.image.ref.name" not in index["annotations"]  # image-spec: index.json only
    for built_target in built.targets:
        manifest = layout.json(layout.target_digest(built_target.target))
        assert manifest["artifactType"] == AT_MODEL
        assert manifest["config"]["mediaType"] == MT_MODEL_CONFIG
        config = layout.json(manifest["config"]["digest"])
        validate(config, "modelpack-config")
        fmt = built_target.target.split(":")[0]
        assert config["config"]["format"] == fmt
        assert config["descriptor"]["licenses"] == ["Apache-2.0"]
        assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
        assert "createdAt" not in config["descriptor"]  # no SOURCE_DATE_EPOCH: no timestamps
        types = {layer["annotations"][ANN_FILEPATH]: layer["mediaType"] for layer in manifest["layers"]}
        assert types["parity.json"] == MT_DOC
        assert types["sovpack-artifact.json"] == MT_DOC  # packager metadata
        assert MT_WEIGHT in types.values()
        for layer in manifest["layers"]:  # ModelPack file attributes, fixed so builds stay byte-identical
            meta = json.loads(layer["annotations"]["org.cncf.model.file.metadata+json"])
            assert meta == {"name": layer["annotations"][ANN_FILEPATH].rsplit("/", 1)[-1], "mode": 0o644, "uid": 0,
                            "gid": 0, "size": layer["size"], "mtime": "1970-01-01T00:00:00Z", "typeflag": 48}
        assert sorted(types) == list(built_target.files)
        # one attestation of each kind, each an OCI 1.1 referrer of the target manifest
        for kind in ("signature", "provenance", "parity"):
            (entry,) = layout.entries("attestation", built_target.target, kind)
            attestation = layout.json(entry["digest"])
            assert attestation["subject"]["digest"] == layout.target_digest(built_target.target)
            assert attestation["artifactType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert param_size(151488) == "151.5K" and param_size(8_030_261_248) == "8B"


def test_identical_files_are_stored_once(built: Any) -> None:
    layout = Layout(built.output)
    digests: dict[str, set[str]] = {}
    for t in built.targets:
        for layer in layout.json(layout.target_digest(t.target))["layers"]:
            digests.setdefault(layer["annotations"][ANN_FILEPATH], set()).add(layer["digest"])
    assert len(digests["tokenizer.json"]) == 1  # every target ships the same tokenizer.json: one blob
    names = sorted(p.name for p in (built.output / "blobs" / "sha256").iterdir())
    assert len(names) == len(set(names))


def test_signed_documents_fit_their_schemas(built: Any) -> None:
    layout = Layout(built.output)
    seen = set()
    for entry in layout.entries("attestation"):
        manifest = layout.json(entry["digest"])
        raw = layout.blob(manifest["layers"][0]["digest"]).read_bytes()
        bundle_doc = json.loads(raw)
        validate(bundle_doc, "sigstore-bundle")
        statement = json.loads(SigstoreBundle.from_bytes(raw).envelope.payload)
        validate(statement, "in-toto-statement")
        seen.add(statement["predicateType"])
    assert seen == {
        "https://model_signing/signature/v1.0",
        "https://slsa.dev/provenance/v1",
        "https://in-toto.io/attestation/test-result/v0.1",
    }
    (reference,) = layout.entries("parity-reference")
    validate(layout.json(layout.json(reference["digest"])["config"]["digest"]), "parity-reference")


def test_provenance_records_sources_parameters_and_runtimes(built: Any, checkpoint: Path) -> None:
    layout = Layout(built.output)
    target = built.targets[0].target
    (entry,) = layout.entries("attestation", target, "provenance")
    raw = layout.blob(layout.json(entry["digest"])["layers"][0]["digest"]).read_bytes()
    statement = json.loads(SigstoreBundle.from_bytes(raw).envelope.payload)
    assert statement["subject"][0]["digest"]["sha256"] == layout.target_digest(target).split(":")[1]
    predicate = statement["predicate"]
    deps = {d["name"]: d["digest"]["sha256"] for d in predicate["buildDefinition"]["resolvedDependencies"]}
    from sovpack._io import sha256_file

    assert deps["model.safetensors"] == sha256_file(checkpoint / "model.safetensors").removeprefix("sha256:")
    assert predicate["buildDefinition"]["externalParameters"]["target"] == target
    assert predicate["runDetails"]["builder"]["version"]["sovpack"]
    runtime = predicate["buildDefinition"]["internalParameters"]["parityRuntime"]
    assert runtime["target"]["runtime"] and runtime["reference"]["runtime"] == "numpy-reference"
    assert "metadata" not in predicate["runDetails"]
    from sovpack.attest.provenance import runner_facts

    assert predicate["buildDefinition"]["internalParameters"]["runner"] == runner_facts()  # who checked this part


# ------------------------------------------------------------------------------------------------- skopeo


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install -y skopeo)")
def test_skopeo_inspects_and_copies_and_the_copy_verifies(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{built.output}:v1"], capture_output=True, text=True, check=True,
        timeout=120,
    )
    index = json.loads(raw.stdout)
    assert {m["digest"] for m in index["manifests"]} >= {t.manifest_digest for t in built.targets}
    dest = tmp_path / "copied"
    subprocess.run(
        ["skopeo", "copy", "--all", f"oci:{built.output}:v1", f"oci:{dest}:v1"], capture_output=True, text=True,
        check=True, timeout=300,
    )
    for t in built.targets:  # manifests travel byte for byte (the indexes are re-serialized by skopeo)
        original = Layout(built.output).blob(t.manifest_digest).read_bytes()
        assert Layout(dest).blob(t.manifest_digest).read_bytes() == original
    report = verify_bundle(dest, keys=[keys["verifying"]])
    assert report.ok, report.failures
    assert [t.manifest_digest for t in report.targets] == [t.manifest_digest for t in built.targets]
    out = extract_target(dest, built.targets[0].target, tmp_path / "out", keys=[keys["verifying"]])
    assert (out.out_dir / "model.sig").is_file()
    # The tag is part of what was signed: a copy re-tagged by another tool verifies by no tag but the signed one.
    retagged = tmp_path / "retagged"
    subprocess.run(
        ["skopeo", "copy", "--all", f"oci:{built.output}:v1", f"oci:{retagged}:prod"], capture_output=True,
        text=True, check=True, timeout=300,
    )
    report = verify_bundle(retagged, keys=[keys["verifying"]], tag="prod")
    assert not report.ok and any("tagged 'prod' here but was signed as 'v1'" in f for f in report.failures)
    with pytest.raises(VerificationError, match=r"built as 'v1'"):
        verify_bundle(retagged, keys=[keys["verifying"]])
