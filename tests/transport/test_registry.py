"""sovpack and OCI registries: push, pull, verify and inspect straight from a registry, referrers, mounts, skopeo
interoperability, and the auth/TLS variants (htpasswd Basic, Bearer tokens from a test issuer, a private CA).

Every registry is a real Distribution 2.8 (``docker-registry``) on a free loopback port, started per module.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sovpack.cli import cli
from sovpack.errors import RegistryError, UsageError, VerificationError
from sovpack.oci.store import is_bundle_dir
from sovpack.transport import (
    Reference,
    RegistryClient,
    RegistryLayout,
    RegistryOptions,
    copy_bundle,
    parse_challenge,
    resolve_credentials,
)
from sovpack.verify import inspect_bundle, verify_bundle
from tests.transport.registry_harness import (
    BuiltBundle,
    Registry,
    TokenIssuer,
    bcrypt_hash,
    fault_proxy,
    https_ready,
    make_ca,
    needs_registry,
    needs_skopeo,
    running_registry,
    sovpack_env,
)

PLAIN = RegistryOptions(plain_http=True, backoff=0.01)


# The shared fixtures (work, bundle, registry, pushed) live in conftest.py and read these.
REGISTRY_DIR = "plain"
PUSHED_REPOSITORY = "models/llama3"
PUSH_OPTIONS = PLAIN


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result


# ------------------------------------------------------------------------------------------ unit level


def test_reference_parsing() -> None:
    ref = Reference.parse("docker://127.0.0.1:5000/models/llama3:v1")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("127.0.0.1:5000", "models/llama3", "v1", None)
    assert str(ref) == "docker://127.0.0.1:5000/models/llama3:v1"
    pinned = Reference.parse("docker://localhost/a/b@sha256:" + "a" * 64)
    assert pinned.reference == "sha256:" + "a" * 64 and pinned.tag is None
    assert Reference.parse("docker://reg.example/x").reference == "latest"
    for bad in ("docker://127.0.0.1:5000", "docker://h/UPPER:v1", "docker://h/r:bad tag", "docker://h/r@sha256:12"):
        with pytest.raises(UsageError):
            Reference.parse(bad)


def test_credentials_order(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"reg.example:5000": {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    env = {"DOCKER_CONFIG": str(tmp_path)}
    creds = resolve_credentials("reg.example:5000", RegistryOptions(), env)
    assert creds is not None and (creds.username, creds.password) == ("alice", "s3cret")
    assert resolve_credentials("other:5000", RegistryOptions(), env) is None
    env_creds = resolve_credentials("reg.example:5000", RegistryOptions(),
                                    {**env, "SOVPACK_REGISTRY_USERNAME": "bob", "SOVPACK_REGISTRY_PASSWORD": "pw"})
    assert env_creds is not None and env_creds.username == "bob"
    flag = resolve_credentials("reg.example:5000", RegistryOptions(creds="carol:x:y"), env)
    assert flag is not None and (flag.username, flag.password) == ("carol", "x:y")
    with pytest.raises(UsageError):
        resolve_credentials("r", RegistryOptions(creds="nocolon"), {})


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:a/b:pull,push"}


# ------------------------------------------------------------------------------------------ plain HTTP


@needs_registry
def test_push_pull_round_trip_is_byte_identical(bundle: BuiltBundle, registry: Registry, pushed: str,
                                                tmp_path: Path) -> None:
    pulled = tmp_path / "pulled"
    result = invoke("copy", pushed, str(pulled), "--plain-http", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["digest"] == bundle.index_digest and data["tag"] == "v1"
    for path in sorted(p for p in bundle.path.rglob("*") if p.is_file()):
        assert (pulled / path.relative_to(bundle.path)).read_bytes() == path.read_bytes(), path
    assert sorted(p.name for p in (pulled / "blobs" / "sha256").iterdir()) == sorted(
        p.name for p in (bundle.path / "blobs" / "sha256").iterdir()
    )
    assert verify_bundle(pulled, keys=[bundle.verifying]).ok
    # pushing again sends nothing: every blob is found with HEAD first
    again = copy_bundle(bundle.path, pushed, options=PLAIN)
    assert again.blobs_transferred == 0 and again.blobs_skipped == again.blobs > 0


@needs_registry
def test_verify_and_inspect_straight_from_the_registry(bundle: BuiltBundle, registry: Registry, pushed: str) -> None:
    result = invoke("verify", pushed, "--plain-http", "--key", str(bundle.public_key), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["path"] == pushed
    assert {t["name"] for t in report["targets"]} == set(bundle.target_digests)
    local = verify_bundle(bundle.path, keys=[bundle.verifying])
    assert report["bytes_checked"] >= sum(t.size for t in local.targets)  # every layer was fetched and hashed
    info = invoke("inspect", pushed, "--plain-http", "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.output)
    assert data["index_digest"] == bundle.index_digest
    assert "v1" in (data.get("tag"), (data.get("unsigned") or {}).get("tag"))  # unsigned without --key
    assert data["size"] == inspect_bundle(bundle.path)["size"]
    text = invoke("inspect", pushed, "--plain-http")
    assert "parity" in text.output and bundle.index_digest in text.output
    # without --plain-http the client speaks TLS to a plain registry and says what to do
    failed = invoke("verify", pushed, "--key", str(bundle.public_key))
    assert failed.exit_code == 1 and "--plain-http" in failed.output


@needs_registry
def test_verify_from_registry_catches_a_corrupted_stored_blob(bundle: BuiltBundle, registry: Registry,
                                                             tmp_path: Path) -> None:
    ref = registry.ref("tamper/llama3")
    copy_bundle(bundle.path, ref, options=PLAIN)
    target = next(iter(bundle.target_digests.values()))
    manifest = json.loads((bundle.path / "blobs" / "sha256" / target.split(":")[1]).read_bytes())
    biggest = max(manifest["layers"], key=lambda layer: layer["size"])
    data = registry.blob_data(biggest["digest"])
    original = data.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01
    data.write_bytes(bytes(tampered))
    try:
        report = verify_bundle(RegistryLayout(Reference.parse(ref), PLAIN), keys=[bundle.verifying])
        assert not report.ok
        assert any(biggest["digest"] in f and "corrupt" in f for f in report.failures), report.failures
        with pytest.raises(VerificationError, match="arrived as"):
            copy_bundle(ref, tmp_path / "pulled", options=PLAIN)
        assert not is_bundle_dir(tmp_path / "pulled")
        assert not (tmp_path / "pulled" / "blobs" / "sha256" / biggest["digest"].split(":")[1]).exists()
    finally:
        data.write_bytes(original)


@needs_registry
def test_extract_and_run_from_the_registry(bundle: BuiltBundle, registry: Registry, pushed: str,
                                           tmp_path: Path) -> None:
    target = sorted(bundle.target_digests)[0]
    out = tmp_path / "extracted"
    result = invoke("extract", pushed, "--plain-http", "-t", target, "-o", str(out), "--key",
                    str(bundle.public_key), "--json")
    assert result.exit_code == 0, result.output
    assert (out / "model.sig").is_file()
    ran = invoke("run", pushed, "--plain-http", "-t", target, "--key", str(bundle.public_key), "--ids", "1,2,3",
                 "--max-new-tokens", "2", "--json")
    assert ran.exit_code == 0, ran.output
    assert len(json.loads(ran.output)["generated_ids"]) <= 2


@needs_registry
def test_attestations_are_referrers_through_the_tag_fallback(bundle: BuiltBundle, registry: Registry,
                                                             pushed: str) -> None:
    ref = Reference.parse(pushed)
    client = RegistryClient(ref.registry, PLAIN)
    assert not client.supports_referrers(ref.repository, next(iter(bundle.target_digests.values())))
    for target, digest in bundle.target_digests.items():
        referrers, how = client.referrers(ref.repository, digest)
        assert how == "tag-fallback"
        kinds = sorted(r["annotations"]["dev.sovpack.attestation"] for r in referrers)
        assert kinds == ["parity", "provenance", "signature"], target
        assert {r["artifactType"] for r in referrers} == {"application/vnd.dev.sigstore.bundle.v0.3+json"}


@needs_registry
def test_a_fallback_tag_that_is_not_a_referrers_index_is_not_overwritten(bundle: BuiltBundle,
                                                                        registry: Registry) -> None:
    """Someone else's content under ``sha256-<hex>``: the push stops naming the tag instead of replacing it."""
    ref = Reference.parse(registry.ref("clobbered/llama3"))
    copy_bundle(bundle.path, str(ref), options=PLAIN)
    client = RegistryClient(ref.registry, PLAIN)
    subject = next(iter(bundle.target_digests.values()))
    tag = "sha256-" + subject.split(":")[1]
    foreign, media_type, _digest = client.get_manifest(ref.repository, subject)  # a manifest, not an index
    client.put_manifest(ref.repository, tag, foreign, media_type)
    with pytest.raises(RegistryError, match=f"{registry.host}/clobbered/llama3:{tag}: holds no referrers index"):
        copy_bundle(bundle.path, str(ref), options=PLAIN)
    assert client.get_manifest(ref.repository, tag)[0] == foreign
    with pytest.raises(RegistryError, match="holds no referrers index"):
        client.referrers(ref.repository, subject)
    # an index without its (required) manifests list is not read as empty either
    empty = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}).encode()
    client.put_manifest(ref.repository, tag, empty, "application/vnd.oci.image.index.v1+json")
    with pytest.raises(RegistryError, match="holds no referrers index"):
        copy_bundle(bundle.path, str(ref), options=PLAIN)
    assert client.get_manifest(ref.repository, tag)[0] == empty


