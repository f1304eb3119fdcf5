"""Hostile bundles, artifacts, keys and policies given to verify / inspect / extract / run / parity.

Each case damages a copy of a freshly built bundle (or writes a hostile side file) and runs the real CLI in a
limited child process (tests/hostile/harness.py): the only acceptable outcome is a clean, one-line refusal
within the limits, with nothing written outside the requested output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.generate import make_checkpoint
from sovpack.attest.dsse import SigningKey, generate_key_pair
from sovpack.bundle import BuildConfig, build_bundle
from tests.hostile.harness import assert_refused, run_cli, tree_snapshot

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-bundles")
    pair = generate_key_pair(root / "keys")
    ckpt = make_checkpoint("llama3", root / "ckpt")
    build_bundle(BuildConfig(checkpoint=ckpt, output=root / "bundle", targets=("onnx:fp32",), tag="1.0"),
                 key=SigningKey.load(pair.private_key))
    return {"root": root, "bundle": root / "bundle", "public": pair.public_key, "private": pair.private_key,
            "checkpoint": ckpt}


def _blob(bundle: Path, digest: str) -> Path:
    return bundle / "blobs" / "sha256" / digest.split(":", 1)[1]


def _index_digest(bundle: Path) -> str:
    return str(json.loads((bundle / "index.json").read_text())["manifests"][0]["digest"])


def _rechain_index(bundle: Path, data: bytes) -> None:
    """Store ``data`` as the bundle index under its own digest and point index.json at it."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(bundle, digest).write_bytes(data)
    top = json.loads((bundle / "index.json").read_text())
    top["manifests"][0].update(digest=digest, size=len(data))
    (bundle / "index.json").write_text(json.dumps(top))


def _first_manifest(bundle: Path, kind: str) -> str:
    index = json.loads(_blob(bundle, _index_digest(bundle)).read_bytes())
    return next(e["digest"] for e in index["manifests"] if e["annotations"].get("dev.sovpack.kind") == kind)


def deep_index_json(b: Path) -> None:
    (b / "index.json").write_bytes(DEEP)


def sparse_index_json(b: Path) -> None:
    with open(b / "index.json", "wb") as fh:
        fh.truncate(2 * 1024**3)


def deep_bundle_index(b: Path) -> None:
    _rechain_index(b, DEEP)


def huge_declared_bundle_index(b: Path) -> None:
    top = json.loads((b / "index.json").read_text())
    top["manifests"][0]["size"] = 2**40
    (b / "index.json").write_text(json.dumps(top))


def duplicate_keys_in_bundle_index(b: Path) -> None:
    raw = _blob(b, _index_digest(b)).read_bytes()
    _rechain_index(b, raw.replace(b'"schemaVersion":2', b'"schemaVersion":2,"schemaVersion":2', 1))


def nan_in_bundle_index(b: Path) -> None:
    raw = _blob(b, _index_digest(b)).read_bytes()
    _rechain_index(b, raw.replace(b'"schemaVersion":2', b'"schemaVersion":NaN', 1))


def deep_signature_layer(b: Path) -> None:
    """A release statement layer replaced by deeply nested JSON, digests re-chained up to index.json."""
    release = _first_manifest(b, "release")
    manifest = json.loads(_blob(b, release).read_bytes())
    layer_digest = "sha256:" + hashlib.sha256(DEEP).hexdigest()
    _blob(b, layer_digest).write_bytes(DEEP)
    manifest["layers"][0].update(digest=layer_digest, size=len(DEEP))
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    new = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(b, new).write_bytes(data)
    index = json.loads(_blob(b, _index_digest(b)).read_bytes())
    for entry in index["manifests"]:
        if entry["digest"] == release:
            entry.update(digest=new, size=len(data))
    _rechain_index(b, json.dumps(index).encode())


def blob_is_a_fifo(b: Path) -> None:
    target = _blob(b, _first_manifest(b, "target"))
    target.unlink()
    os.mkfifo(target)


def blob_is_a_symlink_outside(b: Path) -> None:
    target = _blob(b, _first_manifest(b, "target"))
    target.unlink()
    target.symlink_to("/etc/passwd")


def index_json_missing(b: Path) -> None:
    (b / "index.json").unlink()


def oci_layout_is_a_directory(b: Path) -> None:
    (b / "oci-layout").unlink()
    (b / "oci-layout").mkdir()


