"""Fuzzing the parsers of bundle transport: OCI descriptors, the manifest graph walk, layout directories,
oci-archive tars and registry responses.

Each property feeds a parser hostile input built by ``hypothesis`` (arbitrary JSON, documents shaped like
indexes and manifests that point at each other, tar archives with arbitrary member names, types and sizes,
arbitrary bytes in HTTP bodies and headers) and accepts exactly two outcomes: a value, or a SovpackError. Any
other exception is a bug. Example counts are bounded and the search is derandomized, so the file runs in
seconds and CI is reproducible.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from email.message import Message
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovpack.errors import SovpackError, VerificationError
from sovpack.oci.archive import read_archive
from sovpack.oci.blobs import collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.reader import Layout, select_index
from sovpack.transport.auth import Auth, Credentials, RegistryOptions, parse_challenge
from sovpack.transport.client import RegistryClient, _referrer_descriptors
from sovpack.transport.session import _error_detail, decimal_header

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DIGESTS = st.sampled_from(["sha256:" + hashlib.sha256(bytes([i])).hexdigest() for i in range(4)])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), st.text(max_size=12), DIGESTS,
    st.sampled_from([MT_INDEX, MT_MANIFEST, "application/octet-stream", "", "x\r\ny"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=16,
)
# Descriptor-shaped objects: the right keys with arbitrary (sometimes right) values
DESCRIPTORS = st.fixed_dictionaries(
    {}, optional={
        "mediaType": st.one_of(st.sampled_from([MT_INDEX, MT_MANIFEST, "a/b"]), JSON),
        "digest": st.one_of(DIGESTS, JSON),
        "size": st.one_of(st.integers(min_value=-2, max_value=2**64), JSON),
        "annotations": st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3), JSON),
        "artifactType": JSON,
    },
)


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a parser: its value, or None after a SovpackError; any other exception fails the property."""
    try:
        return fn(*args, **kwargs)
    except SovpackError:
        return None


# ------------------------------------------------------------------------------------------ descriptors


@FUZZ
@given(st.one_of(JSON, DESCRIPTORS))
def test_descriptor_from_dict(value: Any) -> None:
    desc = _outcome(Descriptor.from_dict, value, "fuzz")
    if desc is not None:
        assert Descriptor.from_dict(desc.to_dict(), "again") == desc


# ------------------------------------------------------------------------------------------ the graph walk


@st.composite
def documents(draw: st.DrawFn) -> tuple[dict[str, bytes], Descriptor]:
    """A few documents shaped like indexes and manifests (or anything), pointing at each other by digest."""
    store: dict[str, bytes] = {}
    digests: list[str] = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        refs = [{"mediaType": draw(st.sampled_from([MT_INDEX, MT_MANIFEST, "a/b"])), "digest": d,
                 "size": len(store[d]) if draw(st.booleans()) else draw(st.integers(0, 10))}
                for d in draw(st.lists(st.sampled_from(digests), max_size=3))] if digests else []
        shape = draw(st.sampled_from(["index", "index", "manifest", "manifest", "manifest", "json", "bytes"]))
        doc: Any
        if shape == "index":
            doc = {"mediaType": MT_INDEX, "manifests": draw(st.one_of(st.just(refs), JSON))}
        elif shape == "manifest":
            doc = {"mediaType": MT_MANIFEST, "config": draw(st.one_of(st.just(refs[0] if refs else None), DESCRIPTORS)),
                   "layers": draw(st.one_of(st.just(refs), st.lists(DESCRIPTORS, max_size=2), JSON))}
        else:
            doc = draw(JSON)
        data = draw(st.binary(max_size=40)) if shape == "bytes" else json.dumps(doc).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        store[digest] = data
        digests.append(digest)
    top = digests[-1]
    size = len(store[top]) if draw(st.booleans()) else draw(st.integers(0, 100))
    return store, Descriptor(media_type=draw(st.sampled_from([MT_INDEX, MT_MANIFEST, "x/y"])), digest=top, size=size)


