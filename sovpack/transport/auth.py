"""How sovpack reaches and authenticates to a registry: options, credentials, and answering 401 challenges.

Credentials come from ``--creds``, then ``SOVPACK_REGISTRY_USERNAME``/``SOVPACK_REGISTRY_PASSWORD``, then the
``auths`` of ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``; credential helpers are not run).
A registry's 401 is answered with Basic (sent up front from then on) or a Bearer token fetched from the
challenge's realm for the challenge's (and our) scope.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sovpack._io import parse_json, read_json_file
from sovpack.errors import RegistryError, UsageError

DEFAULT_CHUNK = 16 * 1024 * 1024
ENV_USERNAME = "SOVPACK_REGISTRY_USERNAME"
ENV_PASSWORD = "SOVPACK_REGISTRY_PASSWORD"
MAX_TOKEN_ANSWER = 1024 * 1024
MAX_DOCKER_CONFIG = 4 * 1024 * 1024
DEFAULT_STALL_TIMEOUT = 60.0
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{1,16384}$")  # RFC 6750 b64token: safe inside a header


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
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds a request may move less than 64 KiB before it fails


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = ""

    def basic(self) -> str:
        """The ``Authorization`` header value for HTTP Basic."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


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
    if not path.exists():
        return None
    config = read_json_file(path, MAX_DOCKER_CONFIG, where=f"{path} (docker config)", error=UsageError)
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


# (token URL, request headers) -> (HTTP status, body): how Auth asks a token endpoint, without auth of its own
TokenFetch = Callable[[str, Mapping[str, str]], tuple[int, bytes]]


class Auth:
    """The auth state of one registry host: whether it wants Basic, and the Bearer tokens per scope."""

    def __init__(self, registry: str, credentials: Credentials | None) -> None:
        self.registry = registry
        self.credentials = credentials
        self._basic = False  # the registry asked for Basic: send it up front from now on
        self._tokens: dict[str, str] = {}  # scope -> bearer token

    def header(self, url: str, scope: str | None) -> dict[str, str]:
        """The ``Authorization`` header for a request to ``url`` (none for another host)."""
        try:
            netloc = urllib.parse.urlsplit(url).netloc
        except ValueError:
            return {}  # NOTE: a URL that does not parse gets no credentials (and is refused when it is connected to)
        if netloc != self.registry:
            return {}  # never send credentials to a redirect target on another host
        if scope is not None and scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.credentials is not None:
            return {"Authorization": self.credentials.basic()}
        return {}

    def answer(self, challenge: str | None, scope: str | None, url: str, fetch_token: TokenFetch) -> None:
        """Answer a 401: remember Basic, or fetch a Bearer token for the challenge's (and our) scope.

        Raises RegistryError when retrying cannot help (no credentials, refused credentials or token).
        """
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
            headers["Authorization"] = self.credentials.basic()
        status, body = fetch_token(token_url, headers)
        if status != 200:
            detail = "".join(c if c.isprintable() else " " for c in body[:200].decode("utf-8", "replace")).strip()
            raise RegistryError(f"token endpoint {realm}: HTTP {status} {detail}")
        data = parse_json(body, f"token endpoint {realm}: the answer", error=RegistryError)
        token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token endpoint {realm}: the answer holds no token")
        if not _TOKEN_RE.match(token):
            raise RegistryError(f"token endpoint {realm}: the token is not a bearer token (odd characters or too long)")
        key = scope or " ".join(scopes)
        if key in self._tokens and self._tokens[key] == token:
            raise RegistryError(f"{url}: the registry refused the token for {key!r} (insufficient access?)")
        self._tokens[key] = token


__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_STALL_TIMEOUT",
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "Auth",
    "Credentials",
    "RegistryOptions",
    "parse_challenge",
    "resolve_credentials",
]
