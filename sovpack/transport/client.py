"""A small client for the OCI distribution spec (v2 API): blobs, manifests, referrers.

Why our own: a bundle must move between registries and air-gapped sites with every byte verified, resumable
uploads and downloads, and no extra dependency. What it does:

- blobs: HEAD before upload (nothing is sent twice); cross-repository mount on the same registry; monolithic
  upload (POST + PUT) for blobs up to one chunk, else chunked PATCH with Content-Range; after a failed PATCH
  the upload URL is asked for its Range and the upload continues there (a registry that refuses to resume,
  like Distribution after a half-received PATCH, gets a fresh upload session; bounded);
- downloads stream in bounded pieces and resume with ``Range`` after a dropped connection; every byte is
  hashed on the way and the caller compares digest and size before anything lands;
- manifests by digest (verified against the digest) and by tag; the OCI 1.1 referrers API with the
  ``sha256-<hex>`` tag fallback.

Requests, retries and auth are :class:`~sovpack.transport.session.Session`'s; references and credentials
live in :mod:`sovpack.transport.reference` and :mod:`sovpack.transport.auth`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sovpack._io import parse_json
from sovpack.errors import RegistryError, VerificationError
from sovpack.oci.descriptor import sha256_digest
from sovpack.oci.media import DIGEST_RE, MAX_JSON_DOCUMENT, MT_INDEX
from sovpack.transport.auth import DEFAULT_CHUNK, RegistryOptions
from sovpack.transport.reference import ACCEPT_MANIFESTS, Reference, fallback_tag
from sovpack.transport.session import READ_PIECE, Session, StallError, join_url

# RFC 6838 type/subtype (+suffix): what a Content-Type header may carry (never CR/LF or parameters)
MEDIA_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


class RegistryClient(Session):
    """One registry host: blob and manifest operations over a :class:`Session` (auth, bounded retries)."""

    def blob_exists(self, repository: str, digest: str, *, scope: str | None = None) -> int | None:
        """The blob's size if the repository has it, else None (HEAD, nothing downloaded)."""
        reply = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=scope or self.pull_scope(repository),
                             ok=(200, 404), follow=True)
        reply.drain()
        if reply.status == 404:
            return None
        length = reply.content_length()
        return -1 if length is None else length

    def iter_blob(self, repository: str, digest: str, size: int, start: int = 0) -> Iterator[bytes]:
        """The blob's bytes from ``start`` in pieces; a dropped connection resumes with Range (bounded).

        The caller hashes and checks the digest: this only guarantees contiguous bytes, never more than
        ``size`` of them.
        """
        position = start
        failures = 0
        while position < size:
            headers = {"Range": f"bytes={position}-"} if position > 0 else {}
            reply = self.request("GET", f"/v2/{repository}/blobs/{digest}", headers=headers,
                                 scope=self.pull_scope(repository), ok=(200, 206), follow=True)
            skip = 0
            if reply.status == 206:
                match = re.match(r"bytes ([0-9]{1,19})-", reply.header("Content-Range") or "")
                if not match or int(match.group(1)) != position:
                    reply.close()
                    raise RegistryError(f"{reply.url}: the registry answered a range that was not asked for")
            elif position > 0:
                skip = position  # Range ignored: read past what we have
            declared, expected = reply.content_length(), size - position + skip
            if declared is not None and declared > expected:
                reply.close()
                raise VerificationError(f"blob {digest} from {self.registry}/{repository}: the registry sends "
                                        f"{declared} bytes where the descriptor leaves {expected}; refused")
            try:
                while True:
                    piece = reply.read(READ_PIECE)
                    if not piece:
                        break
                    if skip:
                        cut = min(skip, len(piece))
                        skip -= cut
                        piece = piece[cut:]
                        if not piece:
                            continue
                    if position + len(piece) > size:
                        raise VerificationError(
                            f"blob {digest} from {self.registry}/{repository}: more than the {size} bytes its "
                            "descriptor declares; refused"
                        )
                    position += len(piece)
                    yield piece
            except (OSError, http.client.HTTPException) as e:
                failures += 1
                if failures > self.options.retries:
                    raise RegistryError(f"GET {reply.url}: {e} (gave up after {failures} tries)") from e
                self.stats["resumed_downloads"] += 1
                self._backoff(failures - 1)
                continue
            finally:
                reply.close()
            if position < size:
                failures += 1  # the body ended early without an error: ask again from here
                if failures > self.options.retries:
                    raise RegistryError(f"GET {reply.url}: the body ended after {position} of {size} bytes")
                self.stats["resumed_downloads"] += 1
                self._backoff(failures - 1)
                continue
            break

    def get_manifest(
        self, repository: str, reference: str, *, accept: str = ACCEPT_MANIFESTS
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest); a digest reference is checked against the bytes."""
        reply, data = self.fetch(f"/v2/{repository}/manifests/{reference}", headers={"Accept": accept},
                                 scope=self.pull_scope(repository))
        digest = sha256_digest(data)
        if DIGEST_RE.match(reference) and digest != reference:
            raise VerificationError(
                f"manifest {reference} from {self.registry}/{repository}: its content hashes to {digest}; refused"
            )
        media_type = (reply.header("Content-Type") or "").split(";")[0].strip()
        try:
            doc = parse_json(data, f"manifest {digest} from {self.registry}/{repository}", error=VerificationError)
        except VerificationError:
            # NOTE: not swallowed: the Content-Type stays the media type, and whoever parses the manifest
            # (the graph walk, verify) refuses bytes that are not a JSON object, naming the digest.
            doc = None
        declared = doc.get("mediaType") if isinstance(doc, dict) else None
        if isinstance(declared, str) and declared:
            media_type = declared
        return data, media_type, digest

    def manifest_exists(self, repository: str, reference: str, *, scope: str | None = None) -> bool:
        reply = self.request("HEAD", f"/v2/{repository}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS},
                             scope=scope or self.pull_scope(repository), ok=(200, 404))
        reply.drain()
        return reply.status == 200

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Mapping[str, str]:
        """PUT a manifest (by digest or tag); returns the response headers (``OCI-Subject`` tells referrers)."""
        if not MEDIA_TYPE_RE.match(media_type):
            raise VerificationError(f"manifest {sha256_digest(data)}: media type {media_type[:100]!r} is not a "
                                    "media type; not pushed")
        reply = self.request("PUT", f"/v2/{repository}/manifests/{reference}", body=data,
                             headers={"Content-Type": media_type}, scope=self.push_scope(repository), ok=(201, 200))
        headers = {k.lower(): v for k, v in reply.headers.items()}
        reply.drain()
        returned = headers.get("docker-content-digest")
        expected = sha256_digest(data)
        if returned and returned != expected:
            raise RegistryError(f"{self.registry}/{repository}: stored the manifest as {returned}, not {expected}")
        return headers

    def supports_referrers(self, repository: str, digest: str) -> bool:
        """Whether the registry serves the OCI 1.1 referrers API (it answers with an index, even empty)."""
        reply = self.request("GET", f"/v2/{repository}/referrers/{digest}", headers={"Accept": MT_INDEX},
                             scope=self.pull_scope(repository), ok=(200, 404, 400, 405))
        supported = reply.status == 200 and (reply.header("Content-Type") or "").startswith(MT_INDEX)
        reply.drain()
        return supported

    def referrers(self, repository: str, digest: str) -> tuple[list[dict[str, Any]], str]:
        """Manifests whose ``subject`` is ``digest``: the referrers API, else the ``sha256-<hex>`` tag fallback.

        Returns (descriptors, "api" | "tag-fallback").
        """
        reply = self.request("GET", f"/v2/{repository}/referrers/{digest}", headers={"Accept": MT_INDEX},
                             scope=self.pull_scope(repository), ok=(200, 404, 400, 405))
        if reply.status == 200 and (reply.header("Content-Type") or "").startswith(MT_INDEX):
            try:
                data = reply.read_limited(MAX_JSON_DOCUMENT)
            finally:
                reply.close()
            where = f"{self.registry}/{repository} referrers of {digest}"
            return _referrer_descriptors(data, where, tagged=False), "api"
        reply.drain()
        return self.fallback_referrers(repository, digest) or [], "tag-fallback"

    def fallback_referrers(self, repository: str, digest: str, *, scope: str | None = None
                           ) -> list[dict[str, Any]] | None:
        """The descriptors under the ``sha256-<hex>`` fallback tag of ``digest``; None if there is no such tag.

        A tag that holds something other than an index is a RegistryError naming it (never read as empty:
        pushing over it would drop whatever it held).
        """
        tag = fallback_tag(digest)
        if not self.manifest_exists(repository, tag, scope=scope):
            return None
        # NOTE: any manifest type is accepted here so that a tag holding something else is named as such
        # below, instead of the registry's 404 for an index-only Accept.
        data, _media_type, _digest = self.get_manifest(repository, tag)
        return _referrer_descriptors(data, f"{self.registry}/{repository}:{tag}", tagged=True)

    # ------------------------------------------------------------------------------------------ uploads

    def _start_upload(self, repository: str, mount: tuple[str, str] | None = None) -> tuple[str | None, str]:
        """POST an upload session (or a mount). Returns (upload URL or None if mounted, "mounted"|"session")."""
        path = f"/v2/{repository}/blobs/uploads/"
        scope = self.push_scope(repository)
        if mount is not None:
            digest, source = mount
            path += "?" + urllib.parse.urlencode({"mount": digest, "from": source})
            scope += f" repository:{source}:pull"
        reply = self.request("POST", path, headers={"Content-Length": "0"}, body=b"", scope=scope, ok=(201, 202))
        location = reply.header("Location")
        status = reply.status
        reply.drain()
        if status == 201:
            return None, "mounted"
        if not location:
            raise RegistryError(f"POST {path}: no Location for the upload session")
        return join_url(reply.url, location), "session"

    def mount_blob(self, repository: str, digest: str, source_repository: str) -> bool:
        """Cross-repository mount; True if the registry linked the blob (no bytes moved)."""
        location, how = self._start_upload(repository, (digest, source_repository))
        if how == "mounted":
            return True
        if location is not None:  # the registry declined and opened a session instead: cancel it
            # NOTE: cleanup only: an abandoned upload session expires on its own, and the blob is uploaded anyway
            with contextlib.suppress(RegistryError):
                self.request("DELETE", location, scope=self.push_scope(repository), ok=(204, 404, 200, 202),
                             retry=False).drain()
        return False

    def _upload_status(self, repository: str, location: str) -> tuple[int, str] | None:
        """GET the upload URL: (next offset, new location), or None if the registry lost/refuses the session."""
        try:
            reply = self.request("GET", location, scope=self.push_scope(repository), ok=(204, 200, 404, 400, 416))
        except StallError:
            raise
        except RegistryError:
            return None
        status = reply.status
        range_header = reply.header("Range")
        new_location = join_url(location, reply.header("Location") or location)
        reply.drain()
        if status not in (200, 204):
            return None
        match = re.match(r"^(?:bytes=)?0-([0-9]{1,19})$", (range_header or "").strip())
        if not match:
            return 0, new_location
        end = int(match.group(1))
        return (end + 1 if end > 0 else 0), new_location

    def push_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        source: Path,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a blob we know the digest of, hashing what is sent; a mismatch aborts before the final PUT."""
        scope = self.push_scope(repository)
        restarts = 0
        with open(source, "rb") as fh:
            while True:
                location, _how = self._start_upload(repository)
                if location is None:
                    raise RegistryError(f"{self.registry}/{repository}: the registry mounted a blob nobody asked for")
                try:
                    if size <= self.options.chunk_size:
                        self._put_monolithic(repository, location, digest, size, fh)
                    else:
                        self._put_chunked(repository, location, digest, size, fh, progress)
                    return
                except _RestartUpload as e:
                    restarts += 1
                    self.stats["restarted_uploads"] += 1
                    if restarts > self.options.retries:
                        raise RegistryError(f"upload of {digest} to {self.registry}/{repository}: {e}") from e
                    if self.blob_exists(repository, digest, scope=scope) == size:
                        return  # the final request went through; only its answer was lost
                    self._backoff(restarts - 1)

    def _finish_url(self, location: str, digest: str) -> str:
        return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})

    def _put_monolithic(self, repository: str, location: str, digest: str, size: int, fh: io.BufferedReader) -> None:
        fh.seek(0)
        data = fh.read(size + 1)
        if len(data) != size or sha256_digest(data) != digest:
            raise VerificationError(f"blob {digest}: the local copy does not hash to its digest; not uploaded")
        try:
            reply = self.request("PUT", self._finish_url(location, digest), body=data, retry=False,
                                 headers={"Content-Type": "application/octet-stream"},
                                 scope=self.push_scope(repository), ok=(201, 204))
        except StallError:
            raise
        except RegistryError as e:
            raise _RestartUpload(str(e)) from e
        reply.drain()

    def _put_chunked(
        self,
        repository: str,
        location: str,
        digest: str,
        size: int,
        fh: io.BufferedReader,
        progress: Callable[[int], None] | None,
    ) -> None:
        scope = self.push_scope(repository)
        view = memoryview(bytearray(min(self.options.chunk_size, size)))
        hasher = hashlib.sha256()
        hashed = 0  # bytes of the source fed to hasher, always a prefix
        offset = 0
        failures = 0
        while offset < size:
            if hashed > offset:  # the registry kept less than we sent: hash again up to offset
                hasher, hashed = hashlib.sha256(), 0
                fh.seek(0)
                while hashed < offset:
                    piece = fh.read(min(READ_PIECE, offset - hashed))
                    hasher.update(piece)
                    hashed += len(piece)
            fh.seek(offset)
            want = min(self.options.chunk_size, size - offset)
            got = fh.readinto(view[:want])  # one reused buffer: memory stays at one chunk
            chunk = view[:got]
            if not got:
                raise VerificationError(f"blob {digest}: the local copy is shorter than {size} bytes")
            end = offset + len(chunk) - 1
            headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"}
            try:
                reply = self.request("PATCH", location, body=chunk, headers=headers, scope=scope, ok=(202,),
                                     retry=False)
                next_location = join_url(location, reply.header("Location") or location)
                reply.drain()
            except StallError:
                raise
            except RegistryError as e:
                failures += 1
                if failures > self.options.retries:
                    raise RegistryError(f"upload of {digest}: {e} (gave up after {failures} tries)") from e
                self._backoff(failures - 1)
                status = self._upload_status(repository, location)
                if status is None or status[0] > size:
                    raise _RestartUpload(f"the registry lost the upload session ({e})") from e
                offset, location = status
                if offset > hashed:  # the registry has bytes we did not hash yet: hash them from the file
                    fh.seek(hashed)
                    while hashed < offset:
                        piece = fh.read(min(READ_PIECE, offset - hashed))
                        hasher.update(piece)
                        hashed += len(piece)
                self.stats["resumed_uploads"] += 1
                continue
            if hashed == offset:
                hasher.update(chunk)
                hashed += len(chunk)
            offset = end + 1
            location = next_location
            if progress is not None:
                progress(offset)
        if "sha256:" + hasher.hexdigest() != digest or hashed != size:
            raise VerificationError(f"blob {digest}: the local copy changed while uploading; not committed")
        try:
            reply = self.request("PUT", self._finish_url(location, digest), headers={"Content-Length": "0"}, body=b"",
                                 scope=scope, ok=(201, 204), retry=False)
        except StallError:
            raise
        except RegistryError as e:
            raise _RestartUpload(str(e)) from e
        reply.drain()


class _RestartUpload(Exception):
    """The upload session is unusable: start a new one."""


def _referrer_descriptors(data: bytes, where: str, *, tagged: bool) -> list[dict[str, Any]]:
    """The ``manifests`` of a referrers index; a malformed index is an error, not an empty list.

    ``tagged``: the index sits under a fallback tag, where anything but an image index with a manifests list
    is refused (the referrers API may leave out an empty list).
    """
    doc = parse_json(data, f"{where}: the referrers index", error=RegistryError)
    manifests = doc.get("manifests", None if tagged else []) if isinstance(doc, dict) else None
    if not isinstance(manifests, list) or (tagged and doc.get("mediaType", MT_INDEX) != MT_INDEX):
        raise RegistryError(f"{where}: holds no referrers index (an OCI image index with a manifests list)")
    return [m for m in manifests if isinstance(m, dict)]


def connect(ref: Reference, options: RegistryOptions) -> RegistryClient:
    """A client for the reference's registry."""
    return RegistryClient(ref.registry, options)


# NOTE: DEFAULT_CHUNK and RegistryOptions live in sovpack.transport.auth; re-exported for the CLI's imports.
__all__ = ["DEFAULT_CHUNK", "RegistryClient", "RegistryOptions", "connect"]
