"""Registry options shared by every command that takes a bundle, and the ``sovpack copy`` command.

A BUNDLE argument is a layout directory, ``oci-archive:FILE.tar`` or ``docker://HOST[:PORT]/REPO[:TAG]``.
``@registry_options`` adds ``--plain-http``, ``--ca-file``, ``--creds`` and ``--stall-timeout`` to a command
without changing its signature (values go to the click context; ``current_registry_options()`` reads them),
so the same options work on ``copy``, ``verify``, ``inspect``, ``extract``, ``run`` and ``parity``. Those
commands may stage a bundle in a temporary directory, so ``@registry_options`` also turns SIGTERM into a normal
exit while they run: the staging directory is removed whichever way the command ends (short of SIGKILL).

Credentials, first match wins: ``--creds USER:PASS``; ``SOVPACK_REGISTRY_USERNAME`` +
``SOVPACK_REGISTRY_PASSWORD``; the registry's ``auths`` entry in ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``, as ``docker login`` writes it; credential helpers are not run).
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from sovpack.cli._app import cli
from sovpack.transport.auth import DEFAULT_CHUNK, DEFAULT_STALL_TIMEOUT, RegistryOptions

F = TypeVar("F", bound=Callable[..., Any])
_META_KEY = "sovpack.registry_options"


class BundleArgument(click.ParamType):
    """A bundle location: ``docker://`` and ``oci-archive:`` stay strings (a Path would eat the ``//``)."""

    name = "BUNDLE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | Path:
        if isinstance(value, Path):
            return value
        text = str(value)
        if "://" in text or text.startswith(("oci-archive:", "oci:")):
            return text  # sovpack.transport.parse_endpoint decides (and names an unknown transport)
        return Path(text)


BUNDLE = BundleArgument()


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if param.name is not None:
        ctx.meta.setdefault(_META_KEY, {})[param.name] = value
    return value


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm(func: F) -> F:
    """Run ``func`` with SIGTERM raising SystemExit, so ``finally`` blocks (staging clean-up) run on ``kill``.

    Only from the main thread, and only where SIGTERM still has its default action (an embedding program's
    own handler is left alone).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        ):
            return func(*args, **kwargs)
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return func(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper  # type: ignore[return-value]


def registry_options(func: F) -> F:
    """Add ``--plain-http``, ``--ca-file``, ``--creds`` and ``--stall-timeout`` (read back with
    ``current_registry_options``); SIGTERM ends the command through its clean-up (see the module docstring)."""
    # NOTE: wrapped before the options are attached, so click reads them from the wrapper itself
    func = _exit_cleanly_on_sigterm(func)
    decorators = [
        click.option("--plain-http", is_flag=True, expose_value=False, callback=_remember,
                     help="Talk to docker:// registries over plain HTTP (no TLS), e.g. a loopback registry."),
        click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), expose_value=False,
                     callback=_remember, help="PEM bundle of the CA(s) that signed the registry's TLS certificate."),
        click.option("--creds", metavar="USER:PASS", expose_value=False, callback=_remember,
                     help="Registry credentials (else SOVPACK_REGISTRY_USERNAME/_PASSWORD, else docker config)."),
        click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                     default=DEFAULT_STALL_TIMEOUT, show_default=True, expose_value=False, callback=_remember,
                     help="Fail a registry request that moves less than 64 KiB in this many seconds."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def current_registry_options(**overrides: Any) -> RegistryOptions:
    """The registry options of the running command (defaults outside a click command)."""
    ctx = click.get_current_context(silent=True)
    values: dict[str, Any] = dict(ctx.meta.get(_META_KEY, {})) if ctx is not None else {}
    stall = values.get("stall_timeout")
    return RegistryOptions(
        plain_http=bool(values.get("plain_http")),
        ca_file=values.get("ca_file"),
        creds=values.get("creds"),
        stall_timeout=DEFAULT_STALL_TIMEOUT if stall is None else float(stall),
        **overrides,
    )


def human_size(size: int) -> str:
    """A byte count for people: 512 B, 1.5 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _stderr_progress(quiet: bool) -> Callable[[str, int, int], None]:
    """One line per stage on a terminal's stderr; silent otherwise."""
    if quiet or not sys.stderr.isatty():
        return lambda _d, _c, _t: None
    last: dict[str, str] = {}

    def update(description: str, completed: int, total: int) -> None:
        text = f"{description} {completed}/{total}" if total else f"{description} {human_size(completed)}"
        if last.get("text") != text:
            last["text"] = text
            click.echo(f"\r\x1b[K{text}", err=True, nl=False)

    return update


