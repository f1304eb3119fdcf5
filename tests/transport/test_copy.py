"""``sovpack copy`` under failure: a fault-injecting proxy (dropped connections mid-upload and mid-download, 500s,
429s, corrupted blobs) between sovpack and a real registry, a killed pull that is run again, the
oci-archive round trip (deterministic tar) and the refusals that protect a destination.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sovpack.cli import cli
from sovpack.errors import RegistryError, UsageError, VerificationError
from sovpack.oci.store import is_bundle_dir
from sovpack.transport import Reference, RegistryClient, RegistryLayout, RegistryOptions, copy_bundle
from sovpack.verify import verify_bundle
from tests.transport.registry_harness import (
    BuiltBundle,
    Fault,
    Registry,
    fault_proxy,
    needs_registry,
    running_registry,
    sovpack_env,
)

CHUNK = 64 * 1024  # small chunks, so the test bundle's larger blobs go up in several PATCH requests
FAST = RegistryOptions(plain_http=True, backoff=0.01, max_backoff=0.05, chunk_size=CHUNK, retries=6)
BLOB_GET = r"/blobs/sha256:"
UPLOAD = r"/blobs/uploads/"


# The shared fixtures (work, bundle, registry, pushed) live in conftest.py and read these.
REGISTRY_DIR = "registry"
PUSHED_REPOSITORY = "source/llama3"
PUSH_OPTIONS = FAST


def blob_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "blobs" / "sha256").iterdir() if not p.name.startswith(".")}


def assert_blobs_intact(root: Path) -> None:
    """Whatever landed in a destination's blob store hashes to its name."""
    for name, data in blob_files(root).items():
        assert hashlib.sha256(data).hexdigest() == name


def large_blobs(bundle: BuiltBundle) -> int:
    return sum(1 for p in (bundle.path / "blobs" / "sha256").iterdir() if p.stat().st_size > CHUNK)


# ------------------------------------------------------------------------------------------- archives


def test_archive_round_trip_is_deterministic_and_verifies(bundle: BuiltBundle, tmp_path: Path) -> None:
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    result = CliRunner().invoke(cli, ["copy", str(bundle.path), f"oci-archive:{first}", "--json"])
    assert result.exit_code == 0, result.output
    time.sleep(1.1)  # a different wall clock must not change a byte
    copy_bundle(bundle.path, f"oci-archive:{second}")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and names[-2:] == ["index.json", "oci-layout"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert {m.mode for m in members if m.isfile()} == {0o644} and {m.mode for m in members if m.isdir()} == {0o755}
    # the same bundle from a different source directory (with a stray blob) gives the same tar
    other = tmp_path / "other"
    shutil.copytree(bundle.path, other)
    stray = b"not part of the bundle"
    (other / "blobs" / "sha256" / hashlib.sha256(stray).hexdigest()).write_bytes(stray)
    copy_bundle(other, f"oci-archive:{tmp_path / 'c.tar'}")
    assert (tmp_path / "c.tar").read_bytes() == first.read_bytes()
    # back to a directory: byte-identical to the original, and it verifies
    restored = tmp_path / "restored"
    copy_bundle(f"oci-archive:{first}", restored)
    assert blob_files(restored) == blob_files(bundle.path)
    assert (restored / "index.json").read_bytes() == (bundle.path / "index.json").read_bytes()
    assert verify_bundle(restored, keys=[bundle.verifying]).ok
    verified = CliRunner().invoke(cli, ["verify", f"oci-archive:{first}", "--key", str(bundle.public_key)])
    assert verified.exit_code == 0, verified.output
    if shutil.which("skopeo"):
        raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{first}"], capture_output=True, text=True,
                             check=True, timeout=120)
        assert json.loads(raw.stdout)["annotations"]["dev.sovpack.tag"] == "v1"


def _rewrite_archive(source: Path, out: Path, edit: str) -> None:
    """A copy of an archive with one entry damaged: a flipped blob byte, or a symlink added."""
    with tarfile.open(source) as tar, tarfile.open(out, "w") as dst:
        members = tar.getmembers()
        biggest = max((m for m in members if m.isfile() and m.name.startswith("blobs/")), key=lambda m: m.size)
        for member in members:
            data = tar.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if edit == "flip" and member.name == biggest.name and data is not None:
                data = bytes([data[0] ^ 1]) + data[1:]
            if edit == "symlink" and member.name == biggest.name:
                link = tarfile.TarInfo(member.name)
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                dst.addfile(link)
                continue
            dst.addfile(member, io.BytesIO(data) if data is not None else None)