@needs_registry
def test_no_fallback_tags_where_the_registry_has_the_referrers_api(bundle: BuiltBundle, registry: Registry) -> None:
    """Simulated: the proxy answers the referrers API as an OCI 1.1 registry would (Distribution 2.8 has none)."""
    with fault_proxy(registry, referrers_api=True) as proxy:
        result = copy_bundle(bundle.path, proxy.ref("oci11/llama3"), options=PLAIN)
        assert result.referrers == "api" and result.referrer_tags == ()
        client = RegistryClient(proxy.host, PLAIN)
        assert client.referrers("oci11/llama3", next(iter(bundle.target_digests.values())))[1] == "api"
    direct = RegistryClient(registry.host, PLAIN)
    for digest in bundle.target_digests.values():
        assert not direct.manifest_exists("oci11/llama3", "sha256-" + digest.split(":")[1])


@needs_registry
def test_copy_between_repositories_mounts_blobs(bundle: BuiltBundle, registry: Registry, pushed: str) -> None:
    mirror = f"docker://{registry.host}/mirror/llama3"  # no tag: the bundle keeps its own
    result = copy_bundle(pushed, mirror, options=PLAIN)
    assert result.blobs_mounted == result.blobs > 0 and result.blobs_transferred == 0
    assert result.tag == "v1" and result.destination == f"{mirror}:v1"
    assert verify_bundle(RegistryLayout(Reference.parse(f"{mirror}:v1"), PLAIN), keys=[bundle.verifying]).ok