@FUZZ
@given(documents())
def test_collect_walks_arbitrary_documents(case: tuple[dict[str, bytes], Descriptor]) -> None:
    store, top = case

    def read_manifest(desc: Descriptor) -> bytes:
        if desc.digest not in store or len(store[desc.digest]) != desc.size:
            raise VerificationError(f"manifest {desc.digest}: missing or the wrong size")
        return store[desc.digest]

    graph = _outcome(collect, read_manifest, top)
    if graph is not None:
        assert graph.manifests[-1].descriptor == top
        assert all(isinstance(b, Descriptor) for b in graph.blobs)
        _outcome(lambda: graph.manifests[-1].tag)


# ------------------------------------------------------------------------------------------ layouts


@FUZZ
@given(index=st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60),
                       st.builds(lambda entries: json.dumps({"schemaVersion": 2, "manifests": entries}).encode(),
                                 st.lists(DESCRIPTORS, max_size=3))),
       marker=st.one_of(st.just(b'{"imageLayoutVersion":"1.0.0"}'), st.binary(max_size=30),
                        JSON.map(lambda v: json.dumps(v).encode())),
       tag=st.one_of(st.none(), st.text(max_size=5)))
def test_layout_reading(index: bytes, marker: bytes, tag: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "index.json").write_bytes(index)
        (root / "oci-layout").write_bytes(marker)
        layout = _outcome(Layout, root)
        if layout is not None:
            _outcome(select_index, layout, tag)


# ------------------------------------------------------------------------------------------ tar archives


def _valid_members() -> list[tuple[str, bytes]]:
    layer = b"layer bytes"
    config = b"{}"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                           "config": {"mediaType": "a/b", "digest": _d(config), "size": len(config)},
                           "layers": [{"mediaType": "a/b", "digest": _d(layer), "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "annotations": {
        "org.opencontainers.image.ref.name": "v1"},
        "manifests": [{"mediaType": MT_MANIFEST, "digest": _d(manifest), "size": len(manifest)}]}).encode()
    top = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_INDEX, "digest": _d(index), "size": len(index)}]}).encode()
    blobs = [(f"blobs/sha256/{_d(b).split(':')[1]}", b) for b in (layer, config, manifest, index)]
    return [*blobs, ("index.json", top), ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


NAMES = st.one_of(
    st.sampled_from(["index.json", "oci-layout", "blobs", "blobs/sha256", "./index.json", "/etc/passwd", "../x",
                     "blobs/sha256/" + "a" * 64, "blobs/sha512/x", "", ".", "a" * 200, "blobs//sha256",
                     "blobs/sha256/" + _d(b"layer bytes").split(":")[1]]),
    st.text(max_size=30),
)
TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"Z"])


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    members = list(_valid_members()) if draw(st.integers(0, 3)) else []  # mostly a real bundle, then damaged
    out = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):
            members.insert(draw(st.integers(0, len(members))), (draw(NAMES), draw(st.binary(max_size=40))))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.type = draw(st.one_of(st.just(tarfile.REGTYPE), TYPES)) if name not in dict(_valid_members()) \
                else tarfile.REGTYPE
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            if info.type == tarfile.GNUTYPE_SPARSE:
                info.type = tarfile.REGTYPE  # tarfile cannot write sparse members; a raw flag byte is set below
            try:
                tar.addfile(info, io.BytesIO(data) if info.size else None)
            except ValueError:  # a name this format cannot hold
                continue
    raw = bytearray(out.getvalue())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # flip bytes anywhere: headers, sizes, data
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0 and raw:  # cut short
        raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


@FUZZ
@given(archives(), st.sampled_from(["plain", "gzip"]))
def test_archive_reading(data: bytes, compression: str) -> None:
    import gzip

    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "in.tar"
        archive.write_bytes(gzip.compress(data, mtime=0) if compression == "gzip" else data)
        dest = Path(tmp) / "out"
        result = _outcome(read_archive, archive, dest)
        if result is None:
            assert not (dest / "index.json").exists()
        else:
            assert (dest / "index.json").is_file()


