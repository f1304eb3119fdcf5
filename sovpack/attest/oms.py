"""OpenSSF model-signing (OMS) v1.0 signatures of a target's files.

What ``model_signing verify key`` accepts (model-signing 1.x, key-based), and so what sovpack writes:

- a Sigstore bundle v0.3 JSON file (``model.sig``) whose verification material is ``publicKey.hint`` = hex
  sha256 of the signer's SubjectPublicKeyInfo PEM, and whose DSSE envelope (payload type
  ``application/vnd.in-toto+json``) carries one ECDSA signature over the DSSE PAE of the payload;
- the payload is an in-toto Statement v1 with exactly one subject: a name (informative only) and, as its
  sha256, the sha256 over the concatenated *raw* file digests in the order the resources are listed;
- predicate type ``https://model_signing/signature/v1.0``; predicate ``serialization`` = files method,
  sha256, no symlinks, and the paths the verifier must skip (``model.sig`` and git metadata); predicate
  ``resources`` = one ``{name, algorithm, digest}`` per file, path relative to the model directory.

The file digests are the OCI layer digests of the target manifest (one layer per file, sha256), so the same
signature verifies the bundle in place and the directory ``sovpack extract`` writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sovpack.attest.dsse import Statement, Subject
from sovpack.errors import VerificationError

PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SIGNATURE_FILE = "model.sig"
# What the model-signing CLI ignores when it hashes a directory; recorded so its verifier skips them too.
IGNORE_PATHS = (".git", ".gitattributes", ".github", ".gitignore", SIGNATURE_FILE)
HASH_TYPE = "sha256"


def _sort_key(path: str) -> tuple[str, ...]:
    """model-signing orders resources as pure POSIX paths (component-wise), not as plain strings."""
    return PurePosixPath(path).parts


@dataclass(frozen=True, kw_only=True, slots=True)
class OmsManifest:
    """A target's files as model-signing sees them: relative POSIX path -> sha256 hex."""

    model_name: str
    files: Mapping[str, str]

    def resources(self) -> list[dict[str, str]]:
        return [
            {"name": path, "algorithm": HASH_TYPE, "digest": self.files[path]}
            for path in sorted(self.files, key=_sort_key)
        ]

    def root_digest(self) -> str:
        """sha256 over the raw file digests in resource order: the statement subject's digest."""
        hasher = hashlib.sha256()
        for resource in self.resources():
            hasher.update(bytes.fromhex(resource["digest"]))
        return hasher.hexdigest()

    def statement(self) -> Statement:
        predicate = {
            "serialization": {
                "method": "files",
                "hash_type": HASH_TYPE,
                "allow_symlinks": False,
                "ignore_paths": sorted(IGNORE_PATHS),
            },
            "resources": self.resources(),
        }
        subject = Subject(name=self.model_name, digest={"sha256": self.root_digest()})
        return Statement(subjects=(subject,), predicate_type=PREDICATE_TYPE, predicate=predicate)


def parse_statement(statement: Statement) -> OmsManifest:
    """The file map an OMS statement signs, after checking its shape and its root digest."""
    if statement.predicate_type != PREDICATE_TYPE:
        raise VerificationError(f"predicate type is {statement.predicate_type!r}, expected {PREDICATE_TYPE!r}")
    if len(statement.subjects) != 1:
        raise VerificationError(f"a model signature has exactly one subject, found {len(statement.subjects)}")
    predicate: Mapping[str, Any] = statement.predicate
    serialization = predicate.get("serialization")
    if not isinstance(serialization, Mapping) or serialization.get("method") != "files":
        raise VerificationError("model signature: serialization method is not 'files'")
    if serialization.get("hash_type") != HASH_TYPE:
        raise VerificationError(f"model signature: hash type is {serialization.get('hash_type')!r}, expected sha256")
    resources = predicate.get("resources")
    if not isinstance(resources, list) or not resources:
        raise VerificationError("model signature: no resources")
    files: dict[str, str] = {}
    hasher = hashlib.sha256()
    for resource in resources:
        if not isinstance(resource, Mapping) or resource.get("algorithm") != HASH_TYPE:
            raise VerificationError(f"model signature: resource {resource!r} is not a sha256 file digest")
        name, digest = str(resource.get("name", "")), str(resource.get("digest", ""))
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise VerificationError(f"model signature: resource {name!r} has a malformed digest") from None
        if len(raw) != 32 or name in files:
            raise VerificationError(f"model signature: resource {name!r} is malformed or listed twice")
        files[name] = digest.lower()
        hasher.update(raw)
    subject = statement.subjects[0]
    if subject.digest.get("sha256") != hasher.hexdigest():
        raise VerificationError("model signature: the subject digest does not match its resources")
    return OmsManifest(model_name=subject.name, files=files)
