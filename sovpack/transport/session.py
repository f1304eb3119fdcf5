"""HTTP to one registry host, on the standard library's http.client: auth, bounded retries, capped bodies.

Connection errors, 5xx and 429 are retried with exponential backoff (``Retry-After`` honoured, bounded); a 401
is answered through :class:`~sovpack.transport.auth.Auth`. TLS failures that will fail the same way again
(a wrong protocol, an unknown CA) are not retried and come with a hint. The distribution API itself is in
:mod:`sovpack.transport.client`.

Every request is watched until its reply is closed (:class:`Watchdog`): a connection that moves less than
``STALL_PIECE`` bytes in ``stall_timeout`` seconds (a registry that trickles a byte every few seconds, or
never answers) is shut down and the request fails with :class:`StallError`, which is not retried: a stalled
registry rarely recovers, and the next run resumes whatever had arrived. Bodies are read in pieces of at most
``STALL_PIECE`` bytes so progress is seen, and never more than a caller's limit; a declared Content-Length
beyond it is refused before anything is read.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from sovpack._io import parse_json
from sovpack.errors import RegistryError, UsageError
from sovpack.oci.media import MAX_JSON_DOCUMENT
from sovpack.transport.auth import MAX_TOKEN_ANSWER, Auth, RegistryOptions, resolve_credentials

READ_PIECE = 1024 * 1024
STALL_PIECE = 64 * 1024  # progress is this many bytes (or a finished step) within the stall timeout
RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = "sovpack-registry-client"
MAX_ERROR_BODY = 64 * 1024
MAX_DRAIN = 64 * 1024  # a body read only to be dropped: beyond this the connection is simply closed
MAX_REDIRECTS = 6
_DECIMAL = re.compile(r"^[0-9]{1,19}$")  # ASCII digits only ("²".isdigit() is True); below 2**63


def decimal_header(value: str | None) -> int | None:
    """A header that must be a non-negative decimal (Content-Length, Retry-After); None if absent or not one."""
    text = (value or "").strip()
    return int(text) if _DECIMAL.match(text) else None


class StallError(RegistryError):
    """A request moved less than ``STALL_PIECE`` bytes in ``stall_timeout`` seconds; not retried."""


class _Watch:
    """One request's progress clock; the watchdog shuts its socket down once it stalls."""

    __slots__ = ("conn", "last", "shut", "sock", "stalled")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        # NOTE: http.client hands the socket to the response (conn.sock becomes None) once headers are read
        self.sock: socket.socket | None = None
        self.last = time.monotonic()
        self.stalled = False
        self.shut = False

    def progress(self) -> None:
        self.last = time.monotonic()

    def trip(self) -> None:
        """Unblock whatever waits on the socket (recv or send then fails); retried until the socket exists."""
        self.stalled = True
        sock = self.conn.sock if self.conn.sock is not None else self.sock  # during a TLS handshake: the TCP one
        if sock is not None and not self.shut:
            self.shut = True
            # NOTE: an OSError means the socket is already closed: nothing left to unblock. And
            # socket.socket.shutdown, not SSLSocket's (which also drops the TLS object under the reader).
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """Watches a session's open requests from one daemon thread, which exits when none is open."""

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self._poll = max(0.05, min(1.0, stall_timeout / 4))
        self._watches: set[_Watch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, conn: http.client.HTTPConnection) -> _Watch:
        watch = _Watch(conn)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sovpack-stall-watchdog", daemon=True)
                self._thread.start()
        return watch

    def release(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self._poll)
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                now = time.monotonic()
                for watch in self._watches:
                    if watch.stalled or now - watch.last > self.stall_timeout:
                        watch.trip()