# ------------------------------------------------------------------------------------- registry answers


@FUZZ
@given(st.text(max_size=80), st.binary(max_size=80), st.integers(min_value=100, max_value=599))
def test_auth_challenges_and_token_answers(challenge: str, body: bytes, status: int) -> None:
    scheme, params = parse_challenge(challenge)
    assert isinstance(scheme, str) and all(isinstance(v, str) for v in params.values())
    auth = Auth("127.0.0.1:9", Credentials("user", "pw", "test"))
    for header in (challenge, f'Bearer realm="http://127.0.0.1:9/token",service="{challenge[:10]}"'):
        _outcome(auth.answer, header, "repository:a:pull", "http://127.0.0.1:9/v2/", lambda _u, _h: (status, body))
        assert isinstance(auth.header("http://127.0.0.1:9/v2/", "repository:a:pull"), dict)


@FUZZ
@given(st.one_of(JSON.map(lambda v: json.dumps({"token": v, "errors": v, "manifests": v}).encode()),
                 JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60)))
def test_token_error_and_referrers_bodies(body: bytes) -> None:
    auth = Auth("127.0.0.1:9", None)
    _outcome(auth.answer, 'Bearer realm="http://127.0.0.1:9/t"', None, "http://127.0.0.1:9/v2/",
             lambda _u, _h: (200, body))
    assert isinstance(_error_detail(_StubReply(body)), str)  # type: ignore[arg-type]
    for tagged in (True, False):
        entries = _outcome(_referrer_descriptors, body, "fuzz", tagged=tagged)
        assert entries is None or all(isinstance(e, dict) for e in entries)


class _StubReply:
    """Just enough of a Reply for the body parsers: a status, headers and a body."""

    def __init__(self, body: bytes, headers: dict[str, str] | None = None, status: int = 200) -> None:
        self._body = body
        self.url = "http://127.0.0.1:9/v2/x"
        self.status = status
        self.headers = Message()
        for key, value in (headers or {}).items():
            self.headers[key] = value

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def read_limited(self, limit: int) -> bytes:
        return self._body[:limit]

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _StubClient(RegistryClient):
    """A registry client whose HTTP is one canned answer (no network)."""

    answer: _StubReply

    def fetch(self, path_or_url: str, **_kwargs: Any) -> tuple[Any, bytes]:  # type: ignore[override]
        return self.answer, self.answer._body

    def request(self, method: str, path_or_url: str, **_kwargs: Any) -> Any:  # type: ignore[override]
        return self.answer


@FUZZ
@given(st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60),
                 st.builds(lambda m: json.dumps({"mediaType": m, "manifests": []}).encode(), JSON)),
       st.sampled_from(["", MT_INDEX, "application/json", "x\r\ny", "a/b; charset=x"]),
       st.one_of(st.none(), st.text(max_size=24)))
def test_manifest_bodies_and_headers(body: bytes, content_type: str, length: str | None) -> None:
    client = _StubClient("127.0.0.1:9", RegistryOptions(plain_http=True))
    headers = {"Content-Type": content_type} if "\r" not in content_type else {}
    client.answer = _StubReply(body, headers)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    for reference in ("v1", digest, "sha256:" + "0" * 64):
        got = _outcome(client.get_manifest, "repo", reference)
        if got is not None:
            assert got[0] == body and got[2] == digest and isinstance(got[1], str)
    client.answer = _StubReply(body, {"Content-Type": MT_INDEX, **({"Content-Length": length} if length else {})})
    referrers = _outcome(client.referrers, "repo", digest)
    assert referrers is None or isinstance(referrers[0], list)
    value = decimal_header(length)
    assert value is None or (isinstance(value, int) and value >= 0)