def _add_top_entries(b: Path, *entries: Any) -> None:
    top = json.loads((b / "index.json").read_text())
    top["manifests"].extend(entries)
    (b / "index.json").write_text(json.dumps(top))


def per_target_tag_moved(b: Path) -> None:
    """The (unsigned) per-target tag of onnx:fp32 re-pointed at the release statement's manifest."""
    top = json.loads((b / "index.json").read_text())
    entry = next(e for e in top["manifests"] if e["annotations"].get("dev.sovpack.target") == "onnx:fp32")
    release = _first_manifest(b, "release")
    entry.update(digest=release, size=_blob(b, release).stat().st_size)
    (b / "index.json").write_text(json.dumps(top))


def per_target_entries_malformed(b: Path) -> None:
    _add_top_entries(b, 42, {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:zz",
                             "size": -1, "annotations": {"dev.sovpack.target": ["onnx:fp32"],
                                                         "org.opencontainers.image.ref.name": "1.0-onnx-fp32"}})


def per_target_entries_by_the_thousand(b: Path) -> None:
    """20,000 more entries claiming onnx:fp32's per-target tag, each naming the release statement instead."""
    entry = json.loads((b / "index.json").read_text())["manifests"][1]
    release = _first_manifest(b, "release")
    _add_top_entries(b, *([{**entry, "digest": release, "size": _blob(b, release).stat().st_size}] * 20_000))


BUNDLE_ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "per-target-tag-moved": (per_target_tag_moved, "which is not target onnx:fp32"),
    "per-target-entries-malformed": (per_target_entries_malformed, "index.json"),
    "per-target-entries-by-the-thousand": (per_target_entries_by_the_thousand, "which is not target onnx:fp32"),
    "deep-index-json": (deep_index_json, "nested"),
    "sparse-2GiB-index-json": (sparse_index_json, "larger than"),
    "deep-bundle-index": (deep_bundle_index, "nested"),
    "bundle-index-declares-1TiB": (huge_declared_bundle_index, ""),
    "duplicate-keys-in-bundle-index": (duplicate_keys_in_bundle_index, "duplicate key"),
    "nan-in-bundle-index": (nan_in_bundle_index, "NaN"),
    "deep-release-signature": (deep_signature_layer, ""),
    "blob-is-a-fifo": (blob_is_a_fifo, ""),
    "blob-is-a-symlink-to-etc-passwd": (blob_is_a_symlink_outside, ""),
    "index-json-missing": (index_json_missing, ""),
    "oci-layout-is-a-directory": (oci_layout_is_a_directory, ""),
}


@pytest.mark.parametrize("command", ["verify", "inspect", "extract"])
@pytest.mark.parametrize("attack", sorted(BUNDLE_ATTACKS))
def test_hostile_bundle_is_refused(attack: str, command: str, made: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle, symlinks=True)
    damage, mention = BUNDLE_ATTACKS[attack]
    damage(bundle)
    before = tree_snapshot(tmp_path)
    args: list[Any] = {
        "verify": ["verify", bundle, "--key", made["public"]],
        "inspect": ["inspect", bundle, "--key", made["public"]],
        "extract": ["extract", bundle, "-t", "onnx:fp32", "-o", tmp_path / "out", "--key", made["public"]],
    }[command]
    outcome = run_cli(args)
    if command == "inspect" and outcome.returncode == 0:
        # inspect reads cheaply (no layer hashing); when it can read the bundle at all it must not call it signed.
        info_ok = "UNSIGNED" in outcome.stdout or "problem:" in outcome.stdout
        assert info_ok, outcome.stdout[-2000:]
        return
    assert_refused(outcome, mentions=[mention] if mention and command != "inspect" else [])
    assert not (tmp_path / "out").exists()
    assert tree_snapshot(tmp_path) == before  # nothing written anywhere


