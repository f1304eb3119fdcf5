"""Embedding encoders in the signed bundle: build, verify, policy, parity re-check, extraction, tampering.

One bundle is built per module from the tiny ``bert`` fixture with a target of every format (real converters,
real runtimes, real parity); the real all-MiniLM-L6-v2 goes through one target end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sovpack._schemas import validate
from sovpack.attest.dsse import SigningKey, SigstoreBundle, VerifyingKey, generate_key_pair
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.media import ANN_KIND, ANN_TITLE, AT_MODEL, KIND_REFERENCE, KIND_RELEASE, MT_WEIGHT_CONFIG
from sovpack.parity.embeddings import (
    LABELED_TEXTS,
    MT_EMBEDDING_REFERENCE_CONFIG,
    MT_REFERENCE_EMBEDDINGS,
    EmbeddingReferenceConfig,
    RecordedEmbeddings,
)
from sovpack.targets.base import TargetRef
from sovpack.verify import (
    Policy,
    extract_target,
    open_bundle_embedding_runner,
    open_bundle_runner,
    recheck_parity,
    verify_bundle,
)

TARGETS = ("onnx:fp32", "gguf:f16", "openvino:fp16")


# ------------------------------------------------------------------------------------------------ helpers


def blob(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.split(":", 1)[1]


def read_json(root: Path, digest: str) -> Any:
    return json.loads(blob(root, digest).read_bytes())


def bundle_index(root: Path) -> dict[str, Any]:
    top = json.loads((root / "index.json").read_text())
    return dict(read_json(root, top["manifests"][0]["digest"]))


def entry(root: Path, kind: str) -> dict[str, Any]:
    (found,) = [m for m in bundle_index(root)["manifests"] if m.get("annotations", {}).get(ANN_KIND) == kind]
    return dict(found)


def reference_layers(root: Path) -> dict[str, dict[str, Any]]:
    manifest = read_json(root, entry(root, KIND_REFERENCE)["digest"])
    return {layer["annotations"][ANN_TITLE]: layer for layer in manifest["layers"]}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sovpack`` in a fresh process, as a release pipeline or a deploy site runs it."""
    return subprocess.run([sys.executable, "-m", "sovpack", *args], capture_output=True, text=True, timeout=900,
                          check=False, env=env)


