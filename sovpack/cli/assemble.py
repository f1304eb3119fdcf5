"""``sovpack assemble``: signed parts built on separate runners joined into one signed bundle."""

from __future__ import annotations

import time
from pathlib import Path

import click

from sovpack.cli._app import cli, echo_json
from sovpack.cli.bundle import stages
from sovpack.cli.transfer import BUNDLE, current_registry_options, registry_options


@cli.command()
@click.argument("destination", type=BUNDLE)
@click.option("--from", "parts", multiple=True, required=True, type=BUNDLE, metavar="BUNDLE",
              help="A part: a signed bundle (directory, oci-archive:FILE.tar or docker://...). Repeatable.")
@click.option("--key", required=True, type=click.Path(path_type=Path),
              help="Private key (PEM) that signs the assembled release; parts signed by its public half are trusted.")
@click.option("--password-file", type=click.Path(path_type=Path), help="File holding the key's password.")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the key's password.")
@click.option("--trust", "trusted", multiple=True, type=click.Path(path_type=Path), metavar="PUB.pem",
              help="Another public key the parts may be signed with (repeatable).")
@click.option("--tag", help="Tag of the assembled bundle (default: DESTINATION's docker:// tag, else latest).")
@click.option("--sequence", type=click.IntRange(min=0), help="Signed release sequence (default: the parts' highest).")
@click.option("--expires", metavar="TIME", help="Signed expiry, RFC 3339 UTC (default: the parts' earliest).")
@registry_options
@click.option("--force", is_flag=True, help="Replace a destination directory or archive holding another bundle.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def assemble(destination: str | Path, parts: tuple[str | Path, ...], key: Path, password_file: Path | None,
             password_env: str | None, trusted: tuple[Path, ...], tag: str | None, sequence: int | None,
             expires: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Join signed parts into one bundle at DESTINATION that verifies like a single-machine build.

    Each part (e.g. one target built and parity-checked on its own CI runner with `sovpack build --push`) is
    verified in full; all must come from the same checkpoint (every source file digest), parity prompts,
    parity reference, sovpack version and bundle name, with no target twice. Their targets and attestations
    are copied unchanged and a new release statement, signed with --key, ties them together. Verify the
    result with the public keys of every part's signer (sovpack verify DEST --key A.pem --key B.pem).

    \b
    Examples:
      sovpack assemble docker://reg.example/models/x:1.0 --key keys/private.pem \\
          --from docker://reg.example/models/x:1.0-onnx --from docker://reg.example/models/x:1.0-gguf
      sovpack assemble ./x-1.0 --tag 1.0 --key keys/private.pem --from oci-archive:onnx.tar --from ./gguf-part
    """
    from sovpack.attest.dsse import SigningKey, load_trusted_keys, read_password
    from sovpack.bundle.assemble import assemble_bundle

    signing_key = SigningKey.load(key, read_password(password_file, password_env))
    started = time.monotonic()
    with stages(quiet or as_json, "assemble") as progress:
        result = assemble_bundle(
            destination, parts, key=signing_key, trusted=load_trusted_keys(trusted), tag=tag, sequence=sequence,
            expires=expires, options=current_registry_options(), force=force, progress=progress,
        )
    elapsed = time.monotonic() - started
    if as_json:
        echo_json({**result.to_dict(), "seconds": round(elapsed, 1)})
        return
    click.echo(f"assembled {result.destination} (release {result.name} tag {result.tag} sequence {result.sequence}, "
               f"{len(result.targets)} targets from {len(result.parts)} parts, {elapsed:.1f} s), "
               f"signed with key {result.key_id[:16]}…")
    for part in result.parts:
        click.echo(f"  {', '.join(part.targets):<32} from {part.location} (tag {part.tag}, "
                   f"signed by {part.signer[:16]}…)")
    click.echo(f"bundle index {result.index_digest}")


__all__ = ["assemble"]
