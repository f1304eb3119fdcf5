"""Keys, DSSE and statements: sovpack keygen, real openssl keys, tampering, determinism."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from sovpack.attest.dsse import (
    DsseSignature,
    Envelope,
    SigningKey,
    SigstoreBundle,
    Statement,
    Subject,
    VerifyingKey,
    generate_key_pair,
    load_trusted_keys,
    pae,
    read_password,
    verify_bundle_signature,
)
from sovpack.cli import cli
from sovpack.errors import UsageError, VerificationError

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def statement(name: str = "model") -> Statement:
    return Statement(
        subjects=(Subject(name=name, digest={"sha256": "ab" * 32}),),
        predicate_type="https://example.test/predicate/v1",
        predicate={"answer": 42, "nested": {"b": [1, 2], "a": "ü"}},
    )


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_pae_is_the_dsse_v1_encoding() -> None:
    assert pae("application/vnd.in-toto+json", b"hello") == b"DSSEv1 28 application/vnd.in-toto+json 5 hello"
    assert pae("t", b"") == b"DSSEv1 1 t 0 "


def test_keygen_sign_verify_and_determinism(tmp_path: Path) -> None:
    pair = generate_key_pair(tmp_path / "k")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert pair.private_key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    key = SigningKey.load(pair.private_key)
    public = VerifyingKey.load(pair.public_key)
    assert key.key_id == public.key_id == pair.key_id
    one, two = SigstoreBundle.sign(statement(), key), SigstoreBundle.sign(statement(), key)
    assert one.to_bytes() == two.to_bytes()  # RFC 6979: same key + statement = same bytes
    parsed = SigstoreBundle.from_bytes(one.to_bytes())
    verified = verify_bundle_signature(parsed, [public])
    assert verified.statement == statement() and verified.signer.key_id == public.key_id
    assert json.loads(parsed.envelope.payload) == statement().to_dict()
    with pytest.raises(UsageError, match="exists"):
        generate_key_pair(tmp_path / "k")


def test_tampering_and_wrong_keys_fail(tmp_path: Path) -> None:
    key = SigningKey.load(generate_key_pair(tmp_path / "a").private_key)
    other = VerifyingKey.load(generate_key_pair(tmp_path / "b").public_key)
    bundle = SigstoreBundle.sign(statement(), key)
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        verify_bundle_signature(bundle, [other])
    payload = bundle.envelope.payload.replace(b"42", b"43")
    edited = SigstoreBundle(
        public_key_hint=bundle.public_key_hint,
        envelope=Envelope(payload_type=bundle.envelope.payload_type, payload=payload,
                          signatures=bundle.envelope.signatures),
    )
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        verify_bundle_signature(edited, [key.public])
    retyped = SigstoreBundle(
        public_key_hint=bundle.public_key_hint,
        envelope=Envelope(payload_type="text/plain", payload=bundle.envelope.payload,
                          signatures=bundle.envelope.signatures),
    )
    with pytest.raises(VerificationError, match="not signed by a trusted key"):  # the PAE covers the type
        verify_bundle_signature(retyped, [key.public])
    sig = bytearray(bundle.envelope.signatures[0].sig)
    sig[-1] ^= 1
    broken = SigstoreBundle(
        public_key_hint=bundle.public_key_hint,
        envelope=Envelope(payload_type=bundle.envelope.payload_type, payload=bundle.envelope.payload,
                          signatures=(DsseSignature(keyid="", sig=bytes(sig)),)),
    )
    with pytest.raises(VerificationError):
        verify_bundle_signature(broken, [key.public])
    with pytest.raises(VerificationError, match="malformed JSON"):
        SigstoreBundle.from_bytes(b"{not json")
    with pytest.raises(VerificationError, match="media type"):
        SigstoreBundle.from_bytes(b'{"mediaType": "application/x-other"}')


def test_encrypted_keys_need_their_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "password.txt"
    secret.write_text("correct horse\n")
    pair = generate_key_pair(tmp_path / "k", password=read_password(secret))
    assert pair.encrypted and "ENCRYPTED" in pair.private_key.read_text()
    with pytest.raises(UsageError, match="encrypted; pass its password"):
        SigningKey.load(pair.private_key)
    with pytest.raises(UsageError, match="wrong password"):
        SigningKey.load(pair.private_key, b"wrong")
    assert SigningKey.load(pair.private_key, b"correct horse").key_id == pair.key_id
    monkeypatch.setenv("SOVPACK_TEST_PASSWORD", "correct horse")
    assert read_password(password_env="SOVPACK_TEST_PASSWORD") == b"correct horse"
    with pytest.raises(UsageError, match="not set"):
        read_password(password_env="SOVPACK_TEST_UNSET_VARIABLE")
    with pytest.raises(UsageError, match="not both"):
        read_password(secret, "SOVPACK_TEST_PASSWORD")


@needs_openssl
@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("ecparam-p256", [["ecparam", "-genkey", "-name", "prime256v1", "-out", "key.pem"],
                          ["ec", "-in", "key.pem", "-pubout", "-out", "pub.pem"]]),
        ("genpkey-p256", [["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "key.pem"],
                          ["pkey", "-in", "key.pem", "-pubout", "-out", "pub.pem"]]),
        ("ecparam-p384", [["ecparam", "-genkey", "-name", "secp384r1", "-out", "key.pem"],
                          ["ec", "-in", "key.pem", "-pubout", "-out", "pub.pem"]]),
    ],
)
def test_openssl_keys_work_the_same(tmp_path: Path, name: str, make: list[list[str]]) -> None:
    for args in make:
        openssl(*args, cwd=tmp_path)
    key = SigningKey.load(tmp_path / "key.pem")
    public = VerifyingKey.load(tmp_path / "pub.pem")
    assert key.key_id == public.key_id, name
    verified = verify_bundle_signature(SigstoreBundle.sign(statement(name), key), [public])
    assert verified.statement.subjects[0].name == name


@needs_openssl
def test_openssl_encrypted_key_and_non_ec_keys(tmp_path: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes-256-cbc",
            "-pass", "pass:s3cret", "-out", "enc.pem", cwd=tmp_path)
    with pytest.raises(UsageError, match="encrypted"):
        SigningKey.load(tmp_path / "enc.pem")
    assert SigningKey.load(tmp_path / "enc.pem", b"s3cret").key_id
    openssl("genpkey", "-algorithm", "ed25519", "-out", "ed.pem", cwd=tmp_path)
    with pytest.raises(UsageError, match="not an elliptic-curve private key"):
        SigningKey.load(tmp_path / "ed.pem")
    openssl("pkey", "-in", "ed.pem", "-pubout", "-out", "ed.pub", cwd=tmp_path)
    with pytest.raises(UsageError, match="not an elliptic-curve key"):
        VerifyingKey.load(tmp_path / "ed.pub")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(UsageError, match="not a PEM public key"):
        VerifyingKey.load(tmp_path / "junk.pem")


def test_trusted_keys_are_deduplicated_and_private_keys_refused(tmp_path: Path) -> None:
    pair = generate_key_pair(tmp_path / "k")
    keys = load_trusted_keys([pair.public_key, pair.public_key])
    assert [k.key_id for k in keys] == [pair.key_id]
    with pytest.raises(UsageError, match="is a private key; verification takes the public key"):
        load_trusted_keys([pair.public_key, pair.private_key])


def test_keygen_cli(tmp_path: Path) -> None:
    env = {**os.environ, "KEY_PASSWORD": "hunter2"}
    result = CliRunner(env=env).invoke(cli, ["keygen", "-o", str(tmp_path / "k"), "--password-env", "KEY_PASSWORD",
                                             "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["encrypted"] is True and len(data["key_id"]) == 64
    assert SigningKey.load(data["private_key"], b"hunter2").key_id == data["key_id"]
    again = CliRunner().invoke(cli, ["keygen", "-o", str(tmp_path / "k")])
    assert again.exit_code == 2 and "--force" in again.output
    forced = CliRunner().invoke(cli, ["keygen", "-o", str(tmp_path / "k"), "--force"])
    assert forced.exit_code == 0 and "unencrypted" in forced.output