@cli.command("copy")
@click.argument("source", type=BUNDLE)
@click.argument("destination", type=BUNDLE)
@registry_options
@click.option("--force", is_flag=True, help="Replace a destination directory or archive holding another bundle.")
@click.option("--chunk-size", type=click.IntRange(1, 4096), default=DEFAULT_CHUNK // (1024 * 1024), show_default=True,
              help="Upload chunk size in MiB (blobs up to one chunk go in a single request).")
@click.option("--retries", type=click.IntRange(0, 100), default=6, show_default=True,
              help="Retries per request on connection errors, 5xx and 429 (exponential backoff).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def copy_command(source: str | Path, destination: str | Path, force: bool, chunk_size: int, retries: int,
                 quiet: bool, as_json: bool) -> None:
    """Copy a bundle: SOURCE and DESTINATION are each a directory, oci-archive:FILE.tar or docker://HOST/REPO:TAG.

    Every blob is checked against its digest before it lands. A directory gets index.json last (an
    interrupted copy never looks complete; run it again to continue); a registry gets the tag last. An
    oci-archive tar is deterministic (sorted entries, fixed times and owners): carry it into an air-gapped
    site, then `sovpack copy oci-archive:FILE.tar DIR` or straight to the site's registry; only the blobs the
    bundle references are imported from it.

    The bundle keeps the tag it was built (and signed) with: a docker:// DESTINATION may leave the tag out
    (it gets the bundle's own) or name that same tag; another tag is refused (rebuild with --tag NEW).

    \b
    Examples:
      sovpack copy ./bundle docker://registry.example:5000/models/llama3:v1
      sovpack copy docker://registry.example:5000/models/llama3:v1 oci-archive:llama3-v1.tar
      sovpack copy oci-archive:llama3-v1.tar docker://127.0.0.1:5000/llama3:v1 --plain-http
    """
    from sovpack.transport import copy_bundle

    options = current_registry_options(chunk_size=chunk_size * 1024 * 1024, retries=retries)
    result = copy_bundle(source, destination, options=options, force=force, progress=_stderr_progress(quiet or as_json))
    if not quiet and not as_json and sys.stderr.isatty():
        click.echo("\r\x1b[K", err=True, nl=False)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    moved = f"{result.blobs_transferred} blobs copied ({human_size(result.bytes_transferred)})"
    if result.blobs_mounted:
        moved += f", {result.blobs_mounted} mounted"
    if result.blobs_skipped:
        moved += f", {result.blobs_skipped} already there"
    tag = f":{result.tag}" if result.tag else ""
    click.echo(f"copied {result.source} -> {result.destination} ({moved}, {result.manifests} manifests, "
               f"{result.seconds:.1f} s)")
    click.echo(f"bundle index {result.digest}{' tagged ' + tag.lstrip(':') if tag else ''}")
    if result.referrer_tags:
        click.echo(f"referrers: {len(result.referrer_tags)} fallback tag(s) (the registry has no referrers API)")
    if result.blobs_unreferenced:
        click.echo(f"skipped {result.blobs_unreferenced} blob(s) of the archive that the bundle does not reference "
                   "(not part of what was signed; not imported)")


__all__ = ["BUNDLE", "BundleArgument", "copy_command", "current_registry_options", "registry_options"]
