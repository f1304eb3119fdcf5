"""Test harness for registry tests: a real Distribution registry on loopback, TLS and auth variants, a token
issuer, and a fault-injecting HTTP proxy. Everything listens on 127.0.0.1 only and is stopped by the fixtures.

The registry is Debian's ``docker-registry`` (Distribution 2.8, ``apt-get install docker-registry``); tests
that need it are skipped when it is missing. Never the system service: each fixture writes its own config
(loopback address, temporary storage) and runs ``docker-registry serve CONFIG`` itself.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")
needs_registry = pytest.mark.skipif(
    REGISTRY_BIN is None, reason="needs Distribution's registry binary (apt-get install -y docker-registry)"
)
needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo (apt-get install -y skopeo)")

TARGETS = ("gguf:q8_0", "onnx:fp32")
CHECKPOINT = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints" / "llama3"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------- the bundle



def serve_on_loopback(
    handle: Callable[[BaseHTTPRequestHandler], None],
) -> tuple[ThreadingHTTPServer, threading.Thread, str]:
    """A threaded HTTP/1.1 server on 127.0.0.1 (a free port) passing every request to ``handle``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            pass

        def handle_one(self) -> None:
            handle(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"127.0.0.1:{server.server_address[1]}"

@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    public_key: Path
    private_key: Path
    verifying: Any
    index_digest: str
    target_digests: dict[str, str]


def build_test_bundle(root: Path) -> BuiltBundle:
    """One small signed bundle (fast targets only) from the committed llama3 fixture."""
    from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
    from sovpack.bundle import build_bundle
    from sovpack.bundle.config import BuildConfig
    from sovpack.targets import TARGETS as KNOWN
    from sovpack.targets import load_targets

    load_targets()
    names = {name for name, _ in KNOWN}
    targets = tuple(t for t in TARGETS if t.split(":")[0] in names)
    if not targets:
        pytest.skip("no fast target format (gguf or onnx) is installed")
    pair = generate_key_pair(root / "keys")
    config = BuildConfig(checkpoint=CHECKPOINT, output=root / "bundle", targets=targets, tag="v1")
    result = build_bundle(config, key=SigningKey.load(pair.private_key))
    return BuiltBundle(
        path=result.output,
        public_key=pair.public_key,
        private_key=pair.private_key,
        verifying=VerifyingKey.load(pair.public_key),
        index_digest=result.index_digest,
        target_digests={t.target: t.manifest_digest for t in result.targets},
    )


# ------------------------------------------------------------------------------------- TLS and auth


@dataclass(frozen=True)
class LocalCA:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_ca(directory: Path) -> LocalCA:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (cryptography package)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sovpack test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = LocalCA(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def bcrypt_hash(password: str) -> str:
    """bcrypt via the C library's crypt(3) (libxcrypt, part of every Debian system): no Python dependency."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        pytest.skip("no libcrypt for bcrypt htpasswd entries")
    lib = ctypes.CDLL(name)
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    salt = "".join(secrets.choice(alphabet) for _ in range(21)) + "."  # 22 chars; the last carries 2 bits
    result = lib.crypt(password.encode(), f"$2b$05${salt}".encode())
    if not result or not result.startswith(b"$2b$"):
        pytest.skip("the C library's crypt(3) has no bcrypt")
    return str(result.decode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """A tiny Docker-token-spec issuer: Basic-authenticates the user and signs an ES256 JWT with an x5c chain
    (the self-signed certificate the registry trusts via ``rootcertbundle``). Records every request."""

    service = "sovpack-test-registry"
    issuer = "sovpack-test-issuer"

    def __init__(self, directory: Path, username: str, password: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.username, self.password = username, password
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sovpack test token issuer")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = directory / "token-issuer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
        self.requests: list[dict[str, Any]] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        auth = handler.headers.get("Authorization", "")
        user = None
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if (name, password) == (self.username, self.password):
                user = name
        scopes = query.get("scope", [])
        self.requests.append({"user": user, "scopes": scopes, "service": query.get("service", [None])[0]})
        if user is None:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
            handler.send_response(401)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        token = self.sign({"iss": self.issuer, "sub": user, "aud": self.service, "exp": int(time.time()) + 600,
                           "nbf": int(time.time()) - 10, "iat": int(time.time()), "jti": secrets.token_hex(8),
                           "access": access})
        body = json.dumps({"token": token, "expires_in": 600}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------ registry


@dataclass
class Registry:
    """A running ``docker-registry serve`` on 127.0.0.1:port with its own storage directory."""

    host: str
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path
    tls: LocalCA | None = None

    def ref(self, repository: str, tag: str = "v1") -> str:
        return f"docker://{self.host}/{repository}:{tag}"

    def blob_data(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (for tampering tests)."""
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_registry(directory: Path, *, tls: LocalCA | None = None, htpasswd: Path | None = None,
                   token: TokenIssuer | None = None) -> Registry:
    """Write a loopback-only config and start the registry; waits until it accepts connections."""
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    storage = directory / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls.server_cert}", f"    key: {tls.server_key}"]
    if htpasswd is not None:
        lines += ["auth:", "  htpasswd:", "    realm: sovpack-test", f"    path: {htpasswd}"]
    if token is not None:
        lines += ["auth:", "  token:", f"    realm: {token.realm}", f"    service: {token.service}",
                  f"    issuer: {token.issuer}", f"    rootcertbundle: {token.cert_path}"]
    config = directory / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log = directory / "registry.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    registry = Registry(host=f"127.0.0.1:{port}", storage=storage, process=process, log=log, tls=tls)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return registry
        time.sleep(0.05)
    registry.stop()
    raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def running_registry(directory: Path, **kwargs: Any) -> Iterator[Registry]:
    registry = start_registry(directory, **kwargs)
    try:
        yield registry
    finally:
        registry.stop()


# --------------------------------------------------------------------------------------------- proxy


@dataclass
class Fault:
    """Apply ``kind`` to matching requests: skip the first ``skip`` matches, then hit ``times`` of them.

    kinds: ``status`` (answer ``status`` without forwarding), ``drop-request`` (read the request, close the
    connection, forward nothing), ``truncate-request`` (forward half the body upstream, then close both),
    ``drop-response`` (forward, send half the response body, close), ``corrupt`` (flip a byte of the body).
    """

    method: str
    path: str  # regex searched in the request path
    kind: str
    times: int = 1
    skip: int = 0
    status: int = 500
    seen: int = 0
    used: int = 0

    def take(self, method: str, path: str) -> bool:
        if method != self.method or not re.search(self.path, path):
            return False
        self.seen += 1
        if self.seen > self.skip and self.used < self.times:
            self.used += 1
            return True
        return False


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class FaultProxy:
    """An HTTP proxy on loopback in front of a plain-HTTP registry, injecting faults (see ``Fault``)."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    delay: float = 0.0  # seconds slept per 64 KiB piece of a blob download
    referrers_api: bool = False  # pretend to be an OCI 1.1 registry: answer GET .../referrers/<digest> (empty)
    log: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.server, self.thread, self.host = serve_on_loopback(self._handle)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def ref(self, repository: str, tag: str = "v1") -> str:
        return f"docker://{self.host}/{repository}:{tag}"

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.take(method, path):
                    return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self.referrers_api and h.command == "GET" and re.search(r"^/v2/.+/referrers/sha256:[0-9a-f]{64}$", h.path):
            self._record(h.command, h.path, 200)
            empty = b'{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}'
            h.send_response(200)
            h.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
            h.send_header("Content-Length", str(len(empty)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(empty)
            return
        fault = self._fault(h.command, h.path)
        if fault is not None and fault.kind == "status":
            self._record(h.command, h.path, fault.status)
            h.send_response(fault.status)
            if fault.status == 429:
                h.send_header("Retry-After", "0")
            h.send_header("Content-Length", "0")
            h.send_header("Connection", "close")
            h.end_headers()
            return
        if fault is not None and fault.kind == "drop-request":
            self._record(h.command, h.path, -1)
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        host, port = self.upstream.rsplit(":", 1)
        if fault is not None and fault.kind == "truncate-request":
            self._record(h.command, h.path, -2)
            with socket.create_connection((host, int(port)), timeout=10) as upstream_socket:
                head = f"{h.command} {h.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                upstream_socket.sendall(head.encode() + b"\r\n" + body[: len(body) // 2])
                time.sleep(0.2)
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        upstream = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            send_body = body if (length or "Content-Length" in h.headers) else None
            upstream.request(h.command, h.path, body=send_body, headers=headers)
            response = upstream.getresponse()
            self._record(h.command, h.path, response.status)
            out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            declared = response.getheader("Content-Length")
            if h.command == "HEAD":
                data = b""
            elif declared is None:
                data = response.read()
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                out_headers.append(("Content-Length", str(len(data))))
            else:
                data = None  # stream below
            h.send_response_only(response.status)
            for k, v in out_headers:
                h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            if data is not None:
                h.wfile.write(data)
                return
            total = int(declared or 0)
            sent = 0
            is_blob = "/blobs/sha256:" in h.path
            while True:
                piece = response.read(64 * 1024)
                if not piece:
                    break
                if fault is not None and fault.kind == "corrupt" and sent == 0:
                    piece = bytes([piece[0] ^ 0x01]) + piece[1:]
                if fault is not None and fault.kind == "drop-response" and sent + len(piece) >= total // 2:
                    h.wfile.write(piece[: max(total // 2 - sent, 1)])
                    h.wfile.flush()
                    with contextlib.suppress(OSError):
                        h.connection.shutdown(socket.SHUT_RDWR)
                    return
                h.wfile.write(piece)
                sent += len(piece)
                if is_blob and self.delay:
                    time.sleep(self.delay)
        except (OSError, http.client.HTTPException):
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
        finally:
            upstream.close()

    def count(self, method: str, pattern: str) -> int:
        with self.lock:
            return sum(1 for m, p, _s in self.log if m == method and re.search(pattern, p))


@contextlib.contextmanager
def fault_proxy(registry: Registry, *faults: Fault, delay: float = 0.0, referrers_api: bool = False
                ) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream=registry.host, faults=list(faults), delay=delay, referrers_api=referrers_api)
    try:
        yield proxy
    finally:
        proxy.close()


def https_ready(registry: Registry) -> None:
    """For TLS registries: one handshake with the CA, so a misconfigured certificate fails loudly here."""
    if registry.tls is None:
        return
    context = ssl.create_default_context(cafile=str(registry.tls.ca_cert))
    host, port = registry.host.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    try:
        conn.request("GET", "/v2/")
        conn.getresponse().read()
    finally:
        conn.close()


def sovpack_env(**extra: str) -> dict[str, str]:
    """The environment for a ``sovpack`` subprocess: no inherited registry credentials or docker config."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOVPACK_REGISTRY_USERNAME", "SOVPACK_REGISTRY_PASSWORD", "DOCKER_CONFIG")}
    env.update(extra)
    return env
