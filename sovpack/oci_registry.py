"""A small client for the OCI distribution spec (v2 API), on the standard library's http.client.

Why our own: a bundle must move between registries and air-gapped sites with every byte verified, resumable
uploads and downloads, and no extra dependency. What it does:

- blobs: HEAD before upload (nothing is sent twice); cross-repository mount on the same registry; monolithic
  upload (POST + PUT) for blobs up to one chunk, else chunked PATCH with Content-Range; after a failed PATCH
  the upload URL is asked for its Range and the upload continues there (a registry that refuses to resume,
  like Distribution after a half-received PATCH, gets a fresh upload session; bounded);
- downloads stream in bounded pieces and resume with ``Range`` after a dropped connection; every byte is
  hashed on the way and the caller compares digest and size before anything lands;
- manifests by digest (verified against the digest) and by tag; the OCI 1.1 referrers API with the
  ``sha256-<hex>`` tag fallback;
- retries with exponential backoff on connection errors, 5xx and 429 (``Retry-After`` honoured, bounded);
- auth: Basic, and Bearer tokens from the ``WWW-Authenticate`` realm/service/scope; credentials from
  ``--creds``, then ``SOVPACK_REGISTRY_USERNAME``/``SOVPACK_REGISTRY_PASSWORD``, then the ``auths`` of
  ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``; credential helpers are not run).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack.bundle import DIGEST_RE, MT_INDEX, MT_MANIFEST, TAG_RE
from sovpack.errors import RegistryError, UsageError, VerificationError

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (MT_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_MANIFEST, MT_DOCKER_MANIFEST, *INDEX_TYPES)
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES)
MAX_MANIFEST = 8 * 1024 * 1024  # registries cap manifests at 4 MiB; never buffer more than this
DEFAULT_CHUNK = 16 * 1024 * 1024
READ_PIECE = 1024 * 1024
RETRY_STATUSES = (429, 500, 502, 503, 504)
ENV_USERNAME = "SOVPACK_REGISTRY_USERNAME"
ENV_PASSWORD = "SOVPACK_REGISTRY_PASSWORD"
USER_AGENT = "sovpack-registry-client"

_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")


# ------------------------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class Reference:
    """``docker://HOST[:PORT]/REPO[:TAG][@sha256:...]``: the host is always explicit (no default registry)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        raw = text.removeprefix("docker://")
        host, _, rest = raw.partition("/")
        if not rest or not HOST_RE.match(host):
            raise UsageError(f"{text!r}: a registry reference is docker://HOST[:PORT]/REPOSITORY[:TAG]")
        digest = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not DIGEST_RE.match(digest):
                raise UsageError(f"{text!r}: {digest!r} is not a sha256 digest")
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not TAG_RE.match(tag):
                raise UsageError(f"{text!r}: {tag!r} is not a valid tag")
        if not REPOSITORY_RE.match(rest) or len(rest) > 255:
            raise UsageError(f"{text!r}: {rest!r} is not a valid repository name (lowercase path components)")
        return cls(registry=host, repository=rest, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag (default ``latest``)."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(registry=self.registry, repository=self.repository, tag=tag, digest=None)

    def __str__(self) -> str:
        text = f"docker://{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_registry_reference(text: object) -> bool:
    return isinstance(text, str) and text.startswith("docker://")


# ------------------------------------------------------------------------------------------ options, auth


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryOptions:
    """How to reach registries: shared by every command that takes a ``docker://`` reference."""

    plain_http: bool = False
    ca_file: Path | None = None
    creds: str | None = None  # "user:pass", wins over the environment and the docker config
    retries: int = 6
    backoff: float = 0.5  # seconds before the first retry; doubles each time
    max_backoff: float = 8.0
    timeout: float = 120.0
    chunk_size: int = DEFAULT_CHUNK


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = ""


def _docker_config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _auth_keys(registry: str) -> list[str]:
    """How ``docker login`` may have spelled the registry in ``auths``."""
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"http://{registry}/v2/",
            f"https://{registry}/v2/"]