def cli_build(checkpoint: Path, out: Path, private_key: Path, targets: tuple[str, ...], *extra: str,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    args = ["build", str(checkpoint), "-o", str(out), "--key", str(private_key)]
    for target in targets:
        args += ["-t", target]
    result = cli(*args, *extra, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-bundle")


@pytest.fixture(scope="module")
def keys(work: Path) -> dict[str, Any]:
    pair = generate_key_pair(work / "keys")
    return {
        "private": pair.private_key,
        "public": pair.public_key,
        "signing": SigningKey.load(pair.private_key),
        "verifying": VerifyingKey.load(pair.public_key),
    }


@pytest.fixture(scope="module")
def built(work: Path, encoder_checkpoints: dict[str, Path], keys: dict[str, Any]) -> dict[str, Any]:
    return cli_build(encoder_checkpoints["bert"], work / "bundle", keys["private"], TARGETS, "--tag", "v1")


@pytest.fixture
def copy(built: dict[str, Any], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built["output"], dst)
    return dst


# ------------------------------------------------------------------------------------------------ build


def test_build_stores_every_target_and_the_reference_embeddings(built: dict[str, Any]) -> None:
    root = Path(built["output"])
    assert [t["target"] for t in built["targets"]] == list(TARGETS)
    assert all(t["parity"] == "PASSED" for t in built["targets"])
    for t in built["targets"]:  # ModelPack manifests as for decoders
        manifest = read_json(root, t["manifest_digest"])
        assert manifest["artifactType"] == AT_MODEL
        validate(read_json(root, manifest["config"]["digest"]), "modelpack-config")
    reference = read_json(root, entry(root, KIND_REFERENCE)["digest"])
    assert reference["config"]["mediaType"] == MT_EMBEDDING_REFERENCE_CONFIG
    config_doc = read_json(root, reference["config"]["digest"])
    validate(config_doc, "embedding-reference")
    config = EmbeddingReferenceConfig.from_dict(config_doc)
    assert [t.label for t in config.texts] == list(LABELED_TEXTS) and config.max_length == 48
    assert [t.text for t in config.texts] == list(LABELED_TEXTS.values())
    cut = {t.label for t in config.texts if t.truncated}
    assert "long" in cut and "food" not in cut
    layers = reference_layers(root)
    assert layers["tokenizer.json"]["mediaType"] == MT_WEIGHT_CONFIG
    assert {layers[n]["mediaType"] for n in ("embeddings.npy", "token-states.npy")} == {MT_REFERENCE_EMBEDDINGS}
    embeddings = np.load(io.BytesIO(blob(root, layers["embeddings.npy"]["digest"]).read_bytes()))
    states = np.load(io.BytesIO(blob(root, layers["token-states.npy"]["digest"]).read_bytes()))
    assert embeddings.shape == (len(LABELED_TEXTS), config.dimension) and embeddings.dtype == np.float32
    assert states.shape == (config.token_count, config.dimension)
    stored = RecordedEmbeddings.from_stored(config, embeddings, states)
    assert stored.runtime["stored"] == "true" and [len(h) for h in stored.hidden] == [len(i) for i in stored.ids]


def test_the_release_statement_names_the_texts_and_the_reference(built: dict[str, Any]) -> None:
    root = Path(built["output"])
    release = read_json(root, entry(root, KIND_RELEASE)["digest"])
    statement = json.loads(SigstoreBundle.from_bytes(blob(root, release["layers"][0]["digest"]).read_bytes())
                           .envelope.payload)
    predicate = statement["predicate"]
    assert predicate["parityPrompts"] == "builtin"  # the built-in LABELED_TEXTS, stored in the reference
    assert predicate["reference"] == entry(root, KIND_REFERENCE)["digest"]
    thresholds = {t["target"]: t["thresholds"] for t in predicate["targets"]}
    assert thresholds["onnx:fp32"]["min_cosine"] == TargetRef.parse("onnx:fp32").thresholds(encoder=True).min_cosine


def test_builds_are_byte_identical_and_stamped_only_with_source_date_epoch(
    built: dict[str, Any], work: Path, encoder_checkpoints: dict[str, Path], keys: dict[str, Any]
) -> None:
    again = cli_build(encoder_checkpoints["bert"], work / "again", keys["private"], TARGETS, "--tag", "v1")
    assert again["index_digest"] == built["index_digest"]
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    stamped = [cli_build(encoder_checkpoints["bert"], work / f"sde-{n}", keys["private"], ("onnx:fp32",), env=env)
               for n in "ab"]
    assert stamped[0]["index_digest"] == stamped[1]["index_digest"] != built["index_digest"]
    root = Path(stamped[0]["output"])
    reference = read_json(root, entry(root, KIND_REFERENCE)["digest"])
    assert reference["annotations"]["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"


def test_custom_texts_replace_the_built_ins(work: Path, encoder_checkpoints: dict[str, Path],
                                           keys: dict[str, Any]) -> None:
    texts = ("A man is eating food.", "Das Wetter ist schön.")
    result = build_bundle(BuildConfig(checkpoint=encoder_checkpoints["bert"], output=work / "texts",
                                      targets=("onnx:fp32",), prompts=texts), key=keys["signing"])
    root = result.output
    config = EmbeddingReferenceConfig.from_dict(read_json(root, read_json(
        root, entry(root, KIND_REFERENCE)["digest"])["config"]["digest"]))
    assert [(t.label, t.text) for t in config.texts] == [("text 1", texts[0]), ("text 2", texts[1])]
    assert verify_bundle(root, keys=[keys["verifying"]]).ok


# ------------------------------------------------------------------------------------------------ verify


def test_verify_passes_with_the_key(built: dict[str, Any], keys: dict[str, Any]) -> None:
    report = verify_bundle(built["output"], keys=[keys["verifying"]])
    assert report.ok, report.failures
    assert [t.name for t in report.targets] == list(TARGETS) and {t.parity for t in report.targets} == {"PASSED"}
    result = cli("verify", built["output"], "--key", str(keys["public"]))
    assert result.returncode == 0, result.stderr


def test_the_policy_ceiling_refuses_a_loosened_min_cosine(work: Path, encoder_checkpoints: dict[str, Path],
                                                          keys: dict[str, Any]) -> None:
    loose = build_bundle(
        BuildConfig(checkpoint=encoder_checkpoints["bert"], output=work / "loose", targets=("onnx:fp32",),
                    target_thresholds={"onnx:fp32": {"min_cosine": 0.999}}),
        key=keys["signing"],
    )
    report = verify_bundle(loose.output, keys=[keys["verifying"]])
    assert not report.ok
    assert "target onnx:fp32: parity was judged with looser limits than the policy allows: min_cosine 0.999 " \
           "(allowed at least 0.99999)" in report.failures
    allowing = Policy(parity_limits={"fp32": {"min_cosine": 0.999}})
    assert verify_bundle(loose.output, keys=[keys["verifying"]], policy=allowing).ok


def test_skopeo_copies_the_bundle_and_the_copy_verifies(built: dict[str, Any], keys: dict[str, Any],
                                                        tmp_path: Path) -> None:
    assert shutil.which("skopeo"), "skopeo is part of the test environment (apt-get install -y skopeo)"
    dest = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", "--all", f"oci:{built['output']}:v1", f"oci:{dest}:v1"], capture_output=True,
                   text=True, check=True, timeout=300)
    report = verify_bundle(dest, keys=[keys["verifying"]])
    assert report.ok, report.failures
    assert [r.status for r in recheck_parity(dest, targets=["onnx:fp32"], keys=[keys["verifying"]])] == ["PASSED"]


# ------------------------------------------------------------------------------------------------ parity


def test_parity_recheck_judges_every_target_against_the_stored_embeddings(built: dict[str, Any],
                                                                          keys: dict[str, Any]) -> None:
    results = recheck_parity(built["output"], keys=[keys["verifying"]])
    assert [r.target for r in results] == list(TARGETS)
    for r in results:
        assert r.ok and r.signature_verified and r.status == r.signed_status == "PASSED", (r.target, r.reasons)
        assert r.report.runtime["reference"]["stored"] == "true"
        assert r.report.embeddings is not None and len(r.report.embeddings.texts) == len(LABELED_TEXTS)
        assert set(r.metrics) == {"min_cosine", "pipeline_min_cosine", "max_hidden_abs"}
        signed, now = r.metrics["min_cosine"]["signed"], r.metrics["min_cosine"]["now"]
        assert signed is not None and now is not None and abs(signed - now) < 1e-6
    result = cli("parity", built["output"], "-t", "gguf:f16", "--key", str(keys["public"]), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] and data["targets"][0]["metrics"]["min_cosine"]["now"] > 0.999


def test_a_tampered_reference_is_refused(copy: Path, keys: dict[str, Any]) -> None:
    layers = reference_layers(copy)
    embeddings = blob(copy, layers["embeddings.npy"]["digest"])
    data = bytearray(embeddings.read_bytes())
    data[-3] ^= 0x01
    embeddings.write_bytes(bytes(data))
    report = verify_bundle(copy, keys=[keys["verifying"]])
    assert not report.ok and any("is corrupt" in f for f in report.failures), report.failures
    with pytest.raises(VerificationError, match="is corrupt"):
        recheck_parity(copy, targets=["onnx:fp32"], keys=[keys["verifying"]])


def test_a_rewritten_reference_config_is_not_the_signed_one(copy: Path, keys: dict[str, Any]) -> None:
    """New token ids, a valid manifest and digests: the signed release names another reference, so it fails."""
    ref_entry = entry(copy, KIND_REFERENCE)
    manifest = read_json(copy, ref_entry["digest"])
    config = read_json(copy, manifest["config"]["digest"])
    config["texts"][0]["ids"][1] += 1

    def put(doc: Any) -> tuple[str, int]:
        raw = json.dumps(doc, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        blob(copy, digest).write_bytes(raw)
        return digest, len(raw)

    manifest["config"]["digest"], manifest["config"]["size"] = put(config)
    index = bundle_index(copy)
    for m in index["manifests"]:
        if m["digest"] == ref_entry["digest"]:
            m["digest"], m["size"] = put(manifest)
    top = json.loads((copy / "index.json").read_text())
    top["manifests"][0]["digest"], top["manifests"][0]["size"] = put(index)
    (copy / "index.json").write_text(json.dumps(top))
    blob(copy, ref_entry["digest"]).unlink()  # no stray blob: the failure is the reference itself
    failures = "\n".join(verify_bundle(copy, keys=[keys["verifying"]]).failures)
    assert "the parity reference is not the one the release signed" in failures
    with pytest.raises(VerificationError, match="verification failed"):
        recheck_parity(copy, targets=["onnx:fp32"], keys=[keys["verifying"]])


def test_stored_arrays_that_do_not_fit_their_config_are_refused(built: dict[str, Any]) -> None:
    root = Path(built["output"])
    config = EmbeddingReferenceConfig.from_dict(read_json(root, read_json(
        root, entry(root, KIND_REFERENCE)["digest"])["config"]["digest"]))
    width = config.dimension
    states = np.zeros((config.token_count, width), np.float32)
    with pytest.raises(VerificationError, match=r"embeddings.npy: float32 \[9, 32\] does not fit its config"):
        RecordedEmbeddings.from_stored(config, np.zeros((9, width), np.float32), states)
    bad = np.zeros((len(config.texts), width), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(VerificationError, match="non-finite"):
        RecordedEmbeddings.from_stored(config, bad, states)
    doc = config.to_dict()
    doc["texts"][1]["label"] = doc["texts"][0]["label"]
    with pytest.raises(VerificationError, match="distinct labels"):
        EmbeddingReferenceConfig.from_dict(doc)


# ------------------------------------------------------------------------------------------------ extraction


def test_open_bundle_embedding_runner_embeds_from_a_verified_private_copy(
    built: dict[str, Any], keys: dict[str, Any], tmp_path: Path
) -> None:
    texts = ["A man is eating food.", "A man is eating pasta."]
    runner = open_bundle_embedding_runner(built["output"], "onnx:fp32", [keys["verifying"]])
    directory = runner.directory
    try:
        assert runner.target == "onnx:fp32" and runner.metadata.spec.encoder is not None
        from_bundle = runner.embed_texts(texts)
        assert runner.tokenize(texts[0]) is not None
    finally:
        runner.close()
    runner.close()  # idempotent
    assert not directory.exists()
    assert from_bundle is not None and from_bundle.shape == (2, 32)
    out = extract_target(built["output"], "onnx:fp32", tmp_path / "x", keys=[keys["verifying"]])
    assert (out.out_dir / "model.sig").is_file()
    from sovpack.artifact import ArtifactMetadata

    metadata = ArtifactMetadata.load(out.out_dir)
    direct = TargetRef.parse("onnx:fp32").target.open_embedding_runner(out.out_dir, metadata)
    try:
        np.testing.assert_array_equal(direct.embed_texts(texts), from_bundle)
    finally:
        direct.close()


def test_runners_refuse_the_wrong_kind_of_target_by_name(built: dict[str, Any], keys: dict[str, Any],
                                                         checkpoints: dict[str, Path], work: Path) -> None:
    with pytest.raises(UsageError, match="several targets"):
        open_bundle_embedding_runner(built["output"], None, [keys["verifying"]])
    with pytest.raises(UsageError, match="--key"):
        open_bundle_embedding_runner(built["output"], "gguf:f16", [])
    insecure = open_bundle_embedding_runner(built["output"], "gguf:f16", [], insecure=True)
    insecure.close()
    with pytest.raises(UsageError, match=r"target openvino:fp16 is an embedding encoder \(bert\)"):
        open_bundle_runner(built["output"], "openvino:fp16", [keys["verifying"]])
    decoder = build_bundle(BuildConfig(checkpoint=checkpoints["llama3"], output=work / "decoder",
                                       targets=("onnx:fp32",)), key=keys["signing"])
    with pytest.raises(UsageError, match=r"target onnx:fp32 is a text generator \(llama\).*not an embedding"):
        open_bundle_embedding_runner(decoder.output, None, [keys["verifying"]])


# ------------------------------------------------------------------------------------------------ real weights


def test_the_real_minilm_bundle_verifies_rechecks_and_ranks_meaning(minilm: Path, work: Path,
                                                                    keys: dict[str, Any]) -> None:
    result = build_bundle(BuildConfig(checkpoint=minilm, output=work / "minilm", targets=("onnx:fp32",)),
                          key=keys["signing"])
    assert [t.parity for t in result.targets] == ["PASSED"]
    report = verify_bundle(result.output, keys=[keys["verifying"]])
    assert report.ok, report.failures
    (recheck,) = recheck_parity(result.output, keys=[keys["verifying"]])
    assert recheck.ok and recheck.status == "PASSED" and recheck.report.embeddings is not None
    assert recheck.report.embeddings.min_cosine > 0.99999
    runner = open_bundle_embedding_runner(result.output, None, [keys["verifying"]])
    try:
        vectors = runner.embed_texts(list(LABELED_TEXTS.values())[:3])
    finally:
        runner.close()
    assert vectors is not None and vectors.shape == (3, 384)
    food, pasta, movie = vectors
    assert cosine(food, pasta) > 0.7 > 0.2 > cosine(food, movie)