def test_archive_with_a_bad_blob_or_a_link_is_refused(bundle: BuiltBundle, tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    copy_bundle(bundle.path, f"oci-archive:{good}")
    for edit, message in (("flip", "arrived as"), ("symlink", "a symbolic link; refused")):
        bad = tmp_path / f"{edit}.tar"
        _rewrite_archive(good, bad, edit)
        dest = tmp_path / f"out-{edit}"
        with pytest.raises(VerificationError, match=message):
            copy_bundle(f"oci-archive:{bad}", dest)
        assert not is_bundle_dir(dest)
        assert not (dest / "index.json").exists()
        if (dest / "blobs").exists():
            assert_blobs_intact(dest)


def test_destination_refusals(bundle: BuiltBundle, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an OCI layout"):
        copy_bundle(bundle.path, foreign)
    with pytest.raises(UsageError, match="same directory"):
        copy_bundle(bundle.path, bundle.path)
    dest = tmp_path / "dest"
    copy_bundle(bundle.path, dest)
    again = copy_bundle(bundle.path, dest)  # the same bundle again: fine, nothing copied
    assert again.blobs_transferred == 0 and again.blobs_skipped == again.blobs
    other = variant(bundle, tmp_path / "other-bundle")
    with pytest.raises(UsageError, match="another bundle"):
        copy_bundle(other, dest)
    copy_bundle(other, dest, force=True)
    assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == json.loads(
        (other / "index.json").read_text())["manifests"][0]["digest"]
    with pytest.raises(UsageError, match="exists"):
        copy_bundle(bundle.path, f"oci-archive:{tmp_path / 'dest' / 'index.json'}")
    with pytest.raises(UsageError, match="output lies inside the input"):
        copy_bundle(bundle.path, f"oci-archive:{bundle.path / 'bundle.tar'}")


def variant(bundle: BuiltBundle, out: Path) -> Path:
    """A copy of the bundle whose bundle index differs by one annotation: another bundle, with the same tag."""
    shutil.copytree(bundle.path, out)
    index = json.loads((out / "index.json").read_text())
    entry = index["manifests"][0]
    top = json.loads((out / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes())
    top.setdefault("annotations", {})["org.opencontainers.image.description"] = "a variant"
    data = json.dumps(top).encode()
    digest = hashlib.sha256(data).hexdigest()
    (out / "blobs" / "sha256" / digest).write_bytes(data)
    entry.update(digest=f"sha256:{digest}", size=len(data))
    (out / "index.json").write_text(json.dumps(index))
    return out


def test_copy_keeps_the_bundles_own_tag(bundle: BuiltBundle, tmp_path: Path) -> None:
    """A bundle's tag is part of what was signed: a layout re-tagged as v2 copies out as v1, everywhere."""
    retagged = tmp_path / "retagged"
    shutil.copytree(bundle.path, retagged)
    index = json.loads((retagged / "index.json").read_text())
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "v2"
    (retagged / "index.json").write_text(json.dumps(index))
    result = copy_bundle(retagged, tmp_path / "copied")
    assert result.tag == "v1"
    assert (tmp_path / "copied" / "index.json").read_bytes() == (bundle.path / "index.json").read_bytes()
    archived = copy_bundle(retagged, f"oci-archive:{tmp_path / 'b.tar'}")
    assert archived.tag == "v1"
    with tarfile.open(tmp_path / "b.tar") as tar:
        member = tar.extractfile("index.json")
        assert member is not None and json.loads(member.read())["manifests"][0]["annotations"][
            "org.opencontainers.image.ref.name"] == "v1"
    with pytest.raises(UsageError, match=r"names the tag 'v2', but the bundle was built and signed as 'v1'.*rebuild"):
        copy_bundle(retagged, "docker://127.0.0.1:9/models/llama3:v2")  # refused before any request


# --------------------------------------------------------------------------------------------- faults


@needs_registry
def test_push_survives_dropped_uploads_500s_and_429s(bundle: BuiltBundle, registry: Registry) -> None:
    assert large_blobs(bundle) >= 1, "the test bundle needs a blob larger than one chunk"
    faults = (
        Fault("PATCH", UPLOAD, "drop-request", times=2, skip=1),  # lost before the registry saw it: resume
        Fault("PATCH", UPLOAD, "truncate-request", times=1, skip=4),  # half a chunk reached the registry
        Fault("PATCH", UPLOAD, "status", status=500, times=1, skip=6),
        Fault("POST", UPLOAD, "status", status=429, times=2),
        Fault("HEAD", BLOB_GET, "status", status=503, times=2, skip=3),
        Fault("PUT", r"/manifests/", "status", status=502, times=1),
        Fault("PUT", r"\?.*digest=", "drop-request", times=1, skip=2),  # the final PUT of an upload
    )
    with fault_proxy(registry, *faults) as proxy:
        result = copy_bundle(bundle.path, proxy.ref("faulty/push"), options=FAST)
        assert all(f.used == f.times for f in faults), [(f.kind, f.method, f.used) for f in faults]
    assert result.stats["retries"] > 0
    assert result.stats["resumed_uploads"] + result.stats["restarted_uploads"] >= 3
    assert result.stats["resumed_uploads"] >= 1  # Distribution resumes a session the failed PATCH never reached
    layout = RegistryLayout(Reference.parse(registry.ref("faulty/push")), FAST)
    assert verify_bundle(layout, keys=[bundle.verifying]).ok


@needs_registry
def test_pull_survives_dropped_downloads_500s_and_429s(bundle: BuiltBundle, registry: Registry, pushed: str,
                                                      tmp_path: Path) -> None:
    repo = Reference.parse(pushed).repository
    faults = (
        Fault("GET", BLOB_GET, "drop-response", times=3),
        Fault("GET", BLOB_GET, "status", status=500, times=2, skip=5),
        Fault("GET", r"/manifests/", "status", status=429, times=2),
        Fault("GET", r"/manifests/sha256:", "drop-response", times=1, skip=1),
    )
    with fault_proxy(registry, *faults) as proxy:
        dest = tmp_path / "pulled"
        result = copy_bundle(f"docker://{proxy.host}/{repo}:v1", dest, options=FAST)
        assert all(f.used == f.times for f in faults), [(f.kind, f.method, f.used) for f in faults]
        assert result.stats["resumed_downloads"] >= 3
        # verify straight through the faulty proxy too
        faults_again = [Fault("GET", BLOB_GET, "drop-response", times=2), Fault("GET", BLOB_GET, "status", times=1)]
        proxy.faults[:] = faults_again
        layout = RegistryLayout(Reference.parse(f"docker://{proxy.host}/{repo}:v1"), FAST)
        assert verify_bundle(layout, keys=[bundle.verifying]).ok
    assert blob_files(dest) == blob_files(bundle.path)
    assert verify_bundle(dest, keys=[bundle.verifying]).ok


@needs_registry
def test_registry_to_registry_through_faults_and_no_tag_before_content(bundle: BuiltBundle, registry: Registry,
                                                                       pushed: str) -> None:
    repo = Reference.parse(pushed).repository
    with running_registry(registry.storage.parent.parent / "second") as second:
        faults = (Fault("GET", BLOB_GET, "drop-response", times=2), Fault("PATCH", UPLOAD, "drop-request", times=1))
        with fault_proxy(registry, *faults) as src_proxy, fault_proxy(second, *faults) as dst_proxy:
            result = copy_bundle(f"docker://{src_proxy.host}/{repo}:v1", f"docker://{dst_proxy.host}/mirror:v1",
                                 options=FAST)
        assert result.blobs_transferred == result.blobs and result.blobs_mounted == 0
        assert verify_bundle(RegistryLayout(Reference.parse(second.ref("mirror")), FAST), keys=[bundle.verifying]).ok
        # a push that cannot finish leaves no tag behind
        client = RegistryClient(second.host, FAST)
        blocking = Fault("PUT", r"/manifests/sha256:", "status", status=500, times=1000)
        with fault_proxy(second, blocking) as proxy, pytest.raises(RegistryError, match="HTTP 500"):
            copy_bundle(bundle.path, f"docker://{proxy.host}/broken:v1", options=FAST)
        assert not client.manifest_exists("broken", "v1")


@needs_registry
def test_a_corrupting_proxy_is_caught_and_nothing_corrupt_lands(bundle: BuiltBundle, registry: Registry,
                                                                pushed: str, tmp_path: Path) -> None:
    repo = Reference.parse(pushed).repository
    with fault_proxy(registry, Fault("GET", BLOB_GET, "corrupt", times=1000)) as proxy:
        source = f"docker://{proxy.host}/{repo}:v1"
        dest = tmp_path / "pulled"
        result = CliRunner().invoke(cli, ["copy", source, str(dest), "--plain-http"])
        assert result.exit_code == 1 and "arrived as" in result.output
        # the first blob failed: what this run created is gone, so the message may say so
        assert f"nothing was written to {dest}" in result.output and not dest.exists()
        report = verify_bundle(RegistryLayout(Reference.parse(source), FAST), keys=[bundle.verifying])
        assert not report.ok and any("corrupt" in f for f in report.failures)
        with pytest.raises(VerificationError):
            copy_bundle(source, f"oci-archive:{tmp_path / 'x.tar'}", options=FAST)
        assert not (tmp_path / "x.tar").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the real registry is fine: a re-run without the proxy finishes into the same directory
    done = copy_bundle(f"docker://{registry.host}/{repo}:v1", dest, options=FAST)
    assert is_bundle_dir(dest) and verify_bundle(dest, keys=[bundle.verifying]).ok
    assert done.blobs_skipped + done.blobs_transferred == done.blobs


@needs_registry
def test_a_killed_pull_leaves_no_bundle_and_a_rerun_finishes(bundle: BuiltBundle, registry: Registry, pushed: str,
                                                            tmp_path: Path) -> None:
    repo = Reference.parse(pushed).repository
    dest = tmp_path / "pulled"
    with fault_proxy(registry, delay=0.15) as proxy:  # slow blob downloads: ~0.4 MB/s
        process = subprocess.Popen(
            [sys.executable, "-m", "sovpack", "copy", f"docker://{proxy.host}/{repo}:v1", str(dest), "--plain-http"],
            env=sovpack_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        blobs = dest / "blobs" / "sha256"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            landed = [p for p in blobs.iterdir() if not p.name.startswith(".")] if blobs.is_dir() else []
            if len(landed) >= 3:
                break
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()
    assert not is_bundle_dir(dest)
    assert not (dest / "index.json").exists()
    assert_blobs_intact(dest)
    landed = len(blob_files(dest))
    assert 0 < landed < len(blob_files(bundle.path))
    result = CliRunner().invoke(cli, ["copy", f"docker://{registry.host}/{repo}:v1", str(dest), "--plain-http",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["blobs_skipped"] >= landed - 1  # (the one being written may have been a manifest)
    assert verify_bundle(dest, keys=[bundle.verifying]).ok
    assert blob_files(dest) == blob_files(bundle.path)


@needs_registry
def test_a_partial_download_is_continued_with_range(bundle: BuiltBundle, registry: Registry, pushed: str,
                                                    tmp_path: Path) -> None:
    """A killed run leaves ``.<hex>.partial``; the next run asks only for the rest (and checks the whole)."""
    repo = Reference.parse(pushed).repository
    biggest = max((bundle.path / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = biggest.read_bytes()
    dest = tmp_path / "pulled"
    (dest / "blobs" / "sha256").mkdir(parents=True)
    (dest / "blobs" / "sha256" / f".{biggest.name}.partial").write_bytes(data[: len(data) // 3])
    with fault_proxy(registry) as proxy:
        result = copy_bundle(f"docker://{proxy.host}/{repo}:v1", dest, options=FAST)
    assert result.bytes_transferred == sum(len(v) for v in blob_files(bundle.path).values()) - len(data) // 3 - sum(
        len(v) for k, v in blob_files(bundle.path).items() if _is_manifest(bundle, k))
    assert verify_bundle(dest, keys=[bundle.verifying]).ok
    # a kept prefix that is wrong is thrown away and the blob fetched whole
    dest2 = tmp_path / "pulled2"
    (dest2 / "blobs" / "sha256").mkdir(parents=True)
    (dest2 / "blobs" / "sha256" / f".{biggest.name}.partial").write_bytes(b"\x00" * (len(data) // 3))
    copy_bundle(f"docker://{registry.host}/{repo}:v1", dest2, options=FAST)
    assert verify_bundle(dest2, keys=[bundle.verifying]).ok


def _is_manifest(bundle: BuiltBundle, name: str) -> bool:
    """Manifests and indexes travel through the manifest endpoint (not counted as blob bytes)."""
    try:
        doc = json.loads((bundle.path / "blobs" / "sha256" / name).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("mediaType") in (
        "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json")