def resolve_credentials(
    registry: str, options: RegistryOptions, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """``--creds``, else the environment pair, else the docker config ``auths`` entry, else none."""
    env = os.environ if environ is None else environ
    if options.creds is not None:
        user, sep, password = options.creds.partition(":")
        if not sep or not user:
            raise UsageError("--creds takes USER:PASSWORD")
        return Credentials(user, password, "--creds")
    if env.get(ENV_USERNAME) is not None:
        return Credentials(env[ENV_USERNAME], env.get(ENV_PASSWORD, ""), ENV_USERNAME)
    path = _docker_config_path(env)
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read the docker config: {e}") from e
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _auth_keys(registry):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError) as e:
                raise UsageError(f"{path}: auths[{key!r}].auth is not base64 of user:password") from e
            if sep:
                return Credentials(user, password, str(path))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], str(path))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', rest)}
    return scheme.lower(), params


# ------------------------------------------------------------------------------------------------- HTTP


class Reply:
    """One HTTP response whose body is read on demand; ``close`` also closes its connection."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str) -> None:
        self._conn = conn
        self._response = response
        self.url = url
        self.status = response.status
        self.headers = response.headers

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def read(self, n: int = -1) -> bytes:
        return self._response.read(n)

    def read_limited(self, limit: int) -> bytes:
        """The whole body (at most ``limit`` bytes); a body cut short raises http.client.IncompleteRead."""
        pieces: list[bytes] = []
        total = 0
        while piece := self._response.read(min(READ_PIECE, limit + 1 - total)):
            pieces.append(piece)
            total += len(piece)
            if total > limit:
                self.close()
                raise RegistryError(f"{self.url}: response larger than {limit} bytes; refused")
        data = b"".join(pieces)
        declared = self.header("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != len(data):
            raise http.client.IncompleteRead(data, int(declared) - len(data))
        return data

    def drain(self) -> None:
        try:
            while self._response.read(READ_PIECE):
                pass
        except (OSError, http.client.HTTPException):
            pass
        self.close()

    def close(self) -> None:
        self._response.close()
        self._conn.close()


def _error_detail(reply: Reply) -> str:
    try:
        body = reply.read_limited(64 * 1024)
    except (OSError, http.client.HTTPException, RegistryError):
        return ""
    finally:
        reply.close()
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace").strip()


class RegistryClient:
    """One registry host: requests with auth and bounded retries, blob and manifest operations."""

    def __init__(
        self,
        registry: str,
        options: RegistryOptions | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.options = options or RegistryOptions()
        if self.options.chunk_size < 1024:
            raise UsageError("chunk size must be at least 1 KiB")
        scheme = "http" if self.options.plain_http else "https"
        self.base = f"{scheme}://{registry}"
        self._ssl: ssl.SSLContext | None = None
        if not self.options.plain_http:
            ca = self.options.ca_file
            if ca is not None and not Path(ca).is_file():
                raise UsageError(f"--ca-file {ca}: no such file")
            self._ssl = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        self.credentials = resolve_credentials(registry, self.options, environ)
        self._sleep = sleep
        self._basic = False  # the registry asked for Basic: send it up front from now on
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._bearer: dict[str, str] | None = None  # the last Bearer challenge (realm, service)
        self.stats: dict[str, int] = {"retries": 0, "resumed_uploads": 0, "restarted_uploads": 0,
                                      "resumed_downloads": 0}

    # ------------------------------------------------------------------------------------------ transport

    def _url(self, path_or_url: str) -> str:
        return urllib.parse.urljoin(self.base + "/", path_or_url)

    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urllib.parse.urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if parts.scheme == "https":
            context = self._ssl or ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.netloc, timeout=self.options.timeout, context=context
            )
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.options.timeout)
        else:
            raise RegistryError(f"{url}: unsupported URL scheme")
        return conn, target

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | memoryview | None) -> Reply:
        conn, target = self._connect(url)
        try:
            conn.request(method, target, body=body, headers={"User-Agent": USER_AGENT, **headers})
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        return Reply(conn, response, url)

    def _backoff(self, attempt: int, reply: Reply | None = None) -> None:
        delay = min(self.options.backoff * (2**attempt), self.options.max_backoff)
        if reply is not None:
            after = reply.header("Retry-After")
            if after and after.strip().isdigit():
                delay = min(float(after.strip()), self.options.max_backoff)
        self.stats["retries"] += 1
        self._sleep(delay)

    def _auth_header(self, url: str, scope: str | None) -> dict[str, str]:
        if urllib.parse.urlsplit(url).netloc != self.registry:
            return {}  # never send credentials to a redirect target on another host
        if scope is not None and scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.credentials is not None:
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
        return {}

    def _authenticate(self, challenge: str | None, scope: str | None, url: str) -> None:
        """Answer a 401: remember Basic, or fetch a Bearer token for the challenge's (and our) scope."""
        scheme, params = parse_challenge(challenge or "")
        if scheme == "basic":
            if self.credentials is None:
                raise RegistryError(
                    f"{url}: the registry needs credentials: pass --creds USER:PASS, set {ENV_USERNAME} and "
                    f"{ENV_PASSWORD}, or log in (docker config auths)"
                )
            if self._basic:
                raise RegistryError(f"{url}: the registry refused the credentials of {self.credentials.source}")
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"{url}: unauthorized, and no usable WWW-Authenticate challenge ({challenge!r})")
        scopes = [s for s in (params.get("scope") or "").split(" ") if s]
        for s in (scope or "").split(" "):
            if s and s not in scopes:
                scopes.append(s)
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in scopes]
        if self.credentials is not None:
            query.append(("account", self.credentials.username))
        realm = params["realm"]
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        reply, body = self.fetch(token_url, headers=headers, limit=1024 * 1024, auth=False)
        if reply.status != 200:
            raise RegistryError(f"token endpoint {realm}: HTTP {reply.status} {body[:200].decode('utf-8', 'replace')}")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise RegistryError(f"token endpoint {realm}: the answer is not JSON") from e
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token endpoint {realm}: the answer holds no token")
        key = scope or " ".join(scopes)
        if key in self._tokens and self._tokens[key] == token:
            raise RegistryError(f"{url}: the registry refused the token for {key!r} (insufficient access?)")
        self._tokens[key] = token

    def _retrying(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | memoryview | None,
        *,
        scope: str | None = None,
        auth: bool = True,
        retry: bool = True,
    ) -> Reply:
        """Send with auth; retry connection errors, 5xx and 429 with backoff (bounded). Returns the last reply."""
        attempts = self.options.retries + 1 if retry else 1
        auth_rounds = 0
        attempt = 0
        while True:
            try:
                reply = self._send(method, url, {**headers, **(self._auth_header(url, scope) if auth else {})}, body)
            except (OSError, http.client.HTTPException) as e:
                attempt += 1
                permanent = isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError)
                if attempt >= attempts or permanent:  # a failed handshake fails the same way next time
                    hint = ""
                    if isinstance(e, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(e):
                        hint = " (the registry speaks plain HTTP? pass --plain-http)"
                    elif isinstance(e, ssl.SSLCertVerificationError):
                        hint = " (a private CA? pass --ca-file CA.pem)"
                    raise RegistryError(f"{method} {url}: {e}{hint}") from e
                self._backoff(attempt - 1)
                continue
            if reply.status == 401 and auth and auth_rounds < 2:
                auth_rounds += 1
                challenge = reply.header("WWW-Authenticate")
                reply.drain()
                self._authenticate(challenge, scope, url)
                continue
            if reply.status in RETRY_STATUSES and retry and attempt + 1 < attempts:
                attempt += 1
                reply.drain()
                self._backoff(attempt - 1, reply)
                continue
            return reply

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | memoryview | None = None,
        scope: str | None = None,
        ok: Sequence[int] = (200,),
        retry: bool = True,
        follow: bool = False,
    ) -> Reply:
        """One request; a status outside ``ok`` raises RegistryError with the registry's error detail."""
        url = self._url(path_or_url)
        for _hop in range(6):
            reply = self._retrying(method, url, headers or {}, body, scope=scope, retry=retry)
            if follow and reply.status in (301, 302, 303, 307, 308) and reply.header("Location"):
                url = urllib.parse.urljoin(url, reply.header("Location") or "")
                reply.drain()
                continue
            if reply.status not in ok:
                detail = _error_detail(reply)
                raise RegistryError(f"{method} {url}: HTTP {reply.status}" + (f" ({detail})" if detail else ""))
            return reply
        raise RegistryError(f"{method} {url}: too many redirects")

    def fetch(
        self,
        path_or_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        scope: str | None = None,
        limit: int = MAX_MANIFEST,
        auth: bool = True,
    ) -> tuple[Reply, bytes]:
        """GET a small body whole; a connection that drops mid-body is retried like a failed request."""
        failures = 0
        while True:
            if auth:
                reply = self.request("GET", path_or_url, headers=headers, scope=scope)
            else:
                reply = self._retrying("GET", self._url(path_or_url), headers or {}, None, auth=False)
            try:
                return reply, reply.read_limited(limit)
            except (OSError, http.client.HTTPException) as e:
                failures += 1
                if failures > self.options.retries:
                    raise RegistryError(f"GET {reply.url}: {e} (gave up after {failures} tries)") from e
                self._backoff(failures - 1)
            finally:
                reply.close()

    # ------------------------------------------------------------------------------------------------ API

    @staticmethod
    def pull_scope(repository: str) -> str:
        return f"repository:{repository}:pull"

    @staticmethod
    def push_scope(repository: str) -> str:
        return f"repository:{repository}:pull,push"

    def ping(self) -> None:
        """``GET /v2/``: the registry answers (401 is fine: auth happens per request)."""
        reply = self._retrying("GET", self._url("/v2/"), {}, None, auth=False)
        status = reply.status
        reply.drain()
        if status not in (200, 401):
            raise RegistryError(f"{self.base}/v2/: HTTP {status}; not an OCI distribution registry?")

    def blob_exists(self, repository: str, digest: str, *, scope: str | None = None) -> int | None:
        """The blob's size if the repository has it, else None (HEAD, nothing downloaded)."""
        reply = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=scope or self.pull_scope(repository),
                             ok=(200, 404), follow=True)
        reply.drain()
        if reply.status == 404:
            return None
        length = reply.header("Content-Length")
        return int(length) if length and length.isdigit() else -1

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
                match = re.match(r"bytes (\d+)-", reply.header("Content-Range") or "")
                if not match or int(match.group(1)) != position:
                    reply.close()
                    raise RegistryError(f"{reply.url}: the registry answered a range that was not asked for")
            elif position > 0:
                skip = position  # Range ignored: read past what we have
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
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if DIGEST_RE.match(reference) and digest != reference:
            raise VerificationError(
                f"manifest {reference} from {self.registry}/{repository}: its content hashes to {digest}; refused"
            )
        media_type = (reply.header("Content-Type") or "").split(";")[0].strip()
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
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
        reply = self.request("PUT", f"/v2/{repository}/manifests/{reference}", body=data,
                             headers={"Content-Type": media_type}, scope=self.push_scope(repository), ok=(201, 200))
        headers = {k.lower(): v for k, v in reply.headers.items()}
        reply.drain()
        returned = headers.get("docker-content-digest")
        expected = "sha256:" + hashlib.sha256(data).hexdigest()
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
                doc = json.loads(reply.read_limited(MAX_MANIFEST))
            finally:
                reply.close()
            return [m for m in doc.get("manifests", []) if isinstance(m, dict)], "api"
        reply.drain()
        tag = fallback_tag(digest)
        if not self.manifest_exists(repository, tag):
            return [], "tag-fallback"
        data, _media_type, _digest = self.get_manifest(repository, tag, accept=MT_INDEX)
        doc = json.loads(data)
        return [m for m in doc.get("manifests", []) if isinstance(m, dict)], "tag-fallback"

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
        return urllib.parse.urljoin(reply.url, location), "session"

    def mount_blob(self, repository: str, digest: str, source_repository: str) -> bool:
        """Cross-repository mount; True if the registry linked the blob (no bytes moved)."""
        location, how = self._start_upload(repository, (digest, source_repository))
        if how == "mounted":
            return True
        if location is not None:  # the registry declined and opened a session instead: cancel it
            with contextlib.suppress(RegistryError):
                self.request("DELETE", location, scope=self.push_scope(repository), ok=(204, 404, 200, 202),
                             retry=False).drain()
        return False

    def _upload_status(self, repository: str, location: str) -> tuple[int, str] | None:
        """GET the upload URL: (next offset, new location), or None if the registry lost/refuses the session."""
        try:
            reply = self.request("GET", location, scope=self.push_scope(repository), ok=(204, 200, 404, 400, 416))
        except RegistryError:
            return None
        status = reply.status
        range_header = reply.header("Range")
        new_location = urllib.parse.urljoin(location, reply.header("Location") or location)
        reply.drain()
        if status not in (200, 204):
            return None
        match = re.match(r"^(?:bytes=)?0-(\d+)$", (range_header or "").strip())
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
                        raise RegistryError(f"upload of {digest} to {self.registry}/{repository}: {e}") from None
                    if self.blob_exists(repository, digest, scope=scope) == size:
                        return  # the final request went through; only its answer was lost
                    self._backoff(restarts - 1)

    def _finish_url(self, location: str, digest: str) -> str:
        return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})

    def _put_monolithic(self, repository: str, location: str, digest: str, size: int, fh: io.BufferedReader) -> None:
        fh.seek(0)
        data = fh.read(size + 1)
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise VerificationError(f"blob {digest}: the local copy does not hash to its digest; not uploaded")
        try:
            reply = self.request("PUT", self._finish_url(location, digest), body=data, retry=False,
                                 headers={"Content-Type": "application/octet-stream"},
                                 scope=self.push_scope(repository), ok=(201, 204))
        except RegistryError as e:
            raise _RestartUpload(str(e)) from None
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
                next_location = urllib.parse.urljoin(location, reply.header("Location") or location)
                reply.drain()
            except RegistryError as e:
                failures += 1
                if failures > self.options.retries:
                    raise RegistryError(f"upload of {digest}: {e} (gave up after {failures} tries)") from None
                self._backoff(failures - 1)
                status = self._upload_status(repository, location)
                if status is None or status[0] > size:
                    raise _RestartUpload(f"the registry lost the upload session ({e})") from None
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
        except RegistryError as e:
            raise _RestartUpload(str(e)) from None
        reply.drain()


class _RestartUpload(Exception):
    """The upload session is unusable: start a new one."""


def fallback_tag(digest: str) -> str:
    """The referrers tag schema: ``sha256:<hex>`` -> ``sha256-<hex>``."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"


def connect(ref: Reference, options: RegistryOptions) -> RegistryClient:
    """A client for the reference's registry."""
    return RegistryClient(ref.registry, options)


__all__ = [
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "Credentials",
    "Reference",
    "RegistryClient",
    "RegistryOptions",
    "connect",
    "fallback_tag",
    "is_registry_reference",
    "resolve_credentials",
]