def _artifact_dir(made: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "deploy"
    outcome = run_cli(["extract", made["bundle"], "-t", "onnx:fp32", "-o", out, "--key", made["public"]])
    assert outcome.returncode == 0, outcome.stderr
    return out


def test_artifact_metadata_path_traversal_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    """Security #8: a listed file ``../../../../etc/passwd`` is never followed."""
    out = _artifact_dir(made, tmp_path)
    meta = json.loads((out / "sovpack-artifact.json").read_text())
    meta["files"].append("../../../../etc/passwd")
    (out / "sovpack-artifact.json").write_text(json.dumps(meta))
    assert_refused(run_cli(["inspect", out]), mentions=["path traversal"])


@pytest.mark.parametrize(
    ("name", "content"),
    [("broken-json", b"{not json"), ("deep", DEEP), ("not-an-object", b"[1, 2]"), ("nan", b'{"a": NaN}')],
)
def test_broken_artifact_files_are_refused(name: str, content: bytes, made: dict[str, Path], tmp_path: Path) -> None:
    out = _artifact_dir(made, tmp_path)
    (out / "sovpack-artifact.json").write_bytes(content)
    assert_refused(run_cli(["inspect", out]))
    assert_refused(run_cli(["run", out, "--ids", "1,2", "--max-new-tokens", "1"]))


@pytest.mark.parametrize("content", [b"{not json", DEEP, b'{"status": "PASSED"}'], ids=["broken", "deep", "partial"])
def test_broken_parity_report_in_an_artifact_is_refused(content: bytes, made: dict[str, Path], tmp_path: Path) -> None:
    out = _artifact_dir(made, tmp_path)
    (out / "parity.json").write_bytes(content)
    assert_refused(run_cli(["inspect", out]))


def test_tampered_extracted_file_is_refused_by_run_with_a_key(made: dict[str, Path], tmp_path: Path) -> None:
    out = _artifact_dir(made, tmp_path)
    data = bytearray((out / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "model.onnx.data").write_bytes(bytes(data))
    assert_refused(run_cli(["run", out, "--ids", "1,2", "--max-new-tokens", "1", "--key", made["public"]]),
                   mentions=["does not match model.sig"])


@pytest.mark.parametrize(
    ("name", "content", "suffix"),
    [
        ("deep-json", DEEP, ".json"),
        ("sparse-2GiB", None, ".json"),
        ("not-an-object", b"[]", ".json"),
        ("bad-toml", b"keys = [", ".toml"),
        ("unknown-key", b'{"trust_everything": true}', ".json"),
        ("fifo", "fifo", ".json"),
    ],
)
def test_hostile_policy_file_is_refused(name: str, content: Any, suffix: str, made: dict[str, Path],
                                        tmp_path: Path) -> None:
    policy = tmp_path / f"policy{suffix}"
    if content is None:
        with open(policy, "wb") as fh:
            fh.truncate(2 * 1024**3)
    elif content == "fifo":
        os.mkfifo(policy)
    else:
        policy.write_bytes(content)
    assert_refused(run_cli(["verify", made["bundle"], "--key", made["public"], "--policy", policy]), usage=True)


@pytest.mark.parametrize("kind", ["private-key", "fifo", "deep-garbage", "sparse-2GiB", "directory"])
def test_hostile_key_files_are_refused(kind: str, made: dict[str, Path], tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    if kind == "private-key":
        shutil.copyfile(made["private"], key)
    elif kind == "fifo":
        os.mkfifo(key)
    elif kind == "deep-garbage":
        key.write_bytes(DEEP[:50_000])
    elif kind == "sparse-2GiB":
        with open(key, "wb") as fh:
            fh.truncate(2 * 1024**3)
    else:
        key.mkdir()
    assert_refused(run_cli(["verify", made["bundle"], "--key", key]), usage=True)


def test_trust_state_garbage_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(DEEP)
    assert_refused(run_cli(["verify", made["bundle"], "--key", made["public"], "--trust-state", state]), usage=True)


def test_outputs_that_are_the_bundle_are_refused(made: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(made["bundle"], bundle)
    before = tree_snapshot(bundle)
    outcome = run_cli(["extract", bundle, "-t", "onnx:fp32", "-o", bundle, "--force", "--key", made["public"]])
    assert_refused(outcome, usage=True, mentions=["input"])
    outcome = run_cli(["extract", bundle, "-t", "onnx:fp32", "-o", bundle / "blobs", "--force", "--key",
                       made["public"]])
    assert_refused(outcome, usage=True, mentions=["input"])
    assert tree_snapshot(bundle) == before
    outcome = run_cli(["build", made["checkpoint"], "-o", made["checkpoint"], "--force", "-t", "onnx:fp32",
                       "--key", made["private"]])
    assert_refused(outcome, usage=True, mentions=["input"])


def test_running_or_rechecking_unverified_bundles_needs_a_key_or_insecure(made: dict[str, Path]) -> None:
    assert_refused(run_cli(["parity", made["bundle"]]), usage=True, mentions=["--insecure"])
    assert_refused(run_cli(["run", made["bundle"], "--ids", "1,2"]), usage=True, mentions=["--insecure"])
