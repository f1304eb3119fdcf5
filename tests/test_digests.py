"""sovpack._digests: a file hashed as written or in the background, its digest handed over once, never stale."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from sovpack._digests import HashingWriter, hash_later, known_digest, written_digest


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_digest_is_the_files_own(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    with HashingWriter(path) as out:
        out.write(b"header")
        out.write(np.arange(1000, dtype=np.float16))  # arrays are written as their bytes
        out.write(np.zeros((3, 5), dtype=np.uint8))
        assert out.tell() == 6 + 2000 + 15
    assert written_digest(path) == (_sha256(path), 2021)


def test_digest_is_handed_over_once(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    with HashingWriter(path) as out:
        out.write(b"x" * 100)
    assert written_digest(path) is not None
    assert written_digest(path) is None


def test_digest_follows_a_rename(tmp_path: Path) -> None:
    path = tmp_path / ".data.tmp"
    with HashingWriter(path) as out:
        out.write(b"renamed")
    os.replace(path, tmp_path / "data.bin")
    assert written_digest(tmp_path / "data.bin") == (_sha256(tmp_path / "data.bin"), 7)


def test_a_file_changed_after_close_has_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    with HashingWriter(path) as out:
        out.write(b"before")
    with path.open("ab") as fh:
        fh.write(b" and after")
    assert written_digest(path) is None


def test_a_file_written_otherwise_has_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"plain")
    assert written_digest(path) is None


def test_it_cannot_seek(tmp_path: Path) -> None:
    with HashingWriter(tmp_path / "data.bin") as out, pytest.raises(AttributeError):
        out.seek(0)  # type: ignore[attr-defined]


def test_a_file_hashed_in_the_background_is_stored_without_a_read(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3 * 2**20))
    hash_later(path)
    assert known_digest(path) == _sha256(path)  # waits for the background hash; stays known
    os.replace(path, tmp_path / "stored.bin")
    assert written_digest(tmp_path / "stored.bin") == (_sha256(tmp_path / "stored.bin"), 3 * 2**20)
    assert written_digest(tmp_path / "stored.bin") is None


def test_a_file_changed_after_its_background_hash_has_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first version")
    hash_later(path)
    assert known_digest(path) is not None
    with path.open("ab") as fh:
        fh.write(b", then appended to")
    assert known_digest(path) is None
    assert written_digest(path) is None


def test_a_file_written_while_hashing_is_already_known(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    with HashingWriter(path) as out:
        out.write(b"streamed")
    hash_later(path)  # nothing to do: its digest was taken as it was written
    assert written_digest(path) == (_sha256(path), 8)
