"""HTTP to one registry host, on the standard library's http.client: auth, bounded retries, capped bodies.

Connection errors, 5xx and 429 are retried with exponential backoff (``Retry-After`` honoured, bounded); a 401
is answered through :class:`~sovpack.transport.auth.Auth`. TLS failures that will fail the same way again
(a wrong protocol, an unknown CA) are not retried and come with a hint. The distribution API itself is in
:mod:`sovpack.transport.client`.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sovpack.errors import RegistryError, UsageError
from sovpack.oci.media import MAX_JSON_DOCUMENT
from sovpack.transport.auth import MAX_TOKEN_ANSWER, Auth, RegistryOptions, resolve_credentials

READ_PIECE = 1024 * 1024
RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = "sovpack-registry-client"
MAX_ERROR_BODY = 64 * 1024
MAX_REDIRECTS = 6


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
        """Read and drop the rest of the body, then close (a body lost to a dropped connection does not matter)."""
        try:
            while self._response.read(READ_PIECE):
                pass
        except (OSError, http.client.HTTPException):
            pass  # NOTE: cleanup only: the status and headers were already read and are what counts
        self.close()

    def close(self) -> None:
        self._response.close()
        self._conn.close()


def _error_detail(reply: Reply) -> str:
    """The registry's error codes and messages from a failed reply, for the RegistryError (best effort)."""
    try:
        body = reply.read_limited(MAX_ERROR_BODY)
    except (OSError, http.client.HTTPException, RegistryError):
        return ""  # NOTE: the detail only decorates the error being raised; the HTTP status still is reported
    finally:
        reply.close()
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace").strip()


class Session:
    """Requests to one registry host with auth and bounded retries (the base of the registry client)."""

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
        self.auth = Auth(registry, self.credentials)
        self._sleep = sleep
        self.stats: dict[str, int] = {"retries": 0, "resumed_uploads": 0, "restarted_uploads": 0,
                                      "resumed_downloads": 0}

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

    def _fetch_token(self, url: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """GET a token endpoint (no auth of our own: the credentials go in ``headers``)."""
        reply, body = self.fetch(url, headers=headers, limit=MAX_TOKEN_ANSWER, auth=False)
        return reply.status, body

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
                reply = self._send(method, url, {**headers, **(self.auth.header(url, scope) if auth else {})}, body)
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
                self.auth.answer(challenge, scope, url, self._fetch_token)
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
        for _hop in range(MAX_REDIRECTS):
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
        limit: int = MAX_JSON_DOCUMENT,
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


__all__ = ["Reply", "Session"]
