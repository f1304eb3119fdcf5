"""The signed bundle end to end: build from the llama3 fixture with every format, verify, tamper, copy, extract.

One bundle is built per module (real converters, real runtimes, real parity); tamper cases work on copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from fixtures.generate import make_checkpoint
from sovpack._io import check_relative_path
from sovpack._schemas import validate
from sovpack.attest.dsse import SigningKey, SigstoreBundle, VerifyingKey, generate_key_pair
from sovpack.bundle import build_bundle, param_size
from sovpack.bundle.config import BuildConfig, BundleMetadata
from sovpack.cli import cli
from sovpack.errors import ParityError, VerificationError
from sovpack.oci.media import (
    ANN_ATTESTATION,
    ANN_FILEPATH,
    ANN_KIND,
    ANN_TARGET,
    AT_MODEL,
    MT_DOC,
    MT_MODEL_CONFIG,
    MT_WEIGHT,
)
from sovpack.targets import TARGETS, load_targets
from sovpack.verify import (
    Policy,
    TargetEntry,
    extract_target,
    inspect_bundle,
    read_bundle,
    recheck_parity,
    verify_bundle,
    write_target_files,
)

WANTED = ("onnx:fp32", "onnx:fp16", "gguf:q8_0", "openvino:fp16")
SDE = "1700000000"  # 2023-11-14T22:13:20Z


def available_targets() -> list[str]:
    load_targets()
    names = {name for name, _ in TARGETS}
    return [t for t in WANTED if t.split(":")[0] in names]


# ------------------------------------------------------------------------------------------------ helpers


class Layout:
    """Test-side access to a bundle's raw JSON, for crafting tampered copies."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def json(self, digest: str) -> dict[str, Any]:
        return json.loads(self.blob(digest).read_bytes())

    def put(self, data: bytes) -> tuple[str, int]:
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return digest, len(data)

    def put_json(self, doc: Any) -> tuple[str, int]:
        return self.put(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    @property
    def index_json(self) -> dict[str, Any]:
        return json.loads((self.root / "index.json").read_text())

    @property
    def bundle_index_digest(self) -> str:
        return str(self.index_json["manifests"][0]["digest"])

    @property
    def bundle_index(self) -> dict[str, Any]:
        return self.json(self.bundle_index_digest)

    def set_bundle_index(self, doc: dict[str, Any]) -> None:
        digest, size = self.put_json(doc)
        top = self.index_json
        top["manifests"][0].update(digest=digest, size=size)
        (self.root / "index.json").write_text(json.dumps(top))

    def entries(self, kind: str, target: str | None = None, attestation: str | None = None) -> list[dict[str, Any]]:
        out = []
        for entry in self.bundle_index["manifests"]:
            ann = entry.get("annotations", {})
            if ann.get(ANN_KIND) != kind:
                continue
            if target is not None and ann.get(ANN_TARGET) != target:
                continue
            if attestation is not None and ann.get(ANN_ATTESTATION) != attestation:
                continue
            out.append(entry)
        return out

    def target_digest(self, target: str) -> str:
        return str(self.entries("target", target)[0]["digest"])

    def replace_entry(self, old_digest: str, new_doc: dict[str, Any] | None, **annotation_updates: str) -> str | None:
        """Swap the manifest an index entry points to (or drop the entry); returns the new digest."""
        index = self.bundle_index
        new_digest = None
        kept = []
        for entry in index["manifests"]:
            if entry["digest"] != old_digest:
                kept.append(entry)
                continue
            if new_doc is None:
                continue
            new_digest, size = self.put_json(new_doc)
            entry.update(digest=new_digest, size=size)
            entry.setdefault("annotations", {}).update(annotation_updates)
            kept.append(entry)
        index["manifests"] = kept
        self.set_bundle_index(index)
        return new_digest


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def failures(root: Path, key: VerifyingKey, **kwargs: Any) -> str:
    report = verify_bundle(root, keys=[key], **kwargs)
    assert not report.ok, "verification unexpectedly passed"
    return "\n".join(report.failures)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    return make_checkpoint("llama3", work / "llama3")


@pytest.fixture(scope="module")
def keys(work: Path) -> dict[str, Any]:
    pair = generate_key_pair(work / "keys")
    other = generate_key_pair(work / "other-keys")
    return {
        "private": pair.private_key,
        "public": pair.public_key,
        "signing": SigningKey.load(pair.private_key),
        "verifying": VerifyingKey.load(pair.public_key),
        "other_public": other.public_key,
        "other_verifying": VerifyingKey.load(other.public_key),
    }


def _build(checkpoint: Path, out: Path, key: SigningKey, targets: list[str], **config: Any) -> Any:
    """build_bundle in this process."""
    cfg = BuildConfig(checkpoint=checkpoint, output=out, targets=tuple(targets), **config)
    return build_bundle(cfg, key=key)


def cli_build(checkpoint: Path, out: Path, private_key: Path, targets: list[str], *extra: str) -> Any:
    """``sovpack build`` in a fresh process, as a release pipeline runs it; the --json result as attributes."""
    args = [sys.executable, "-m", "sovpack", "build", str(checkpoint), "-o", str(out), "--key", str(private_key)]
    for target in targets:
        args += ["-t", target]
    result = subprocess.run([*args, *extra, "--json"], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    targets_ns = tuple(SimpleNamespace(**{**t, "files": tuple(t["files"])}) for t in data["targets"])
    return SimpleNamespace(**{**data, "output": Path(data["output"]), "targets": targets_ns})


BUILD_OPTIONS = ("--tag", "v1", "--license", "Apache-2.0")


@pytest.fixture(scope="module")
def built(work: Path, checkpoint: Path, keys: dict[str, Any]) -> Any:
    result = cli_build(checkpoint, work / "bundle", keys["private"], available_targets(), *BUILD_OPTIONS)
    print(f"\nbuilt {[t.target for t in result.targets]} in {result.seconds} s, {result.size} bytes")
    return result


@pytest.fixture(scope="module")
def sde_bundles(work: Path, checkpoint: Path, keys: dict[str, Any]) -> tuple[Path, Path]:
    """Two builds through the CLI and a sovpack.toml, with SOURCE_DATE_EPOCH set."""
    config = work / "release" / "sovpack.toml"
    config.parent.mkdir()
    config.write_text(
        f'checkpoint = "{checkpoint}"\n'
        'tag = "release"\n'
        'targets = ["onnx:fp32"]\n'
        "[signing]\n"
        f'key = "{keys["private"]}"\n'
        "[metadata]\n"
        'name = "tiny-llama3"\n'
        'license = "Apache-2.0"\n'
        "[parity.targets.\"onnx:fp32\"]\n"
        "max_abs = 0.01\n"
    )
    env = {**os.environ, "SOURCE_DATE_EPOCH": SDE}
    outs = []
    for name in ("sde-a", "sde-b"):
        out = work / name
        result = subprocess.run(
            [sys.executable, "-m", "sovpack", "build", "--config", str(config), "-o", str(out), "--json"],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "onnx:fp32: convert + parity" in result.stderr  # stage progress on stderr
        assert json.loads(result.stdout)["tag"] == "release"
        outs.append(out)
    return outs[0], outs[1]


@pytest.fixture
def copy(built: Any, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built.output, dst)
    return dst


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


# ------------------------------------------------------------------------------------------- verify/inspect


def test_verify_ok(built: Any, keys: dict[str, Any]) -> None:
    report = verify_bundle(built.output, keys=[keys["verifying"]], required_targets=["gguf:q8_0"])
    assert report.ok, report.failures
    assert {t.name for t in report.targets} == {t.target for t in built.targets}
    for t in report.targets:
        assert t.signers == (keys["verifying"].key_id,)
        assert t.parity in ("PASSED", "WARNED")
    result = CliRunner().invoke(cli, ["verify", str(built.output), "--key", str(keys["public"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True


def test_inspect_json(built: Any, keys: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(built.output), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    # Without a key nothing is verified: the bundle's identity is reported only as unsigned.
    assert info["kind"] == "bundle" and info["name"] is None and info["signed"] is None
    assert info["unsigned"]["name"] == "llama3" and info["unsigned"]["tag"] == "v1"
    assert info["signatures_verified"] is False
    signed = inspect_bundle(built.output, keys=[keys["verifying"]])
    assert signed["name"] == "llama3" and signed["tag"] == "v1" and signed["signatures_verified"] is True
    assert signed["signed"]["sequence"] == 0 and signed["signed"]["targets"] == [t.target for t in built.targets]
    by_name = {t["name"]: t for t in info["targets"]}
    for t in built.targets:
        assert by_name[t.target]["manifest_digest"] == t.manifest_digest
        assert by_name[t.target]["parity"]["status"] == t.parity
        assert by_name[t.target]["size"] == t.size
    text = CliRunner().invoke(cli, ["inspect", str(built.output)])
    assert text.exit_code == 0 and built.targets[0].manifest_digest in text.output
    assert inspect_bundle(built.output)["targets"][0]["signers"]


@pytest.mark.parametrize(
    "what",
    ["weights", "model-config", "target-manifest", "signature-layer", "parity-report", "reference-logits",
     "bundle-index", "index.json", "oci-layout", "unreferenced-blob"],
)
def test_a_flipped_byte_anywhere_fails(copy: Path, keys: dict[str, Any], built: Any, what: str) -> None:
    layout = Layout(copy)
    target = built.targets[0].target
    manifest = layout.json(layout.target_digest(target))
    files = {layer["annotations"][ANN_FILEPATH]: layer for layer in manifest["layers"]}
    weights = max((layer for layer in manifest["layers"] if layer["mediaType"] == MT_WEIGHT), key=lambda x: x["size"])
    signature = layout.json(layout.entries("attestation", target, "signature")[0]["digest"])["layers"][0]
    reference = layout.json(layout.entries("parity-reference")[0]["digest"])
    logits = next(layer for layer in reference["layers"] if layer["mediaType"].endswith(".npy"))
    blob = {
        "weights": weights["digest"],
        "model-config": manifest["config"]["digest"],
        "target-manifest": layout.target_digest(target),
        "signature-layer": signature["digest"],
        "parity-report": files["parity.json"]["digest"],
        "reference-logits": logits["digest"],
        "bundle-index": layout.bundle_index_digest,
    }
    if what in blob:
        flip_byte(layout.blob(blob[what]))
        expected = f"blob {blob[what]} is corrupt"
    elif what == "unreferenced-blob":
        (copy / "blobs" / "sha256" / ("ab" * 32)).write_bytes(b"stray")
        expected = "(unreferenced): blob sha256:" + "ab" * 32 + " is corrupt"
    else:
        flip_byte(copy / what)
        expected = what if what == "oci-layout" else "index"
    message = failures_or_error(copy, keys["verifying"])
    assert expected in message, message


def failures_or_error(root: Path, key: VerifyingKey) -> str:
    """Failures as text, whether the layout could be read at all or not."""
    try:
        return failures(root, key)
    except VerificationError as e:
        return str(e)


def test_cli_names_the_reason_and_exits_1(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    manifest = layout.json(layout.target_digest(built.targets[0].target))
    flip_byte(layout.blob(manifest["config"]["digest"]))
    result = subprocess.run(
        [sys.executable, "-m", "sovpack", "verify", str(copy), "--key", str(keys["public"])],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1
    assert f"target {built.targets[0].target}" in result.stderr and "is corrupt" in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_wrong_key_fails(built: Any, keys: dict[str, Any]) -> None:
    message = failures(built.output, keys["other_verifying"])
    assert "not signed by a trusted key" in message
    assert f"target {built.targets[0].target}: no valid model-signing signature" in message


def test_removed_signature_fails(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    target = built.targets[-1].target
    (entry,) = layout.entries("attestation", target, "signature")
    layout.replace_entry(entry["digest"], None)
    message = failures(copy, keys["verifying"])
    assert f"target {target}: no valid model-signing signature (https://model_signing/signature/v1.0)" in message


def test_removed_provenance_and_parity_attestations_fail(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    target = built.targets[0].target
    for kind in ("provenance", "parity"):
        (entry,) = layout.entries("attestation", target, kind)
        layout.replace_entry(entry["digest"], None)
    message = failures(copy, keys["verifying"])
    assert f"target {target}: no valid SLSA provenance" in message
    assert f"target {target}: no valid parity test-result" in message


def test_swapped_signatures_fail(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    a, b = built.targets[0].target, built.targets[1].target
    (entry_a,) = layout.entries("attestation", a, "signature")
    (entry_b,) = layout.entries("attestation", b, "signature")
    doc_a, doc_b = layout.json(entry_a["digest"]), layout.json(entry_b["digest"])
    doc_a["layers"], doc_b["layers"] = doc_b["layers"], doc_a["layers"]
    layout.replace_entry(entry_a["digest"], doc_a)
    layout.replace_entry(entry_b["digest"], doc_b)
    message = failures(copy, keys["verifying"])
    assert f"target {a}: attestation" in message and "the signed file list does not match" in message
    assert f"target {a}: no valid model-signing signature" in message
    assert f"target {b}: no valid model-signing signature" in message


def test_signature_from_another_bundle_fails(
    copy: Path, keys: dict[str, Any], sde_bundles: tuple[Path, Path]
) -> None:
    """The SOURCE_DATE_EPOCH build of onnx:fp32 has other manifest bytes: its signatures must not transfer."""
    other = Layout(sde_bundles[0])
    layout = Layout(copy)
    target = "onnx:fp32"
    for kind in ("signature", "provenance"):
        (foreign,) = other.entries("attestation", target, kind)
        doc = other.json(foreign["digest"])
        for digest in [foreign["digest"], doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]:
            shutil.copy(other.blob(digest), layout.blob(digest))
        (own,) = layout.entries("attestation", target, kind)
        if kind == "provenance":  # re-point the foreign provenance at this bundle's target manifest
            doc["subject"]["digest"] = layout.target_digest(target)
            doc["subject"]["size"] = layout.blob(layout.target_digest(target)).stat().st_size
            layout.replace_entry(own["digest"], doc, **{"dev.sovpack.subject": layout.target_digest(target)})
        else:  # keep the index mapping consistent with the foreign manifest, as a careful attacker would
            layout.replace_entry(own["digest"], doc, **{"dev.sovpack.subject": doc["subject"]["digest"]})
    message = failures(copy, keys["verifying"])
    assert "which is not a target of this bundle (an attestation from another bundle?)" in message
    assert f"target {target}: no valid model-signing signature" in message
    assert "the signed statement names sha256:" in message and f"not {layout.target_digest(target)}" in message
    assert f"target {target}: no valid SLSA provenance" in message


def test_edited_parity_report_fails(copy: Path, keys: dict[str, Any], built: Any) -> None:
    """Edit parity.json and re-store it properly (new blob, manifest, config): the signatures no longer fit."""
    layout = Layout(copy)
    target = built.targets[0].target
    old_digest = layout.target_digest(target)
    manifest = layout.json(old_digest)
    layer = next(x for x in manifest["layers"] if x["annotations"][ANN_FILEPATH] == "parity.json")
    report = json.loads(layout.blob(layer["digest"]).read_text())
    report["metrics"]["max_abs_error"] = 0.0
    digest, size = layout.put((json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    config = layout.json(manifest["config"]["digest"])
    config["modelfs"]["diffIds"] = [digest if d == layer["digest"] else d for d in config["modelfs"]["diffIds"]]
    layer.update(digest=digest, size=size)
    cdigest, csize = layout.put((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    manifest["config"].update(digest=cdigest, size=csize)
    new_digest = layout.replace_entry(old_digest, manifest)
    assert new_digest is not None
    # re-point every attestation at the edited manifest, as an attacker would
    for entry in layout.entries("attestation", target):
        doc = layout.json(entry["digest"])
        doc["subject"].update(digest=new_digest, size=layout.blob(new_digest).stat().st_size)
        layout.replace_entry(entry["digest"], doc, **{"dev.sovpack.subject": new_digest})
    message = failures(copy, keys["verifying"])
    assert f"target {target}" in message
    assert "files whose digest differs from the signed one ['parity.json']" in message
    assert f"not {new_digest}" in message  # provenance and parity name the original manifest


def test_policy_decides_on_warned_parity(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    statuses = {t.target: t.parity for t in built.targets}
    target, status = next(iter(statuses.items()))
    other = [s for s in ("PASSED", "WARNED") if s != status]
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"keys": [str(keys["public"])], "allowed_parity": other,
                                  "required_targets": [target]}))
    result = CliRunner().invoke(cli, ["verify", str(built.output), "--policy", str(policy)])
    assert result.exit_code == 1
    assert f"target {target}: parity {status} is not allowed (allowed: {other[0]})" in result.output
    toml_policy = tmp_path / "policy.toml"
    toml_policy.write_text(f'keys = ["{keys["public"]}"]\nallowed_parity = ["PASSED", "WARNED"]\n')
    loaded = Policy.load(toml_policy)
    validate(loaded.to_dict(), "bundle-policy")
    assert CliRunner().invoke(cli, ["verify", str(built.output), "--policy", str(toml_policy)]).exit_code == 0


def test_required_target_missing_fails(built: Any, keys: dict[str, Any]) -> None:
    message = failures(built.output, keys["verifying"], required_targets=["gguf:q4_0"])
    assert "required target gguf:q4_0 is not in the bundle" in message


# ---------------------------------------------------------------------------------------------- determinism


def test_two_builds_are_byte_identical(built: Any, work: Path, checkpoint: Path, keys: dict[str, Any]) -> None:
    again = cli_build(checkpoint, work / "again", keys["private"], available_targets(), *BUILD_OPTIONS)
    assert [t.manifest_digest for t in again.targets] == [t.manifest_digest for t in built.targets]
    first = {p.name: p.read_bytes() for p in (built.output / "blobs" / "sha256").iterdir()}
    second = {p.name: p.read_bytes() for p in (again.output / "blobs" / "sha256").iterdir()}
    assert first.keys() == second.keys()  # manifests, configs, layers, and (RFC 6979) signatures alike
    assert (built.output / "index.json").read_bytes() == (again.output / "index.json").read_bytes()


def test_library_builds_in_one_process_are_identical(
    built: Any, work: Path, checkpoint: Path, keys: dict[str, Any]
) -> None:
    """build_bundle twice in one process; manifests equal each other and the CLI build's (same options)."""
    targets = ["onnx:fp32", "gguf:q8_0"]
    metadata = BundleMetadata(licenses=("Apache-2.0",))
    first = _build(checkpoint, work / "lib-a", keys["signing"], targets, tag="v1", metadata=metadata)
    second = _build(checkpoint, work / "lib-b", keys["signing"], targets, tag="v1", metadata=metadata)
    digests = [t.manifest_digest for t in first.targets]
    assert digests == [t.manifest_digest for t in second.targets]
    by_name = {t.target: t.manifest_digest for t in built.targets}
    assert digests == [by_name[t] for t in targets]


def test_source_date_epoch_adds_stable_timestamps(sde_bundles: tuple[Path, Path], keys: dict[str, Any]) -> None:
    a, b = sde_bundles
    assert (a / "index.json").read_bytes() == (b / "index.json").read_bytes()
    names = [sorted(p.name for p in (root / "blobs/sha256").iterdir()) for root in (a, b)]
    assert names[0] == names[1]
    layout = Layout(a)
    created = "2023-11-14T22:13:20Z"
    assert layout.bundle_index["annotations"]["org.opencontainers.image.created"] == created
    manifest = layout.json(layout.target_digest("onnx:fp32"))
    assert manifest["annotations"]["org.opencontainers.image.created"] == created
    config = layout.json(manifest["config"]["digest"])
    assert config["descriptor"]["createdAt"] == created and config["descriptor"]["name"] == "tiny-llama3"
    (entry,) = layout.entries("attestation", "onnx:fp32", "provenance")
    raw = layout.blob(layout.json(entry["digest"])["layers"][0]["digest"]).read_bytes()
    predicate = json.loads(SigstoreBundle.from_bytes(raw).envelope.payload)["predicate"]
    assert predicate["runDetails"]["metadata"] == {"startedOn": created, "finishedOn": created}
    overrides = predicate["buildDefinition"]["externalParameters"]["parity"]["thresholdOverrides"]
    assert overrides == {"max_abs": 0.01}  # from [parity.targets."onnx:fp32"] in sovpack.toml
    # A build judged with looser limits than the target's defaults passes only a policy that allows them.
    default = verify_bundle(a, keys=[keys["verifying"]])
    assert not default.ok and any("max_abs 0.01 (allowed at most 0.001)" in f for f in default.failures)
    lenient = Policy(parity_limits={"fp32": {"max_abs": 0.01}})
    assert verify_bundle(a, keys=[keys["verifying"]], policy=lenient).ok


def test_failed_parity_writes_no_bundle(work: Path, checkpoint: Path, keys: dict[str, Any]) -> None:
    out = work / "failed"
    with pytest.raises(ParityError, match="gguf:q8_0: parity FAILED"):
        _build(
            checkpoint, out, keys["signing"], ["onnx:fp32", "gguf:q8_0"],
            target_thresholds={"gguf:q8_0": {"mean_kl": 1e-12, "warn_factor": 1.0}},
        )
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".failed")]


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


# ------------------------------------------------------------------------------------------------ extract


def test_extract_writes_verified_files_and_signature(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    for target in built.targets:
        out = tmp_path / target.target.replace(":", "-")
        result = CliRunner().invoke(
            cli, ["extract", str(built.output), "-t", target.target, "-o", str(out), "--key", str(keys["public"]),
                  "--json"],
        )
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == sorted([*target.files, "model.sig"])
        validate(json.loads((out / "model.sig").read_text()), "sigstore-bundle")
    again = CliRunner().invoke(
        cli, ["extract", str(built.output), "-t", built.targets[0].target, "-o", str(out), "--key",
              str(keys["public"])],
    )
    assert again.exit_code == 2 and "not empty" in again.output


def test_extract_refuses_an_unverified_bundle(copy: Path, keys: dict[str, Any], built: Any, tmp_path: Path) -> None:
    layout = Layout(copy)
    manifest = layout.json(layout.target_digest(built.targets[0].target))
    flip_byte(layout.blob(manifest["layers"][0]["digest"]))
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="is corrupt"):
        extract_target(copy, built.targets[0].target, out, keys=[keys["verifying"]])
    assert not out.exists()
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        extract_target(built.output, built.targets[0].target, out, keys=[keys["other_verifying"]])
    assert not out.exists()


@pytest.mark.parametrize(
    ("path", "reason"),
    [("../evil", "path traversal"), ("/etc/evil", "is absolute"), ("a/../../evil", "path traversal"),
     ("a\\..\\evil", "backslash"), ("link", "links are refused")],
)
def test_extract_refuses_traversal_absolute_and_link_paths(
    copy: Path, keys: dict[str, Any], built: Any, tmp_path: Path, path: str, reason: str
) -> None:
    """A crafted target manifest: verify reports the path, extract refuses, and nothing is written."""
    layout = Layout(copy)
    target = built.targets[0].target
    old = layout.target_digest(target)
    manifest = layout.json(old)
    layer = manifest["layers"][0]
    if path == "link":
        layer["annotations"]["org.cncf.model.file.metadata+json"] = json.dumps({"name": "x", "typeflag": 50})
    else:
        layer["annotations"][ANN_FILEPATH] = path
    layout.replace_entry(old, manifest)
    message = failures(copy, keys["verifying"])
    assert reason in message, message
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        extract_target(copy, target, out, keys=[keys["verifying"]])
    assert not out.exists() and not (tmp_path / "evil").exists()


def test_the_writer_itself_refuses_bad_paths(built: Any, tmp_path: Path) -> None:
    """Even handed a manifest that skipped verification, the file writer re-checks every path."""
    view = read_bundle(built.output)
    entry = view.targets[0]
    layer = entry.layers[0]
    for i, bad in enumerate(("../escape", "/abs", "model.sig")):
        crafted = TargetEntry(
            name=entry.name, format=entry.format, precision=entry.precision, descriptor=entry.descriptor,
            config=entry.config,
            layers=(type(layer)(media_type=layer.media_type, digest=layer.digest, size=layer.size,
                                annotations={ANN_FILEPATH: bad}),),
        )
        out = tmp_path / f"out-{i}"
        out.mkdir()
        with pytest.raises(VerificationError):
            write_target_files(view, crafted, out, None)
        assert not (tmp_path / "escape").exists()
    for good in ("model.onnx", "sub/dir/file.bin"):
        assert check_relative_path(good, "t") == good


def test_a_blob_that_is_a_symlink_is_refused(copy: Path, keys: dict[str, Any], built: Any, tmp_path: Path) -> None:
    layout = Layout(copy)
    manifest = layout.json(layout.target_digest(built.targets[0].target))
    blob = layout.blob(manifest["layers"][0]["digest"])
    outside = tmp_path / "outside"
    shutil.copy(blob, outside)
    blob.unlink()
    blob.symlink_to(outside)
    assert "is a symbolic link; refused" in failures(copy, keys["verifying"])


# ------------------------------------------------------------------------------------------------ run/parity


def test_run_a_target_from_the_bundle(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    target = next(t.target for t in built.targets if t.target.startswith("onnx"))
    args = ["--ids", "600,23,45,67", "--max-new-tokens", "4", "--json"]
    from_bundle = CliRunner().invoke(cli, ["run", str(built.output), "-t", target, "--key", str(keys["public"]), *args])
    assert from_bundle.exit_code == 0, from_bundle.output
    extracted = extract_target(built.output, target, tmp_path / "x", keys=[keys["verifying"]])
    from_dir = CliRunner().invoke(cli, ["run", str(extracted.out_dir), *args])
    assert json.loads(from_bundle.stdout)["generated_ids"] == json.loads(from_dir.stdout)["generated_ids"]
    assert json.loads(from_bundle.stdout)["verified"] is True
    assert json.loads(from_dir.stdout)["verified"] is False and "nothing was verified" in from_dir.stderr
    checked = CliRunner().invoke(cli, ["run", str(extracted.out_dir), "--key", str(keys["public"]), *args])
    assert checked.exit_code == 0 and json.loads(checked.stdout)["verified"] is True
    no_key = CliRunner().invoke(cli, ["run", str(built.output), "-t", target, *args])
    assert no_key.exit_code == 2 and "--key" in no_key.output


def test_parity_recheck_passes_without_the_checkpoint(built: Any, keys: dict[str, Any]) -> None:
    results = recheck_parity(built.output, keys=[keys["verifying"]])
    assert {r.target for r in results} == {t.target for t in built.targets}
    for r in results:
        assert r.ok and r.signature_verified
        assert r.status == r.signed_status, (r.target, r.reasons)
        assert r.report.runtime["reference"]["stored"] == "true"
    cli_result = CliRunner().invoke(
        cli, ["parity", str(built.output), "-t", built.targets[0].target, "--key", str(keys["public"]), "--json"]
    )
    assert cli_result.exit_code == 0, cli_result.output
    assert json.loads(cli_result.output)["ok"] is True


def test_parity_recheck_refuses_a_tampered_bundle(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    reference = layout.json(layout.entries("parity-reference")[0]["digest"])
    logits = next(layer for layer in reference["layers"] if layer["mediaType"].endswith(".npy"))
    flip_byte(layout.blob(logits["digest"]), offset=layout.blob(logits["digest"]).stat().st_size - 3)
    with pytest.raises(VerificationError, match="is corrupt"):
        recheck_parity(copy, targets=[built.targets[0].target], keys=[keys["verifying"]])
