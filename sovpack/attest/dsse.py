"""Keys, DSSE envelopes and in-toto statements, for offline key-based signing of bundles.

Everything sovpack signs is an in-toto Statement v1, serialized as canonical JSON (sorted keys, no
whitespace), wrapped in a DSSE envelope and stored as a Sigstore bundle v0.3 (JSON) whose verification
material is a public-key hint: the hex sha256 of the signer's SubjectPublicKeyInfo PEM. That hint is also
what OpenSSF model-signing checks, so one format serves sovpack and ``model_signing verify key``.

Keys are local PEM files: ECDSA on P-256 (what ``sovpack keygen`` and ``openssl ecparam -name prime256v1``
make), P-384 or P-521; the hash follows the curve size as model-signing expects. Signatures use RFC 6979
deterministic nonces, so the same key over the same statement gives the same bytes: bundles stay
reproducible end to end.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack._io import parse_json, read_capped
from sovpack.errors import UsageError, VerificationError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
SIGSTORE_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
PRIVATE_KEY_FILE = "private.pem"
PUBLIC_KEY_FILE = "public.pem"
MAX_KEY_BYTES = 64 * 1024  # PEM keys and password files are a few hundred bytes


def canonical_json(data: Any) -> bytes:
    """Compact, sorted-key UTF-8 JSON: the exact bytes that get hashed or signed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def pretty_json(data: Any) -> bytes:
    """Sorted-key, indented JSON with a trailing newline: deterministic and readable."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------- keys


def _hash_for_curve(curve_name: str, key_size: int) -> Any:
    """The hash model-signing pairs with each curve (by key size), so its verifier agrees with ours."""
    from cryptography.hazmat.primitives import hashes

    if curve_name not in SUPPORTED_CURVES:
        raise UsageError(f"unsupported elliptic curve {curve_name!r}; use one of {', '.join(SUPPORTED_CURVES)}")
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key_size]


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        public_key.public_bytes(
            encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyingKey:
    """A trusted public key; ``key_id`` is the hex sha256 of its SubjectPublicKeyInfo PEM."""

    key_id: str
    pem: bytes
    source: str  # where it came from, for messages

    @classmethod
    def from_pem(cls, pem: bytes, source: str) -> VerifyingKey:
        """Read a public key. A private key is refused: trust is configured with public keys only, and a
        private key lying where a deploy site keeps its trust roots is a leak to fix, not a key to use."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if b"PRIVATE KEY-----" in pem:
            raise UsageError(
                f"{source}: is a private key; verification takes the public key (sovpack keygen writes public.pem; "
                "`openssl ec -in KEY -pubout` derives it)"
            )
        try:
            key: Any = serialization.load_pem_public_key(pem)
        except ValueError as e:
            raise UsageError(f"{source}: not a PEM public key ({e})") from e
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise UsageError(f"{source}: not an elliptic-curve key (sovpack signs with ECDSA P-256/P-384/P-521)")
        _hash_for_curve(key.curve.name, key.curve.key_size)
        canonical = _public_pem(key)
        return cls(key_id=hashlib.sha256(canonical).hexdigest(), pem=canonical, source=source)

    @classmethod
    def load(cls, path: str | Path) -> VerifyingKey:
        path = Path(path)
        return cls.from_pem(read_capped(path, MAX_KEY_BYTES, error=UsageError), str(path))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` (DER ECDSA) is this key's signature over ``message``."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key: Any = serialization.load_pem_public_key(self.pem)
        try:
            key.verify(signature, message, ec.ECDSA(_hash_for_curve(key.curve.name, key.curve.key_size)))
        except InvalidSignature:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "source": self.source}


class SigningKey:
    """A private ECDSA key loaded from PEM (PKCS#8 or SEC1, optionally encrypted)."""

    def __init__(self, private_key: Any, source: str) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise UsageError(f"{source}: not an elliptic-curve private key (sovpack signs with ECDSA)")
        self._key = private_key
        self._hash = _hash_for_curve(private_key.curve.name, private_key.curve.key_size)
        self.source = source
        self.public = VerifyingKey.from_pem(_public_pem(private_key.public_key()), f"{source} (public part)")

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def load(cls, path: str | Path, password: bytes | None = None) -> SigningKey:
        """Load a PEM private key; a missing or wrong password is a UsageError naming the file."""
        from cryptography.hazmat.primitives import serialization

        path = Path(path)
        data = read_capped(path, MAX_KEY_BYTES, error=UsageError)
        try:
            key = serialization.load_pem_private_key(data, password)
        except TypeError as e:
            if password is None:
                raise UsageError(
                    f"{path}: the private key is encrypted; pass its password (--password-file or --password-env)"
                ) from e
            raise UsageError(f"{path}: the key is not encrypted, but a password was given") from e
        except ValueError as e:
            hint = " (wrong password?)" if password is not None else ""
            raise UsageError(f"{path}: cannot load the private key{hint}: {e}") from e
        return cls(key, str(path))

    def sign(self, message: bytes) -> bytes:
        """A deterministic (RFC 6979) DER ECDSA signature over ``message``."""
        from cryptography.hazmat.primitives.asymmetric import ec

        return bytes(self._key.sign(message, ec.ECDSA(self._hash, deterministic_signing=True)))


def read_password(password_file: str | Path | None = None, password_env: str | None = None) -> bytes | None:
    """The key password from a file (one trailing newline stripped) or an environment variable, or None."""
    if password_file is not None and password_env is not None:
        raise UsageError("give the key password either as a file or as an environment variable, not both")
    if password_file is not None:
        path = Path(password_file)
        data = read_capped(path, MAX_KEY_BYTES, error=UsageError)
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        if not data:
            raise UsageError(f"{path}: the password file is empty")
        return data
    if password_env is not None:
        value = os.environ.get(password_env)
        if not value:
            raise UsageError(f"environment variable {password_env} is not set or empty")
        return value.encode("utf-8")
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyPair:
    """Where ``sovpack keygen`` wrote a key pair."""

    private_key: Path
    public_key: Path
    key_id: str
    encrypted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "private_key": str(self.private_key),
            "public_key": str(self.public_key),
            "key_id": self.key_id,
            "encrypted": self.encrypted,
        }


def generate_key_pair(out_dir: str | Path, *, password: bytes | None = None, force: bool = False) -> KeyPair:
    """Write a new ECDSA P-256 key pair as PEM: private.pem (PKCS#8, mode 0600) and public.pem."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sovpack._io import atomic_write_bytes

    out = Path(out_dir)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path}: exists (pass --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: Any = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=encryption
    )
    out.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the temporary file is created 0600 already; keep it so
    try:
        atomic_write_bytes(private_path, private_pem)
    finally:
        os.umask(old_umask)
    os.chmod(private_path, 0o600)
    public_pem = _public_pem(key.public_key())
    atomic_write_bytes(public_path, public_pem)
    os.chmod(public_path, 0o644)
    return KeyPair(
        private_key=private_path,
        public_key=public_path,
        key_id=hashlib.sha256(public_pem).hexdigest(),
        encrypted=password is not None,
    )


def load_trusted_keys(paths: Sequence[str | Path]) -> tuple[VerifyingKey, ...]:
    """Public keys to trust, deduplicated by key id, in the order given."""
    keys: dict[str, VerifyingKey] = {}
    for path in paths:
        key = VerifyingKey.load(path)
        keys.setdefault(key.key_id, key)
    return tuple(keys.values())


# ------------------------------------------------------------------------------------------ statements


@dataclass(frozen=True, kw_only=True, slots=True)
class Subject:
    """An in-toto ResourceDescriptor used as a statement subject: a name and its digests."""

    name: str
    digest: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": dict(self.digest)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Subject:
        digest = data.get("digest")
        if not isinstance(digest, Mapping) or not all(isinstance(v, str) for v in digest.values()):
            raise VerificationError("statement subject has no digest map")
        return cls(name=str(data.get("name", "")), digest=dict(digest))


@dataclass(frozen=True, kw_only=True, slots=True)
class Statement:
    """An in-toto Statement v1: what is attested (subjects) and the typed predicate."""

    subjects: tuple[Subject, ...]
    predicate_type: str
    predicate: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": STATEMENT_TYPE,
            "subject": [s.to_dict() for s in self.subjects],
            "predicateType": self.predicate_type,
            "predicate": dict(self.predicate),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Statement:
        if not isinstance(data, Mapping):
            raise VerificationError("the signed payload is not a JSON object")
        if data.get("_type") != STATEMENT_TYPE:
            raise VerificationError(
                f"the signed payload is not an in-toto {STATEMENT_TYPE} (got {data.get('_type')!r})"
            )
        subjects = data.get("subject")
        if not isinstance(subjects, list) or not subjects:
            raise VerificationError("the statement has no subjects")
        predicate = data.get("predicate")
        if not isinstance(predicate, Mapping):
            raise VerificationError("the statement has no predicate object")
        predicate_type = data.get("predicateType")
        if not isinstance(predicate_type, str):
            raise VerificationError("the statement has no predicateType")
        return cls(
            subjects=tuple(Subject.from_dict(s) for s in subjects if isinstance(s, Mapping)),
            predicate_type=predicate_type,
            predicate=dict(predicate),
        )

    def payload(self) -> bytes:
        """The bytes that get signed: canonical JSON of the statement."""
        return canonical_json(self.to_dict())


# ----------------------------------------------------------------------------------------------- DSSE


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers (type and body, unambiguous)."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


@dataclass(frozen=True, kw_only=True, slots=True)
class DsseSignature:
    keyid: str
    sig: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode("ascii")}


@dataclass(frozen=True, kw_only=True, slots=True)
class Envelope:
    """A DSSE envelope: a typed payload and signatures over its PAE encoding."""

    payload_type: str
    payload: bytes
    signatures: tuple[DsseSignature, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [s.to_dict() for s in self.signatures],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Envelope:
        if not isinstance(data, Mapping):
            raise VerificationError("no DSSE envelope")
        try:
            payload = base64.b64decode(str(data["payload"]), validate=True)
            signatures = tuple(
                DsseSignature(keyid=str(s.get("keyid", "")), sig=base64.b64decode(str(s["sig"]), validate=True))
                for s in data["signatures"]
            )
        except (KeyError, TypeError, AttributeError, binascii.Error) as e:
            raise VerificationError(f"malformed DSSE envelope: {e}") from e
        if not signatures:
            raise VerificationError("the DSSE envelope carries no signature")
        return cls(payload_type=str(data.get("payloadType", "")), payload=payload, signatures=signatures)

    def statement(self) -> Statement:
        if self.payload_type != IN_TOTO_PAYLOAD_TYPE:
            raise VerificationError(f"DSSE payload type is {self.payload_type!r}, expected {IN_TOTO_PAYLOAD_TYPE!r}")
        return Statement.from_dict(parse_json(self.payload, "the DSSE payload", error=VerificationError))


def sign_statement(statement: Statement, key: SigningKey) -> Envelope:
    """Sign a statement into a DSSE envelope with one signature."""
    payload = statement.payload()
    signature = key.sign(pae(IN_TOTO_PAYLOAD_TYPE, payload))
    return Envelope(
        payload_type=IN_TOTO_PAYLOAD_TYPE,
        payload=payload,
        signatures=(DsseSignature(keyid=key.key_id, sig=signature),),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class SigstoreBundle:
    """A Sigstore bundle v0.3 holding a DSSE envelope and a public-key hint (no transparency log: offline)."""

    public_key_hint: str
    envelope: Envelope
    media_type: str = SIGSTORE_BUNDLE_MEDIA_TYPE
    tlog_entries: tuple[Any, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "verificationMaterial": {"publicKey": {"hint": self.public_key_hint}, "tlogEntries": []},
            "dsseEnvelope": self.envelope.to_dict(),
        }

    def to_bytes(self) -> bytes:
        return pretty_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> SigstoreBundle:
        doc = parse_json(data, "Sigstore bundle", error=VerificationError)
        if not isinstance(doc, Mapping):
            raise VerificationError("not a Sigstore bundle (not a JSON object)")
        if doc.get("mediaType") != SIGSTORE_BUNDLE_MEDIA_TYPE:
            raise VerificationError(
                f"Sigstore bundle media type is {doc.get('mediaType')!r}, expected {SIGSTORE_BUNDLE_MEDIA_TYPE!r}"
            )
        material = doc.get("verificationMaterial")
        hint = material.get("publicKey", {}).get("hint") if isinstance(material, Mapping) else None
        return cls(
            public_key_hint=str(hint or ""),
            envelope=Envelope.from_dict(doc.get("dsseEnvelope")),
            media_type=str(doc["mediaType"]),
        )

    @classmethod
    def sign(cls, statement: Statement, key: SigningKey) -> SigstoreBundle:
        return cls(public_key_hint=key.key_id, envelope=sign_statement(statement, key))


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedStatement:
    """A statement whose envelope signature checked out against ``signer``."""

    statement: Statement
    signer: VerifyingKey


def verify_bundle_signature(bundle: SigstoreBundle, trusted: Sequence[VerifyingKey]) -> VerifiedStatement:
    """Check the DSSE signature with the trusted keys (the hinted one first); the signed statement or an error."""
    if not trusted:
        raise VerificationError("no trusted public key given")
    envelope = bundle.envelope
    message = pae(envelope.payload_type, envelope.payload)
    ordered = sorted(trusted, key=lambda k: k.key_id != bundle.public_key_hint)
    for key in ordered:
        if any(key.verify(sig.sig, message) for sig in envelope.signatures):
            return VerifiedStatement(statement=envelope.statement(), signer=key)
    claimed = bundle.public_key_hint[:16] or "unknown"
    known = ", ".join(k.key_id[:16] for k in trusted)
    raise VerificationError(f"not signed by a trusted key (signature claims key {claimed}…; trusted: {known})")
