"""Digests of the artifact files a build writes, known before the blob store takes them, so storing reads nothing.

A file is either hashed as it is written (``HashingWriter``, for writers that stream front to back) or, when a
runtime's own code wrote it (OpenVINO's ``save_model``, llama.cpp's quantizer), hashed on a background thread
while the target's parity run goes on (``hash_later``). Either way the digest is kept against the file's
identity (device, inode, size, mtime), which a rename keeps and any later write changes; ``written_digest``
hands it to the blob store once, ``known_digest`` lets a parity run record it too.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack._io import hashing_copy


class HashingWriter:
    """A file written front to back and hashed as it is written, so storing it needs no second read.

    Writers that stream an artifact (ONNX external data, GGUF) write through it; on ``close`` the digest is
    remembered against the file's identity. There is no ``seek``: a writer that went back to patch bytes would
    make the digest wrong, so it cannot.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed by close(), like the file it stands for)
        self._hasher = hashlib.sha256()
        self._size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self._fh.write(view)
        self._size += len(view)
        return len(view)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.close()
        info = os.stat(self.path)
        done: Future[str | None] = Future()
        done.set_result("sha256:" + self._hasher.hexdigest())
        _remember(info, done)

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class _Known:
    size: int
    mtime_ns: int
    digest: Future[str | None]  # None: the file changed while it was being hashed


_KNOWN: dict[tuple[int, int], _Known] = {}
_KNOWN_LOCK = threading.Lock()
# One thread: a hash is one core's work, and the parity run it hides behind needs the other.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sovpack-hash")


def _remember(info: os.stat_result, digest: Future[str | None]) -> None:
    with _KNOWN_LOCK:
        _KNOWN[(info.st_dev, info.st_ino)] = _Known(info.st_size, info.st_mtime_ns, digest)


def hash_later(path: Path) -> None:
    """Hash ``path`` on the background thread (unless its digest is known already), for the store to take."""
    info = os.stat(path)
    with _KNOWN_LOCK:
        known = _KNOWN.get((info.st_dev, info.st_ino))
    if known is not None and (known.size, known.mtime_ns) == (info.st_size, info.st_mtime_ns):
        return

    def digest() -> str | None:
        with open(path, "rb") as fh:  # the file stays readable through a rename or an unlink
            found, _ = hashing_copy(fh, None)
            after = os.fstat(fh.fileno())
        return found if (after.st_size, after.st_mtime_ns) == (info.st_size, info.st_mtime_ns) else None

    _remember(info, _HASHER.submit(digest))


def _lookup(path: Path, *, take: bool) -> tuple[str, int] | None:
    info = os.stat(path)
    key = (info.st_dev, info.st_ino)
    with _KNOWN_LOCK:
        known = _KNOWN.pop(key, None) if take else _KNOWN.get(key)
    if known is None or (known.size, known.mtime_ns) != (info.st_size, info.st_mtime_ns):
        return None
    try:
        digest = known.digest.result()  # a background hash still under way is waited for
    except OSError:
        return None
    return (digest, info.st_size) if digest is not None else None


def written_digest(path: Path) -> tuple[str, int] | None:
    """(digest, size) of a file hashed as written or in the background, if it is unchanged since; taken once."""
    return _lookup(path, take=True)


def known_digest(path: Path) -> str | None:
    """The digest of a file hashed as written or in the background, if unchanged since (it stays known)."""
    found = _lookup(path, take=False)
    return found[0] if found is not None else None
