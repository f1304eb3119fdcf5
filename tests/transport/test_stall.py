"""A registry that trickles, stalls or never answers: the stall timeout fires, nothing is left behind.

Every fault comes from ``fake_registry`` (an in-memory distribution server on 127.0.0.1 whose slow answers stop
by themselves after 20 s); the client gives up after ``stall_timeout`` (1 s here), so each case takes about a
second, and a client without the timeout would take the fault's full 20 s (or, against a real trickling
server, forever).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sovpack.attest.dsse import generate_key_pair
from sovpack.cli import cli
from sovpack.errors import RegistryError, SovpackError
from sovpack.oci.store import is_bundle_dir
from sovpack.transport import RegistryLayout, RegistryOptions, copy_bundle
from sovpack.transport.reference import Reference
from sovpack.transport.session import StallError
from tests.transport.fake_registry import MT_INDEX, FakeBundle, Rule, fake_registry
from tests.transport.registry_harness import sovpack_env

STALL = RegistryOptions(plain_http=True, stall_timeout=1.0, backoff=0.01, max_backoff=0.05, retries=2)
LAYER = r"/blobs/sha256:"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    try:
        fn(*args, **kwargs)
    except BaseException as e:
        return e, time.monotonic() - started
    return None, time.monotonic() - started


def test_a_trickled_download_stalls_and_a_rerun_resumes(tmp_path: Path) -> None:
    bundle = FakeBundle()
    dest = tmp_path / "pulled"
    rule = Rule("GET", LAYER + bundle.layer.split(":")[1], "trickle", interval=0.3, times=1)
    with fake_registry(rule, bundle=bundle) as reg:
        error, seconds = timed(copy_bundle, reg.ref(), dest, options=STALL)
        assert isinstance(error, StallError), error
        assert "stalled" in str(error) and "--stall-timeout" in str(error)
        assert seconds < 8, seconds
        # the message says exactly what is left: the config landed (the layer had not got anywhere)
        assert f"{dest} keeps 1 verified blob this run added but no index.json" in str(error)
        assert "run the same copy again" in str(error)
        assert not is_bundle_dir(dest)
        done = copy_bundle(reg.ref(), dest, options=STALL)  # the rule fired once: now it answers normally
    assert is_bundle_dir(dest) and done.blobs_skipped == 1 and done.blobs_transferred == done.blobs - 1
    assert not leftovers(dest / "blobs" / "sha256")


def test_a_trickled_manifest_stalls_verify_inspect_and_copy(tmp_path: Path) -> None:
    key = generate_key_pair(tmp_path / "keys").public_key
    with fake_registry(Rule("GET", r"/manifests/", "trickle", interval=0.3)) as reg:
        for args in (["verify", reg.ref(), "--key", str(key)], ["inspect", reg.ref()],
                     ["copy", reg.ref(), str(tmp_path / "out")]):
            started = time.monotonic()
            result = CliRunner().invoke(cli, [*args, "--plain-http", "--stall-timeout", "1"])
            assert time.monotonic() - started < 8
            assert result.exit_code in (1, 2) and "stalled" in result.output, (args, result.output)
        assert not (tmp_path / "out").exists()


def test_a_registry_that_reads_uploads_slowly_or_never_answers_stalls_the_push(tmp_path: Path) -> None:
    bundle = FakeBundle()
    layout = bundle.write_layout(tmp_path / "bundle")
    small = RegistryOptions(plain_http=True, stall_timeout=1.0, chunk_size=64 * 1024, backoff=0.01, retries=2)
    for rule in (Rule("PATCH", r"/blobs/uploads/", "slow-read", interval=0.3),
                 Rule("PUT", r"/blobs/uploads/", "slow-read", interval=0.3),
                 Rule("PUT", r"/manifests/", "hang")):
        with fake_registry(rule, bundle=FakeBundle(tag="other", layer_size=1024)) as reg:  # holds none of ours
            error, seconds = timed(copy_bundle, layout, reg.ref(None, "pushed/bundle"), options=small)
            assert isinstance(error, StallError), (rule.kind, error)
            assert seconds < 8, (rule.kind, seconds)
            assert "v1" not in reg.tags  # the tag goes last: a stalled push never leaves one


def test_staging_is_removed_on_a_stall_and_on_ctrl_c(tmp_path: Path) -> None:
    bundle = FakeBundle()
    out = tmp_path / "out"
    out.mkdir()
    spool = tmp_path / "spool"
    spool.mkdir()
    with fake_registry(Rule("GET", LAYER + bundle.layer.split(":")[1], "trickle", interval=0.3), bundle=bundle) as reg:
        with pytest.raises(StallError):
            copy_bundle(reg.ref(), f"oci-archive:{out / 'b.tar'}", options=STALL)
        assert os.listdir(out) == []  # neither the archive nor the staging directory next to it
        key = generate_key_pair(tmp_path / "keys").public_key
        result = CliRunner().invoke(cli, ["extract", reg.ref(), "-t", "onnx:fp32", "-o", str(tmp_path / "x"),
                                          "--plain-http", "--stall-timeout", "1", "--key", str(key)],
                                    env={"SOVPACK_SPOOL_DIR": str(spool)})
        assert result.exit_code in (1, 2), result.output
        assert os.listdir(spool) == [] and not (tmp_path / "x").exists()

    def interrupt(description: str, _completed: int, _total: int) -> None:
        if description.startswith("blob"):
            raise KeyboardInterrupt

    with fake_registry(bundle=bundle) as reg, pytest.raises(KeyboardInterrupt):
        copy_bundle(reg.ref(), f"oci-archive:{out / 'b.tar'}", options=STALL, progress=interrupt)
    assert os.listdir(out) == []


def test_sigterm_removes_the_staging_directory(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) ends a command that stages a bundle through its clean-up, not around it."""
    bundle = FakeBundle()
    out = tmp_path / "out"
    out.mkdir()
    with fake_registry(Rule("GET", LAYER + bundle.layer.split(":")[1], "trickle", interval=0.2), bundle=bundle) as reg:
        process = subprocess.Popen(
            [sys.executable, "-m", "sovpack", "copy", reg.ref(), f"oci-archive:{out / 'b.tar'}", "--plain-http"],
            env=sovpack_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while not any(p.name.startswith(".sovpack-staging.") for p in out.iterdir()):
                assert time.monotonic() < deadline and process.poll() is None, "no staging directory appeared"
                time.sleep(0.05)
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 128 + signal.SIGTERM
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()
    assert os.listdir(out) == []


def test_absurd_or_hostile_registry_answers_are_refused_cleanly(tmp_path: Path) -> None:
    bundle = FakeBundle()
    nested = b"[" * 100_000 + b"]" * 100_000
    layer = LAYER + bundle.layer.split(":")[1]
    cases: list[tuple[Rule, str | None]] = [
        (Rule("GET", r"/manifests/v1", "respond", headers={"Content-Length": str(10**15), "Content-Type": MT_INDEX}),
         "declares 1000000000000000 bytes"),
        (Rule("GET", r"/manifests/v1", "respond", headers={"Content-Type": MT_INDEX}, body=nested), "nested"),
        (Rule("GET", r"/manifests/v1", "respond", status=500, body=b'{"errors": 5}'), "HTTP 500"),
        (Rule("GET", r"/manifests/v1", "respond", status=404, body=nested), "HTTP 404"),
        (Rule("GET", r"/manifests/v1", "respond", status=401, headers={
            "WWW-Authenticate": 'Bearer realm="http://[::1/token",service="x"'}), "not a usable URL"),
        (Rule("GET", layer, "respond", headers={"Content-Length": str(10**12)}), "the registry sends"),
        (Rule("GET", layer, "respond", status=307, headers={"Location": "http://[::1/x"}), "not a usable URL"),
        (Rule("GET", layer, "respond", status=307, headers={"Location": "file:///etc/passwd"}), "not a usable URL"),
        # a Retry-After that only looks numeric ("²".isdigit() is True) is ignored, and the copy goes on
        (Rule("GET", r"/manifests/v1", "respond", status=429, headers={"Retry-After": "\u00b2"}, times=1), None),
    ]
    for i, (rule, message) in enumerate(cases):
        dest = tmp_path / f"out-{i}"
        with fake_registry(rule, bundle=bundle) as reg:
            if message is None:
                copy_bundle(reg.ref(), dest, options=STALL)
                assert is_bundle_dir(dest)
                continue
            with pytest.raises(SovpackError) as caught:
                copy_bundle(reg.ref(), dest, options=STALL)
        assert message in str(caught.value), (rule, caught.value)
        assert not is_bundle_dir(dest)


def test_bearer_token_answers_are_parsed_defensively(tmp_path: Path) -> None:
    bundle = FakeBundle()
    for answer, message in ((b"[" * 50_000 + b"]" * 50_000, "nested"), (b'{"token": "a\\r\\nX-Evil: 1"}', "bearer"),
                            (b'{"token": 5}', "no token"), (b"\xff\xfe", "UTF-8")):
        token = Rule("GET", r"^/token", "respond", body=answer, headers={"Content-Type": "application/json"})
        with fake_registry(token, bundle=bundle) as reg:
            realm = f"http://{reg.host}/token"
            reg.rules.append(Rule("GET", r"/manifests/", "respond", status=401,
                                  headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'}))
            with pytest.raises(SovpackError, match=message):
                RegistryLayout(Reference.parse(reg.ref()), STALL)
            with pytest.raises(RegistryError, match=message):
                copy_bundle(reg.ref(), tmp_path / "never", options=STALL)
    assert not (tmp_path / "never").exists()


def test_stall_timeout_option_is_on_every_registry_command() -> None:
    for command in ("copy", "verify", "inspect", "extract", "run", "parity"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--stall-timeout" in help_text, command
    bad = CliRunner().invoke(cli, ["copy", "a", "b", "--stall-timeout", "0"])
    assert bad.exit_code == 2
    assert json.loads(json.dumps(RegistryOptions().stall_timeout)) == 60.0
