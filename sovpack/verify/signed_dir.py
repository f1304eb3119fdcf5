"""A directory ``extract`` wrote, checked against its ``model.sig`` before anything in it is loaded.

``sovpack run DIR --key PUB`` must not run what it has not verified: the model-signing signature is checked
with the trusted keys, then every file it lists is copied into a private directory while being hashed and
compared with the signed digest. Only that private copy is loaded, so a file swapped after the check is never
used; files the signature does not list are left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sovpack._io import check_relative_path, hashing_copy, open_regular, read_capped
from sovpack.attest import oms
from sovpack.attest.dsse import SigstoreBundle, VerifyingKey, verify_bundle_signature
from sovpack.errors import VerificationError
from sovpack.oci.media import MAX_JSON_DOCUMENT


def verified_files(directory: Path, keys: Sequence[VerifyingKey]) -> dict[str, str]:
    """The signed file map of ``DIR/model.sig`` (path -> sha256 hex), if a trusted key signed it."""
    signature = directory / oms.SIGNATURE_FILE
    if not signature.is_file():
        raise VerificationError(f"{directory}: no {oms.SIGNATURE_FILE} to verify (extract it with sovpack extract)")
    bundle = SigstoreBundle.from_bytes(read_capped(signature, MAX_JSON_DOCUMENT))
    verified = verify_bundle_signature(bundle, keys)
    manifest = oms.parse_statement(verified.statement)
    for path in manifest.files:
        check_relative_path(path, str(signature))
    return dict(manifest.files)


@contextlib.contextmanager
def private_verified_copy(directory: Path, keys: Sequence[VerifyingKey]) -> Iterator[Path]:
    """A private temporary copy of the files ``model.sig`` signs, each hashed while copied; removed on exit."""
    files = verified_files(directory, keys)
    tmp = Path(tempfile.mkdtemp(prefix="sovpack-verified-"))
    try:
        for rel, expected in sorted(files.items()):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with open_regular(directory / rel, error=VerificationError) as src, os.fdopen(fd, "wb") as dst:
                digest, _ = hashing_copy(src, dst)
            if digest != f"sha256:{expected}":
                raise VerificationError(
                    f"{directory / rel}: does not match {oms.SIGNATURE_FILE} (sha256 {digest.split(':', 1)[1]}, "
                    f"signed {expected}); refusing to run it"
                )
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["private_verified_copy", "verified_files"]
