"""Hostile bundle transport: oci-archive tarballs, layout directories, destinations and registries an attacker
controls.

Each case builds one attack (a small unsigned bundle from ``tests.transport.fake_registry``: copy does not
need signatures), runs the real CLI in a limited child process (``harness.run_cli``: RLIMIT_CPU, RLIMIT_AS, a
wall ceiling for blocked children) and asserts the clean outcome: exit 1 (2 for usage errors) with one
``error:`` line naming the problem and no traceback, or, where the right answer is to go on (unreferenced
blobs), success with the harm undone. Cases that write also prove that nothing outside the output changed.
Registry cases talk to ``FakeRegistry`` on 127.0.0.1 only, with ``--stall-timeout 1``; its slow answers stop
by themselves after 20 s.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile.harness import Outcome, assert_refused, run_cli, tree_snapshot
from tests.hostile.transport_attacks import (
    CASES,
    STALL,
    STALL_SECONDS,
    Run,
    archive_with,
    blob_rule,
    case,
    gzip_bomb,
    layout,
    no_staging,
    outside,
    registry,
    retop,
    special,
    tar_bytes,
    unpack,
)
from tests.transport.fake_registry import MT_INDEX, FakeBundle, Rule, add_member, nested_json

# ------------------------------------------------------------------------------------- 1. oci-archive input


@case("archive-gzip-bomb-1gib-blob")
def _gzip_bomb(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    # ~1 MB of gzip holding a valid 1 GiB blob nothing references: used to be written whole, verify stayed OK
    (tmp / "in").mkdir()
    return unpack(tmp, gzip_bomb(tmp / "in" / "bomb.tar.gz", FakeBundle()), "decompression bomb")


@case("archive-member-larger-than-its-descriptor")
def _larger_member(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    (tmp / "in").mkdir()
    members = [(n, (d + bytes(4 * 1024 * 1024)) if bundle.layer.split(":")[1] in n else d) for n, d in bundle.members()]
    (tmp / "in" / "big.tar").write_bytes(tar_bytes(members))
    return unpack(tmp, tmp / "in" / "big.tar", "its descriptor says")


@case("archive-20000-unreferenced-blobs")
def _many_blobs(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    extra = [(f"blobs/sha256/{hashlib.sha256(str(i).encode()).hexdigest()}", str(i).encode()) for i in range(20_000)]
    return unpack(tmp, archive_with(tmp / "in", *extra), "more than 10000 members")


@case("archive-unreferenced-blobs-are-not-imported")
def _stray_blobs(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    extra = [(f"blobs/sha256/{hashlib.sha256(str(i).encode()).hexdigest()}", str(i).encode()) for i in range(50)]
    bundle = FakeBundle()
    archive = archive_with(tmp / "in", *extra, bundle=bundle)
    dest = tmp / "out"

    def check(outcome: Outcome) -> None:
        assert "skipped 50 blob(s)" in outcome.stdout, outcome.stdout
        assert sorted(p.name for p in (dest / "blobs" / "sha256").iterdir()) == sorted(
            d.split(":")[1] for d in bundle.blobs)

    return Run(["copy", f"oci-archive:{archive}", dest], succeeds=True, unchanged=[tmp / "in"], check=check)


def _member_case(name: str, info: Callable[[], tarfile.TarInfo], *mentions: str) -> None:
    def build(tmp: Path, _stack: contextlib.ExitStack) -> Run:
        (tmp / "in").mkdir()
        return unpack(tmp, archive_with(tmp / "in", info()), *mentions)

    case(name)(build)


_member_case("archive-symlink-member", lambda: special("blobs/sha256/" + "a" * 64, tarfile.SYMTYPE, "/etc/passwd"),
             "a symbolic link")
_member_case("archive-hardlink-member", lambda: special("index.json", tarfile.LNKTYPE, "/etc/shadow"),
             "a hard link")
_member_case("archive-device-member", lambda: special("oci-layout", tarfile.CHRTYPE), "a character device")
_member_case("archive-fifo-member", lambda: special("index.json", tarfile.FIFOTYPE), "a FIFO")
_member_case("archive-sparse-member", lambda: special("blobs/sha256/" + "b" * 64, tarfile.GNUTYPE_SPARSE),
             "a sparse file")
_member_case("archive-absolute-member-name", lambda: special("/etc/cron.d/evil", tarfile.REGTYPE), "absolute")
_member_case("archive-dotdot-member-name", lambda: special("blobs/../../evil", tarfile.REGTYPE), "path traversal")


@case("archive-duplicate-index-json")
def _duplicate_index(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    # two index.json members: which one counts depends on the reader (the old one silently took the last)
    (tmp / "in").mkdir()
    other = FakeBundle(tag="other", layer_size=1024)
    members = [*FakeBundle().members(), ("index.json", other.index_json())]
    (tmp / "in" / "dup.tar").write_bytes(tar_bytes(members))
    return unpack(tmp, tmp / "in" / "dup.tar", "appears twice")


@case("archive-nested-index-json")
def _nested_archive_index(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    members = [(n, nested_json(100_000) if n == "index.json" else d) for n, d in FakeBundle().members()]
    (tmp / "in" / "nested.tar").write_bytes(tar_bytes(members))
    return unpack(tmp, tmp / "in" / "nested.tar", "index.json", "nested")


@case("archive-pax-header-backtracking")
def _pax_redos(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    # 256 KiB of digits in a PAX header: tarfile's header regex backtracks quadratically over it (minutes of CPU)
    (tmp / "in").mkdir()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        pax = tarfile.TarInfo("PaxHeaders/index.json")
        pax.type = tarfile.XHDTYPE
        data = b"1" * (256 * 1024)
        pax.size = len(data)
        tar.addfile(pax, io.BytesIO(data))
        for name, member in FakeBundle().members():
            add_member(tar, name, member)
    (tmp / "in" / "pax.tar").write_bytes(out.getvalue())
    return unpack(tmp, tmp / "in" / "pax.tar", "PAX header")


@case("archive-truncated-inside-a-blob")
def _truncated(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    data = tar_bytes(FakeBundle().members())
    (tmp / "in" / "cut.tar").write_bytes(data[: len(data) // 2])
    return unpack(tmp, tmp / "in" / "cut.tar", "cut.tar")


@case("archive-not-a-tar")
def _not_tar(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    (tmp / "in" / "noise.tar").write_bytes(hashlib.sha256(b"noise").digest() * 4096)
    return unpack(tmp, tmp / "in" / "noise.tar", "not a tar archive")


@case("archive-gzip-garbage")
def _gzip_garbage(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    good = gzip.compress(tar_bytes(FakeBundle().members()), mtime=0)
    (tmp / "in" / "bad.tar.gz").write_bytes(good[:200] + bytes(200) + good[400:])
    return unpack(tmp, tmp / "in" / "bad.tar.gz", "damaged")


@case("archive-is-a-fifo")
def _fifo_archive(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "in").mkdir()
    os.mkfifo(tmp / "in" / "pipe.tar")
    return unpack(tmp, tmp / "in" / "pipe.tar", "not a regular file")


# --------------------------------------------------------------------------- 2. symbolic links in layouts


def _dest_link(name: str, link: str, *, archive: bool = False) -> None:
    def build(tmp: Path, _stack: contextlib.ExitStack) -> Run:
        victim = outside(tmp)
        src = layout(tmp)
        dest = tmp / "dest"
        if link == ".":
            dest.symlink_to(victim, target_is_directory=True)
        else:
            (dest / link).parent.mkdir(parents=True, exist_ok=True)
            (dest / link).symlink_to(victim, target_is_directory=True)
        source = str(src)
        if archive:
            source = f"oci-archive:{FakeBundle().write_archive(tmp / 'bundle.tar')}"
        return Run(["copy", source, dest], mentions=("symbolic link",), usage=True, unchanged=[victim, src])

    case(name)(build)


_dest_link("dest-root-is-a-symlink", ".")
_dest_link("dest-blobs-is-a-symlink", "blobs")
_dest_link("dest-blobs-sha256-is-a-symlink", "blobs/sha256")
_dest_link("archive-into-dest-blobs-symlink", "blobs", archive=True)


@case("dest-index-json-is-a-symlink")
def _dest_index_link(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    victim = outside(tmp)
    src = layout(tmp)
    dest = tmp / "dest"
    (dest / "blobs" / "sha256").mkdir(parents=True)
    (dest / "index.json").symlink_to(victim / "precious.txt")
    return Run(["copy", src, dest, "--force"], mentions=("symbolic link",), usage=True, unchanged=[victim, src])


@case("dest-partial-download-is-a-symlink")
def _dest_partial_link(tmp: Path, stack: contextlib.ExitStack) -> Run:
    # a planted .partial link: the download used to append the blob to whatever it points at
    victim = outside(tmp)
    bundle = FakeBundle()
    reg = registry(stack, bundle=bundle)
    blobs = tmp / "dest" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / f".{bundle.layer.split(':')[1]}.partial").symlink_to(victim / "precious.txt")
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("symbolic link",), usage=True,
               unchanged=[victim])


@case("source-blob-is-a-symlink-outside")
def _source_blob_link(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    src = layout(tmp, bundle)
    victim = outside(tmp)
    blob = src / "blobs" / "sha256" / bundle.layer.split(":")[1]
    (victim / "layer").write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(victim / "layer")
    return Run(["copy", src, tmp / "dest"], mentions=("symbolic link",), unchanged=[victim])


@case("source-blobs-dir-is-a-symlink")
def _source_dir_link(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    src = layout(tmp)
    victim = outside(tmp)
    (src / "blobs").rename(victim / "blobs")
    (src / "blobs").symlink_to(victim / "blobs", target_is_directory=True)
    return Run(["copy", src, tmp / "dest"], mentions=("symbolic link",), unchanged=[victim], absent=[tmp / "dest"])


# ------------------------------------------------------------------------------ 3. stalling registries


@case("registry-trickles-a-blob")
def _trickle_blob(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    reg = registry(stack, blob_rule(bundle.layer, "trickle"), bundle=bundle)
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("stalled", "run the same copy again"),
               max_seconds=STALL_SECONDS)


@case("registry-trickles-the-manifest-to-verify")
def _trickle_manifest(tmp: Path, stack: contextlib.ExitStack) -> Run:
    from sovpack.attest.dsse import generate_key_pair

    reg = registry(stack, Rule("GET", "/manifests/", "trickle"))
    key = generate_key_pair(tmp / "keys").public_key
    return Run(["verify", reg.ref(), "--key", key, *STALL], mentions=("stalled",), max_seconds=STALL_SECONDS)


@case("registry-trickles-into-an-archive-leaves-no-staging")
def _trickle_archive(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    reg = registry(stack, blob_rule(bundle.layer, "trickle"), bundle=bundle)
    out = tmp / "out"
    out.mkdir()
    return Run(["copy", reg.ref(), f"oci-archive:{out / 'b.tar'}", *STALL], mentions=("stalled",),
               absent=[out / "b.tar"], check=no_staging(out), max_seconds=STALL_SECONDS)


@case("registry-reads-uploads-one-byte-at-a-time")
def _slow_upload(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("PATCH", "/blobs/uploads/", "slow-read"), Rule("PUT", "/blobs/uploads/", "slow-read"),
                   bundle=FakeBundle(layer_size=1024))
    return Run(["copy", layout(tmp), reg.ref(None, "pushed/bundle"), *STALL, "--chunk-size", "1"],
               mentions=("stalled",), max_seconds=STALL_SECONDS)


@case("registry-never-answers")
def _never(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "/manifests/", "hang"))
    return Run(["inspect", reg.ref(), *STALL], mentions=("stalled",), max_seconds=STALL_SECONDS)


@case("registry-trickles-the-token-answer")
def _trickle_token(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "^/token", "trickle", body=b'{"token": "abc", "pad": "%s"}' % (b"x" * 2048)))
    reg.rules.append(Rule("GET", "/manifests/", "respond", status=401,
                          headers={"WWW-Authenticate": f'Bearer realm="http://{reg.host}/token",service="fake"'}))
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("stalled",), absent=[tmp / "dest"],
               max_seconds=STALL_SECONDS)


# ------------------------------------------------------------------- 4. what a failed copy says is left


def _says_what_is_left(dest: Path, landed: bool) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        if landed:
            assert "nothing was written" not in outcome.stderr
            assert any(p for p in (dest / "blobs" / "sha256").iterdir() if not p.name.startswith("."))
            assert not (dest / "index.json").exists()
        else:
            assert f"nothing was written to {dest}" in outcome.stderr and not dest.exists()

    return check


@case("failed-copy-from-an-archive-says-what-is-left")
def _failed_archive(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    (tmp / "in").mkdir()
    layer = bundle.layer.split(":")[1]
    members = [(n, bytes([d[0] ^ 1]) + d[1:] if layer in n else d) for n, d in bundle.members()]
    (tmp / "in" / "flipped.tar").write_bytes(tar_bytes(members))
    dest = tmp / "dest"
    return Run(["copy", f"oci-archive:{tmp / 'in' / 'flipped.tar'}", dest], mentions=("keeps", "run the same copy"),
               check=_says_what_is_left(dest, landed=True))


@case("failed-copy-from-a-registry-says-what-is-left")
def _failed_registry(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    data = bundle.blobs[bundle.layer]
    reg = registry(stack, blob_rule(bundle.layer, "respond", body=bytes([data[0] ^ 1]) + data[1:]),
                   bundle=bundle)
    dest = tmp / "dest"
    return Run(["copy", reg.ref(), dest, *STALL], mentions=("arrived as", "keeps", "run the same copy"),
               check=_says_what_is_left(dest, landed=True))


@case("failed-copy-of-the-first-blob-writes-nothing")
def _failed_first(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    first = json.loads(bundle.blobs[bundle.manifest])["config"]["digest"]
    reg = registry(stack, blob_rule(first, "respond", body=b'{"note":"fake bundle for transport TESTS"}'),
                   bundle=bundle)
    dest = tmp / "new" / "deeper" / "dest"  # the directories the copy made go too
    return Run(["copy", reg.ref(), dest, *STALL], mentions=("arrived as", "nothing was written"),
               absent=[tmp / "new"], check=_says_what_is_left(dest, landed=False))


# ------------------------------------------------------------------ 5. malformed JSON and absurd answers


@case("layout-nested-index-json")
def _nested_index(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    src = layout(tmp)
    (src / "index.json").write_bytes(nested_json())
    return Run(["copy", src, tmp / "dest"], mentions=("index.json", "nested"), absent=[tmp / "dest"])


@case("layout-nested-oci-layout")
def _nested_marker(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    src = layout(tmp)
    (src / "oci-layout").write_bytes(nested_json())
    return Run(["copy", src, tmp / "dest"], mentions=("oci-layout", "nested"), absent=[tmp / "dest"])


@case("layout-nested-manifest")
def _nested_manifest(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    deep = bundle.add(nested_json(50_000))
    retop(bundle, lambda doc: doc["manifests"].append(
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": deep, "size": 100_000}))
    return Run(["copy", layout(tmp, bundle), tmp / "dest"], mentions=(deep, "nested"), absent=[tmp / "dest"])


@case("registry-nested-manifest")
def _registry_nested_manifest(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "/manifests/v1", "respond", body=nested_json(),
                               headers={"Content-Type": MT_INDEX}))
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("nested",), absent=[tmp / "dest"])


@case("registry-nested-error-body")
def _nested_error(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "/manifests/v1", "respond", status=404, body=nested_json()))
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("HTTP 404",), absent=[tmp / "dest"])


@case("registry-nested-token-answer")
def _nested_token(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "^/token", "respond", body=nested_json()))
    reg.rules.append(Rule("GET", "/manifests/", "respond", status=401,
                          headers={"WWW-Authenticate": f'Bearer realm="http://{reg.host}/token",service="fake"'}))
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("token endpoint", "nested"),
               absent=[tmp / "dest"])


@case("registry-token-with-a-header-injection")
def _token_crlf(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "^/token", "respond", body=b'{"token": "abc\\r\\nX-Injected: 1"}'))
    reg.rules.append(Rule("GET", "/manifests/", "respond", status=401,
                          headers={"WWW-Authenticate": f'Bearer realm="http://{reg.host}/token",service="fake"'}))
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("not a bearer token",), absent=[tmp / "dest"])


@case("registry-nested-referrers-index")
def _nested_referrers(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    fallback = "sha256-" + bundle.manifest.split(":")[1]
    reg = registry(stack, Rule("HEAD", f"/manifests/{fallback}$", "respond"),
                   Rule("GET", f"/manifests/{fallback}$", "respond", body=nested_json(),
                        headers={"Content-Type": MT_INDEX}), bundle=FakeBundle(layer_size=1024))
    return Run(["copy", layout(tmp, bundle), reg.ref(None, "pushed/bundle"), *STALL], mentions=("nested",))


@case("registry-absurd-content-length")
def _absurd_length(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, Rule("GET", "/manifests/v1", "respond", headers={"Content-Length": str(10**18),
                                                                           "Content-Type": MT_INDEX}))
    return Run(["inspect", reg.ref(), *STALL], mentions=("declares 1000000000000000000 bytes",), max_seconds=10)


@case("registry-blob-longer-than-its-descriptor")
def _absurd_blob(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    reg = registry(stack, blob_rule(bundle.layer, "respond", headers={"Content-Length": str(2**40)}),
                   bundle=bundle)
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("where the descriptor leaves",), max_seconds=10)


@case("registry-redirect-to-a-malformed-url")
def _bad_redirect(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = FakeBundle()
    reg = registry(stack, blob_rule(bundle.layer, "respond", status=307, headers={"Location": "http://[::1/x"}),
                   bundle=bundle)
    return Run(["copy", reg.ref(), tmp / "dest", *STALL], mentions=("not a usable URL",))


@case("source-media-type-with-a-header-injection")
def _media_type_crlf(tmp: Path, stack: contextlib.ExitStack) -> Run:
    bundle = retop(FakeBundle(), lambda doc: doc["manifests"][0].update(
        mediaType="application/vnd.oci.image.manifest.v1+json\r\nX-Injected: 1"))
    reg = registry(stack, bundle=FakeBundle(layer_size=1024))
    return Run(["copy", layout(tmp, bundle), reg.ref(None, "pushed/bundle"), *STALL],
               mentions=("is not a media type",))


@case("bundle-tag-with-path-traversal")
def _tag_traversal(tmp: Path, stack: contextlib.ExitStack) -> Run:
    reg = registry(stack, bundle=FakeBundle(layer_size=1024))
    src = layout(tmp, FakeBundle(tag="../../../v2/other/manifests/latest"))

    def check(_outcome: Outcome) -> None:
        assert not [t for t in reg.tags if "/" in t or t.startswith(".")], reg.tags

    return Run(["copy", src, reg.ref(None, "pushed/bundle"), *STALL], mentions=("not a valid OCI tag",), check=check)


@case("docker-config-nested")
def _nested_docker_config(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    (tmp / "docker").mkdir()
    (tmp / "docker" / "config.json").write_bytes(nested_json())
    return Run(["inspect", "docker://127.0.0.1:9/some/bundle:v1", *STALL], mentions=("config.json", "nested"),
               usage=True)


# ------------------------------------------------------------------------------------------ 6. re-tagging


@case("copy-under-another-tag-is-refused")
def _retag(tmp: Path, _stack: contextlib.ExitStack) -> Run:
    # port 9 (discard): refused before any request, so nothing listens there
    return Run(["copy", layout(tmp), "docker://127.0.0.1:9/models/bundle:v2", *STALL],
               mentions=("'v2'", "'v1'", "rebuild"), usage=True)


# --------------------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_transport_is_refused(name: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        run = CASES[name](tmp_path, stack)
        before = {path: tree_snapshot(path) for path in run.unchanged}
        started = time.monotonic()
        outcome = run_cli(run.args, cwd=tmp_path, env={"DOCKER_CONFIG": str(tmp_path / "docker")})
        seconds = time.monotonic() - started
    if run.succeeds:
        assert outcome.returncode == 0 and "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    else:
        assert_refused(outcome, mentions=run.mentions, usage=run.usage)
    for path, snapshot in before.items():
        assert tree_snapshot(path) == snapshot, f"{path} changed"
    for path in run.absent:
        assert not path.exists(), f"{path} was left behind"
    if run.max_seconds is not None:
        assert seconds < run.max_seconds, f"took {seconds:.1f} s"
    if run.check is not None:
        run.check(outcome)
