"""The blob store takes a file a HashingWriter wrote without reading it again, and hashes any other."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import sovpack.oci.store as store_module
from sovpack._digests import HashingWriter
from sovpack.oci.store import BlobStore


def _refuse_reads(*_args: object) -> tuple[str, int]:
    raise AssertionError("the file was read again")


def test_a_hashed_file_moves_in_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "artifact.bin"
    with HashingWriter(path) as out:
        out.write(b"weights" * 1000)
    expected = "sha256:" + hashlib.sha256(b"weights" * 1000).hexdigest()
    store = BlobStore(tmp_path / "layout")
    monkeypatch.setattr(store_module, "hashing_copy", _refuse_reads)
    assert store.move_file(path) == (expected, 7000)
    assert store.path(expected).read_bytes() == b"weights" * 1000
    assert not path.exists()


def test_a_file_changed_after_writing_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "artifact.bin"
    with HashingWriter(path) as out:
        out.write(b"weights")
    with path.open("ab") as fh:
        fh.write(b", then edited")
    digest, size = BlobStore(tmp_path / "layout").move_file(path)
    assert (digest, size) == ("sha256:" + hashlib.sha256(b"weights, then edited").hexdigest(), 20)