@needs_registry
def test_copy_keeps_the_signed_tag_and_verify_agrees(bundle: BuiltBundle, registry: Registry, pushed: str) -> None:
    """The re-tagging rule: a bundle's tag is part of what was signed, so copy keeps it and refuses another.

    What ``copy`` pushed verifies by the very reference it was pushed to (issue 11: it used not to).
    """
    plain = f"docker://{registry.host}/retag/llama3"
    refused = invoke("copy", str(bundle.path), f"{plain}:prod", "--plain-http")
    assert refused.exit_code == 2
    assert "names the tag 'prod', but the bundle was built and signed as 'v1'" in refused.output
    assert "rebuild the bundle with --tag prod" in refused.output
    client = RegistryClient(registry.host, PLAIN)
    assert not client.manifest_exists("retag/llama3", "prod")  # refused before anything was pushed
    done = invoke("copy", str(bundle.path), plain, "--plain-http", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["destination"] == f"{plain}:v1"
    for where in (f"{plain}:v1", pushed):
        verified = invoke("verify", where, "--plain-http", "--key", str(bundle.public_key))
        assert verified.exit_code == 0, verified.output
    from_registry = invoke("copy", pushed, f"docker://{registry.host}/retag/other:prod", "--plain-http")
    assert from_registry.exit_code == 2 and "'prod'" in from_registry.output


@needs_registry
@needs_skopeo
def test_skopeo_reads_what_sovpack_pushed_and_sovpack_reads_what_skopeo_mirrored(
    bundle: BuiltBundle, registry: Registry, pushed: str, tmp_path: Path
) -> None:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", pushed],
                         capture_output=True, text=True, check=True, timeout=120)
    index = json.loads(raw.stdout)
    assert set(bundle.target_digests.values()) <= {m["digest"] for m in index["manifests"]}
    oci_copy = tmp_path / "skopeo-oci"
    subprocess.run(["skopeo", "copy", "--all", "--src-tls-verify=false", pushed, f"oci:{oci_copy}:v1"],
                   capture_output=True, text=True, check=True, timeout=300)
    assert verify_bundle(oci_copy, keys=[bundle.verifying]).ok
    mirrored = registry.ref("skopeo/llama3")
    subprocess.run(["skopeo", "copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false", pushed, mirrored],
                   capture_output=True, text=True, check=True, timeout=300)
    result = invoke("verify", mirrored, "--plain-http", "--key", str(bundle.public_key))
    assert result.exit_code == 0, result.output
    pulled = tmp_path / "pulled"
    assert invoke("copy", mirrored, str(pulled), "--plain-http").exit_code == 0
    assert verify_bundle(pulled, keys=[bundle.verifying]).ok


# ------------------------------------------------------------------------------------------ htpasswd


