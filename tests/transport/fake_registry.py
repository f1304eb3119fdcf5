"""A misbehaving OCI registry for tests: a tiny in-memory distribution server on 127.0.0.1 with per-request faults.

Real registries are tested against Distribution (``registry_harness``); this one exists to be hostile in ways a
proxy cannot: trickle a body one byte at a time, read an upload one byte at a time, never answer, answer with
absurd headers, deeply nested JSON bodies or odd token answers. Every fault is bounded: after ``seconds`` it
closes the connection by itself, so a client without a stall timeout would hang for that long, never forever.

``FakeBundle`` is a small unsigned OCI "bundle" (bundle index -> one manifest -> config + layer) that the fake
registry serves and that can be written as a layout directory or an oci-archive tar.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.transport.registry_harness import serve_on_loopback

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class FakeBundle:
    """Bundle index (tagged) -> an image manifest (config + layer) and a referrer of it (an attestation-like
    manifest whose ``subject`` is the first); all bytes in memory. Unsigned: ``copy`` moves it, ``verify``
    would refuse it."""

    tag: str = "v1"
    layer_size: int = 256 * 1024
    blobs: dict[str, bytes] = field(default_factory=dict)  # every blob and manifest by digest
    media: dict[str, str] = field(default_factory=dict)  # manifest digest -> media type
    top: str = ""
    manifest: str = ""
    referrer: str = ""
    layer: str = ""

    def __post_init__(self) -> None:
        config = b'{"note":"fake bundle for transport tests"}'
        layer = hashlib.sha256(b"seed").digest() * (self.layer_size // 32)
        self.layer = self.add(layer)
        manifest = canonical({
            "schemaVersion": 2, "mediaType": MT_MANIFEST, "artifactType": "application/vnd.test.fake+json",
            "config": {"mediaType": "application/vnd.test.config+json", "digest": self.add(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/octet-stream", "digest": self.layer, "size": len(layer)}],
        })
        self.manifest = self.add(manifest, MT_MANIFEST)
        note = b'{"attests":"the fake manifest"}'
        empty = b"{}"
        referrer = canonical({
            "schemaVersion": 2, "mediaType": MT_MANIFEST, "artifactType": "application/vnd.test.note+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": self.add(empty), "size": 2},
            "layers": [{"mediaType": "application/vnd.test.note+json", "digest": self.add(note), "size": len(note)}],
            "subject": {"mediaType": MT_MANIFEST, "digest": self.manifest, "size": len(manifest)},
        })
        self.referrer = self.add(referrer, MT_MANIFEST)
        index = canonical({
            "schemaVersion": 2, "mediaType": MT_INDEX, "annotations": {REF_NAME: self.tag},
            "manifests": [{"mediaType": MT_MANIFEST, "digest": self.manifest, "size": len(manifest)},
                          {"mediaType": MT_MANIFEST, "digest": self.referrer, "size": len(referrer)}],
        })
        self.top = self.add(index, MT_INDEX)

    def add(self, data: bytes, media_type: str | None = None) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        if media_type is not None:
            self.media[digest] = media_type
        return digest

    def index_json(self, tag: str | None = None) -> bytes:
        entry: dict[str, Any] = {"mediaType": MT_INDEX, "digest": self.top, "size": len(self.blobs[self.top])}
        entry["annotations"] = {REF_NAME: tag or self.tag}
        return canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [entry]})

    def write_layout(self, root: Path) -> Path:
        (root / "blobs" / "sha256").mkdir(parents=True)
        for digest, data in self.blobs.items():
            (root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        (root / "oci-layout").write_bytes(b'{"imageLayoutVersion":"1.0.0"}')
        (root / "index.json").write_bytes(self.index_json())
        return root

    def members(self) -> list[tuple[str, bytes]]:
        """(name, data) of an oci-archive of this bundle, in the order sovpack writes them."""
        items = [(f"blobs/sha256/{d.split(':')[1]}", data) for d, data in sorted(self.blobs.items())]
        return [*items, ("index.json", self.index_json()), ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]

    def write_archive(self, path: Path, extra: list[tarfile.TarInfo | tuple[str, bytes]] | None = None) -> Path:
        """A plain tar of this bundle; ``extra`` members (TarInfo without data, or (name, data)) go first."""
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for item in extra or []:
                if isinstance(item, tarfile.TarInfo):
                    tar.addfile(item)
                else:
                    add_member(tar, *item)
            for name, data in self.members():
                add_member(tar, name, data)
        return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ faults


@dataclass
class Rule:
    """What to do with matching requests. ``kind``:

    - ``trickle``: answer as usual (or with ``body``), but send the body one byte every ``interval`` seconds;
    - ``slow-read``: read the request body one byte every ``interval`` seconds, never answer;
    - ``hang``: read the request, never answer;
    - ``respond``: answer ``status`` with ``headers`` and ``body`` (``body`` may be any bytes).

    ``trickle``/``slow-read``/``hang`` give up after ``seconds`` and close the connection.
    """

    method: str
    path: str  # regex searched in the request path
    kind: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    interval: float = 0.5
    seconds: float = 20.0
    times: int = 1_000_000
    used: int = 0

    def matches(self, method: str, path: str) -> bool:
        if method == self.method and re.search(self.path, path) and self.used < self.times:
            self.used += 1
            return True
        return False


class FakeRegistry:
    """An in-memory OCI distribution server on 127.0.0.1 (plain HTTP) serving ``bundle`` under ``repository``."""

    def __init__(self, bundle: FakeBundle | None = None, repository: str = "fake/bundle",
                 rules: list[Rule] | None = None) -> None:
        self.bundle = bundle or FakeBundle()
        self.repository = repository
        self.rules = list(rules or [])
        self.blobs: dict[str, bytes] = dict(self.bundle.blobs)
        self.tags: dict[str, str] = {self.bundle.tag: self.bundle.top}
        self.uploads: dict[str, bytearray] = {}
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server, self.thread, self.host = serve_on_loopback(self._handle)

    def ref(self, tag: str | None = "v1", repository: str | None = None) -> str:
        return f"docker://{self.host}/{repository or self.repository}" + (f":{tag}" if tag else "")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------ serving

    def _rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.log.append((method, path))
            return next((rule for rule in self.rules if rule.matches(method, path)), None)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        rule = self._rule(h.command, h.path)
        if rule is not None and rule.kind in ("slow-read", "hang"):
            self._stall(h, rule)
            return
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if rule is not None and rule.kind == "respond":
            self._send(h, rule.status, rule.body or b"", rule.headers)
            return
        status, headers, data = self._answer(h.command, h.path, body)
        if rule is not None and rule.kind == "trickle":
            if rule.body is not None:  # the rule's own answer, trickled
                status, data = rule.status, rule.body
            headers = {**headers, "Content-Length": str(len(data)), **rule.headers}
            self._send(h, status, b"", headers, length=len(data))
            deadline = time.monotonic() + rule.seconds
            with contextlib.suppress(OSError):
                for byte in data:
                    if time.monotonic() > deadline:
                        break
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
                    time.sleep(rule.interval)
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, status, b"" if h.command == "HEAD" else data, headers, length=len(data))

    def _stall(self, h: BaseHTTPRequestHandler, rule: Rule) -> None:
        deadline = time.monotonic() + rule.seconds
        with contextlib.suppress(OSError):
            h.connection.settimeout(rule.seconds)
            while time.monotonic() < deadline:
                if rule.kind == "slow-read" and not h.rfile.read(1):
                    break
                time.sleep(rule.interval)
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
              length: int | None = None) -> None:
        with contextlib.suppress(OSError):
            h.send_response_only(status)
            sent = {k.lower() for k in headers}
            for key, value in headers.items():
                h.send_header(key, value)
            if "content-length" not in sent:
                h.send_header("Content-Length", str(len(data) if length is None else length))
            h.send_header("Connection", "close")
            h.end_headers()
            if data:
                h.wfile.write(data)

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """What a well-behaved registry would answer (status, headers, body)."""
        url = path.split("?", 1)
        route, query = url[0], url[1] if len(url) > 1 else ""
        if route == "/v2/":
            return 200, {}, b"{}"
        match = re.match(r"^/v2/(.+?)/(manifests|blobs|referrers)/(.+)$", route)
        if not match:
            return 404, {}, b'{"errors":[{"code":"NOT_FOUND","message":"no route"}]}'
        _repo, kind, rest = match.groups()
        if kind == "referrers":
            return 404, {}, b""
        if kind == "manifests":
            if method == "PUT":
                digest = self._store(body)
                if not rest.startswith("sha256:"):
                    self.tags[rest] = digest
                return 201, {"Docker-Content-Digest": digest}, b""
            digest = self.tags.get(rest, rest)
            data = self.blobs.get(digest)
            if data is None:
                return 404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}'
            media = json.loads(data).get("mediaType", MT_MANIFEST)
            return 200, {"Content-Type": media, "Docker-Content-Digest": digest}, data
        if rest.startswith("uploads/"):
            return self._upload(method, rest[len("uploads/"):], query, body)
        data = self.blobs.get(rest)
        if data is None:
            return 404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}'
        return 200, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": rest}, data

    def _store(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def _upload(self, method: str, session: str, query: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        base = f"/v2/{self.repository}/blobs/uploads/"
        if method == "POST":
            key = uuid.uuid4().hex
            self.uploads[key] = bytearray()
            return 202, {"Location": base + key, "Range": "0-0"}, b""
        data = self.uploads.setdefault(session, bytearray())
        data.extend(body)
        if method == "PATCH":
            return 202, {"Location": base + session, "Range": f"0-{max(len(data) - 1, 0)}"}, b""
        if method == "PUT":
            digest = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("digest", "").replace("%3A", ":")
            if digest_of(bytes(data)) != digest:
                return 400, {}, b'{"errors":[{"code":"DIGEST_INVALID","message":"bad digest"}]}'
            self.blobs[digest] = bytes(data)
            return 201, {"Docker-Content-Digest": digest}, b""
        return 204, {"Range": f"0-{max(len(data) - 1, 0)}"}, b""


@contextlib.contextmanager
def fake_registry(*rules: Rule, bundle: FakeBundle | None = None) -> Iterator[FakeRegistry]:
    registry = FakeRegistry(bundle, rules=list(rules))
    try:
        yield registry
    finally:
        registry.close()


def nested_json(depth: int = 100_000) -> bytes:
    """``[[[[...]]]]``: valid JSON that exhausts a recursive parser's (or walker's) stack."""
    return b"[" * depth + b"]" * depth