class Reply:
    """One HTTP response whose body is read on demand; ``close`` also closes its connection."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str,
                 watch: _Watch, watchdog: Watchdog, method: str = "GET") -> None:
        self._conn = conn
        self._response = response
        self._watch = watch
        self._watchdog = watchdog
        self.method = method
        self.url = url
        self.status = response.status
        self.headers = response.headers

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def content_length(self) -> int | None:
        return decimal_header(self.header("Content-Length"))

    def stall_error(self) -> StallError:
        return StallError(
            f"{self.method} {self.url}: less than {STALL_PIECE // 1024} KiB arrived in "
            f"{self._watchdog.stall_timeout:g} s; the registry stalled (--stall-timeout SECONDS sets the limit)"
        )

    def read(self, n: int = READ_PIECE) -> bytes:
        """Up to ``n`` bytes of the body (fewer only at its end), read in pieces so progress is seen."""
        pieces: list[bytes] = []
        left = n
        try:
            while left > 0:
                piece = self._response.read(min(STALL_PIECE, left))
                if not piece:
                    break
                self._watch.progress()
                pieces.append(piece)
                left -= len(piece)
        except (OSError, http.client.HTTPException) as e:
            if self._watch.stalled or isinstance(e, TimeoutError):  # the watchdog, or the socket's own timeout
                self.close()
                raise self.stall_error() from e
            raise
        if self._watch.stalled:  # the watchdog shut the socket: a short body is its doing, not the registry's end
            self.close()
            raise self.stall_error()
        return b"".join(pieces)

    def read_limited(self, limit: int) -> bytes:
        """The whole body (at most ``limit`` bytes); a body cut short raises http.client.IncompleteRead."""
        declared = self.content_length()
        if declared is not None and declared > limit:
            self.close()
            raise RegistryError(f"{self.url}: the response declares {declared} bytes, more than {limit}; refused")
        data = self.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise RegistryError(f"{self.url}: response larger than {limit} bytes; refused")
        if declared is not None and declared != len(data):
            raise http.client.IncompleteRead(data, declared - len(data))
        return data

    def drain(self) -> None:
        """Drop the rest of a (small) body, then close: nothing is reused, so a large one is simply cut off."""
        # NOTE: cleanup only: the status and headers were already read and are what counts
        with contextlib.suppress(OSError, http.client.HTTPException):
            self._response.read(MAX_DRAIN)
        self.close()

    def close(self) -> None:
        self._watchdog.release(self._watch)
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
        doc = parse_json(body, f"{reply.url}: error body", error=RegistryError)
    except RegistryError:
        doc = None  # NOTE: not JSON: the body's first line is the detail instead
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list) and errors:
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    else:
        text = body.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text[:200]).strip()


def join_url(base: str, reference: str) -> str:
    """``reference`` (a Location header, a token realm) resolved against ``base``; a malformed one is refused."""
    try:
        return urllib.parse.urljoin(base, reference)
    except ValueError as e:  # e.g. "Invalid IPv6 URL"
        raise RegistryError(f"{reference[:200]!r}: not a usable URL ({e})") from e


def _pieces(body: bytes | memoryview, watch: _Watch) -> Iterator[memoryview]:
    """A request body in ``STALL_PIECE`` slices; each slice handed over means the previous one was sent."""
    view = memoryview(body)
    for start in range(0, len(view), STALL_PIECE):
        yield view[start : start + STALL_PIECE]
        watch.progress()


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
        if not self.options.stall_timeout > 0:
            raise UsageError("--stall-timeout must be a positive number of seconds")
        self.credentials = resolve_credentials(registry, self.options, environ)
        self.auth = Auth(registry, self.credentials)
        self.watchdog = Watchdog(self.options.stall_timeout)
        self._sleep = sleep
        self.stats: dict[str, int] = {"retries": 0, "resumed_uploads": 0, "restarted_uploads": 0,
                                      "resumed_downloads": 0}

    def _url(self, path_or_url: str) -> str:
        return join_url(self.base + "/", path_or_url)

    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        """A connection for ``url`` (not yet opened); a URL a registry or token realm made up is checked first."""
        try:
            parts = urllib.parse.urlsplit(url)
            netloc = parts.netloc
            parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
        except ValueError as e:
            raise RegistryError(f"{url[:200]!r}: not a usable URL ({e})") from e
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not netloc or re.search(r"[\x00-\x20\x7f]", netloc + target):
            raise RegistryError(f"{url[:200]!r}: not a usable URL")
        # NOTE: the socket timeout is the stall timeout too: a connect or a read that waits that long is a stall
        timeout = min(self.options.timeout, self.options.stall_timeout)
        if parts.scheme == "https":
            context = self._ssl or ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(netloc, timeout=timeout, context=context)
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(netloc, timeout=timeout)
        else:
            raise RegistryError(f"{url[:200]!r}: unsupported URL scheme")
        return conn, target

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | memoryview | None) -> Reply:
        conn, target = self._connect(url)
        watch = self.watchdog.watch(conn)
        sent: bytes | memoryview | Iterator[memoryview] | None = body
        all_headers = {"User-Agent": USER_AGENT, **headers}
        if body is not None and len(body) > STALL_PIECE:  # sent in slices, so a slow reader is seen progressing
            sent = _pieces(body, watch)
            all_headers["Content-Length"] = str(len(body))
        try:
            conn.connect()
            watch.sock = conn.sock
            conn.request(method, target, body=sent, headers=all_headers)
            watch.progress()
            response = conn.getresponse()
            watch.progress()
        except BaseException as e:
            self.watchdog.release(watch)
            conn.close()
            if isinstance(e, OSError | http.client.HTTPException) and (watch.stalled or isinstance(e, TimeoutError)):
                raise StallError(
                    f"{method} {url}: no answer within {self.options.stall_timeout:g} s (less than "
                    f"{STALL_PIECE // 1024} KiB moved); the registry stalled (--stall-timeout SECONDS sets the limit)"
                ) from e
            # http.client refuses a header value a registry made up (CR/LF ...); an SSL error is a ValueError too
            if isinstance(e, ValueError) and not isinstance(e, OSError):
                raise RegistryError(f"{method} {url}: cannot send the request: {e}") from e
            raise
        return Reply(conn, response, url, watch, self.watchdog, method)

    def _backoff(self, attempt: int, reply: Reply | None = None) -> None:
        delay = min(self.options.backoff * (2**attempt), self.options.max_backoff)
        if reply is not None:
            after = decimal_header(reply.header("Retry-After"))
            if after is not None:
                delay = min(float(after), self.options.max_backoff)
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
                url = join_url(url, reply.header("Location") or "")
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
            except (OSError, http.client.HTTPException) as e:  # (a stall is a StallError, never retried)
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


__all__ = ["STALL_PIECE", "Reply", "Session", "StallError", "Watchdog", "decimal_header", "join_url"]