@needs_registry
def test_htpasswd_basic_auth(bundle: BuiltBundle, work: Path, tmp_path: Path) -> None:
    htpasswd = work / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt_hash('wonderland')}\n")
    with running_registry(work / "basic", htpasswd=htpasswd) as reg:
        ref = reg.ref("private/llama3")
        with pytest.raises(RegistryError, match="needs credentials"):
            copy_bundle(bundle.path, ref, options=RegistryOptions(plain_http=True))
        with pytest.raises(RegistryError, match="refused the credentials"):
            copy_bundle(bundle.path, ref, options=RegistryOptions(plain_http=True, creds="alice:wrong"))
        # --creds on the command line
        pushed = invoke("copy", str(bundle.path), ref, "--plain-http", "--creds", "alice:wonderland",
                        env=sovpack_env())
        assert pushed.exit_code == 0, pushed.output
        # the environment pair, in a fresh process
        env = sovpack_env(SOVPACK_REGISTRY_USERNAME="alice", SOVPACK_REGISTRY_PASSWORD="wonderland")
        verified = subprocess.run([sys.executable, "-m", "sovpack", "verify", ref, "--plain-http", "--key",
                                   str(bundle.public_key)], env=env, capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0, verified.stderr
        # docker config auths (DOCKER_CONFIG honoured)
        docker = tmp_path / "docker"
        docker.mkdir()
        auth = base64.b64encode(b"alice:wonderland").decode()
        (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        pulled = tmp_path / "pulled"
        result = subprocess.run([sys.executable, "-m", "sovpack", "copy", ref, str(pulled), "--plain-http"],
                                env=sovpack_env(DOCKER_CONFIG=str(docker)), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert verify_bundle(pulled, keys=[bundle.verifying]).ok


# --------------------------------------------------------------------------------------------- TLS


@needs_registry
def test_tls_with_a_private_ca(bundle: BuiltBundle, work: Path, tmp_path: Path) -> None:
    ca = make_ca(work / "ca")
    with running_registry(work / "tls", tls=ca) as reg:
        https_ready(reg)
        ref = reg.ref("secure/llama3")
        refused = invoke("copy", str(bundle.path), ref)
        assert refused.exit_code == 1 and "--ca-file" in refused.output
        pushed = invoke("copy", str(bundle.path), ref, "--ca-file", str(ca.ca_cert))
        assert pushed.exit_code == 0, pushed.output
        verified = invoke("verify", ref, "--ca-file", str(ca.ca_cert), "--key", str(bundle.public_key))
        assert verified.exit_code == 0, verified.output
        pulled = tmp_path / "pulled"
        assert invoke("copy", ref, str(pulled), "--ca-file", str(ca.ca_cert)).exit_code == 0
        assert verify_bundle(pulled, keys=[bundle.verifying]).ok


# ------------------------------------------------------------------------------------------ bearer


@needs_registry
def test_bearer_token_auth_against_distribution_token_auth(bundle: BuiltBundle, work: Path, tmp_path: Path) -> None:
    issuer = TokenIssuer(work / "token", "bob", "builder")
    try:
        with running_registry(work / "bearer", token=issuer) as reg:
            ref = reg.ref("team/llama3")
            with pytest.raises(RegistryError, match="token endpoint"):
                copy_bundle(bundle.path, ref, options=RegistryOptions(plain_http=True, creds="bob:nope"))
            options = RegistryOptions(plain_http=True, creds="bob:builder")
            result = copy_bundle(bundle.path, ref, options=options)
            assert result.blobs_transferred == result.blobs
            assert any("repository:team/llama3:pull,push" in r["scopes"] for r in issuer.requests if r["user"])
            assert {r["service"] for r in issuer.requests} == {issuer.service}
            mirror = reg.ref("other/llama3")
            mounted = copy_bundle(ref, mirror, options=options)
            assert mounted.blobs_mounted == mounted.blobs
            assert any(set(r["scopes"]) >= {"repository:other/llama3:pull,push", "repository:team/llama3:pull"}
                       for r in issuer.requests)
            assert verify_bundle(RegistryLayout(Reference.parse(ref), options), keys=[bundle.verifying]).ok
            env = sovpack_env(SOVPACK_REGISTRY_USERNAME="bob", SOVPACK_REGISTRY_PASSWORD="builder")
            pulled = tmp_path / "pulled"
            done = subprocess.run([sys.executable, "-m", "sovpack", "copy", mirror, str(pulled), "--plain-http"],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert verify_bundle(pulled, keys=[bundle.verifying]).ok
    finally:
        issuer.close()


def test_no_registry_needed_for_bad_arguments(tmp_path: Path) -> None:
    result = invoke("copy", str(tmp_path / "nope"), "ftp://x/y")
    assert result.exit_code == 2 and "unknown transport" in result.output
    assert "SOVPACK_REGISTRY_USERNAME" in invoke("copy", "--help").output
