"""Bundle commands: ``build``, ``keygen``, ``verify``, ``extract``, ``parity`` (registered on ``sovpack.cli.cli``).

Each is a thin shell over sovpack.bundle / sovpack.attest.dsse / sovpack.verify: parse options, call one library
function, render a summary (or one JSON object with ``--json``). Failures are SovpackErrors: one line on
stderr, exit 1 (usage problems exit 2).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sovpack.cli._app import cli, echo_json, quantization_flags, quantization_options
from sovpack.cli.transfer import BUNDLE, current_registry_options, human_size, registry_options
from sovpack.errors import ParityError, VerificationError

if TYPE_CHECKING:
    from sovpack.verify.policy import Policy


# The steps of a target's conversion announced as stages too (their start splits "convert + parity").
_SUB_STAGES = (": calibration", ": quantization plan", ": parity")


def _is_stage(description: str) -> bool:
    """Build-level stages ("[2/3] gguf:q8_0: convert + parity", "parity reference", and a target's
    calibration, quantization plan and parity run), not per-tensor steps."""
    return (description.startswith("[") or description.startswith("parity reference")
            or description.endswith(_SUB_STAGES))


@contextmanager
def stages(quiet: bool, command: str = "build") -> Iterator[Callable[[str, int, int], None]]:
    """Progress on stderr: a line per build stage as it starts, plus (on a terminal) one live bar for the step."""
    if quiet:
        yield lambda _d, _c, _t: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    seen: set[str] = set()

    def announce(description: str) -> None:
        if _is_stage(description) and description not in seen:
            seen.add(description)
            console.print(f"sovpack {command}: {description}", highlight=False)

    if not sys.stderr.isatty():
        yield lambda description, _completed, _total: announce(description)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        transient=True,
    ) as bar:
        step = bar.add_task("starting", total=1)

        def update(description: str, completed: int, total: int) -> None:
            announce(description)
            bar.update(step, description=description, completed=completed, total=max(total, 1))

        yield update


# ------------------------------------------------------------------------------------------------- keygen


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Directory for the keys.")
@click.option("--password-file", type=click.Path(path_type=Path), help="Encrypt the private key with this password.")
@click.option("--password-env", metavar="VAR", help="Encrypt the private key with the password in $VAR.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def keygen(output: Path, password_file: Path | None, password_env: str | None, force: bool, as_json: bool) -> None:
    """Write an ECDSA P-256 signing key pair: OUTPUT/private.pem (0600) and OUTPUT/public.pem."""
    from sovpack.attest.dsse import generate_key_pair, read_password

    pair = generate_key_pair(output, password=read_password(password_file, password_env), force=force)
    if as_json:
        echo_json(pair.to_dict())
        return
    encrypted = "encrypted" if pair.encrypted else "unencrypted"
    click.echo(f"wrote {pair.private_key} ({encrypted}) and {pair.public_key}; key id {pair.key_id}")


# -------------------------------------------------------------------------------------------------- build


@cli.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Bundle directory (an OCI image layout).")
@click.option("-t", "--target", "targets", multiple=True, help="FORMAT:PRECISION to include (repeatable).")
@click.option("--key", type=click.Path(path_type=Path), help="Private signing key (PEM).")
@click.option("--password-file", type=click.Path(path_type=Path), help="File holding the key's password.")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the key's password.")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path), help="A sovpack.toml build config.")
@click.option("--name", help="Bundle name (default: the checkpoint's name).")
@click.option("--tag", help="OCI tag of the bundle (default: latest).")
@click.option("--license", "licenses", multiple=True, help="SPDX license of the model (repeatable).")
@click.option("--sequence", type=click.IntRange(min=0), help="Release sequence number (signed; default 0).")
@click.option("--expires", metavar="TIME", help="Signed expiry, RFC 3339 UTC (e.g. 2027-12-31T00:00:00Z).")
@click.option("--prompt", "prompts", multiple=True, help="Parity prompt (repeatable; replaces the built-ins).")
@click.option("--threshold", "thresholds", multiple=True, help="Parity threshold override for all targets: NAME=VALUE.")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights that contain NaN or Inf.")
@quantization_options
@click.option("--push", type=BUNDLE, metavar="DEST",
              help="Then copy the signed bundle to DEST (docker://HOST/REPO:TAG, oci-archive:FILE.tar or a "
                   "directory) as `sovpack copy` does; a docker:// tag is the bundle's tag. Without -o the "
                   "bundle is built in a temporary directory.")
@click.option("--reference-from", metavar="BUNDLE", type=BUNDLE,
              help="Judge parity against this signed bundle's stored reference (same checkpoint and prompts) "
                   "instead of computing it: parts built on different machines then share one reference.")
@click.option("--reuse-from", metavar="BUNDLE", type=BUNDLE,
              help="Like --reference-from, and carry over its targets whose inputs are unchanged (same sovpack, "
                   "name and options) instead of rebuilding them; a bundle of other inputs only means no reuse.")
@click.option("--trust", "trusted", multiple=True, type=click.Path(path_type=Path), metavar="PUB.pem",
              help="A public key the --reference-from/--reuse-from bundle may be signed with (repeatable; "
                   "the public half of --key is always trusted).")
@registry_options
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def build(
    checkpoint: Path | None,
    output: Path | None,
    targets: tuple[str, ...],
    key: Path | None,
    password_file: Path | None,
    password_env: str | None,
    config_path: Path | None,
    name: str | None,
    tag: str | None,
    licenses: tuple[str, ...],
    sequence: int | None,
    expires: str | None,
    prompts: tuple[str, ...],
    thresholds: tuple[str, ...],
    allow_nonfinite: bool,
    quant_method: str | None,
    group_size: int | None,
    symmetric: bool | None,
    calibration: Path | None,
    int8_share: float | None,
    push: str | Path | None,
    reference_from: str | Path | None,
    reuse_from: str | Path | None,
    trusted: tuple[Path, ...],
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Convert CHECKPOINT to every target, check parity on each runtime, and write one signed OCI bundle.

    \b
    Examples:
      sovpack build ./ckpt -o model.oci -t onnx:fp16 -t gguf:q8_0 -t openvino:fp16 --key keys/private.pem
      sovpack build --config sovpack.toml
      sovpack build ./ckpt -t onnx:int4 --key keys/private.pem --push docker://registry.example/models/x:1.0-onnx
      sovpack build ./ckpt -t gguf:q4_k_m --key keys/private.pem --reference-from docker://reg.example/models/x:1.0-onnx
    """
    import dataclasses

    from sovpack.attest.dsse import SigningKey, load_trusted_keys, read_password
    from sovpack.bundle.config import BuildConfig, BundleMetadata, load_build_config
    from sovpack.bundle.publish import publish_build
    from sovpack.errors import UsageError
    from sovpack.parity import parse_threshold_overrides
    from sovpack.quantize.options import QuantOptions

    config = load_build_config(config_path) if config_path is not None else BuildConfig()
    updates: dict[str, Any] = {}
    for field_name, value in (
        ("checkpoint", checkpoint), ("output", output), ("key", key), ("tag", tag), ("sequence", sequence),
        ("expires", expires),
    ):
        if value is not None:
            updates[field_name] = value
    if targets:
        updates["targets"] = targets
    if prompts:
        updates["prompts"] = prompts
    if thresholds:
        updates["thresholds"] = {**config.thresholds, **parse_threshold_overrides(thresholds)}
    if allow_nonfinite:
        updates["allow_nonfinite"] = True
    if password_file is not None or password_env is not None:
        updates["password_file"], updates["password_env"] = password_file, password_env
    quant_flags = quantization_flags(quant_method, group_size, symmetric, calibration, int8_share)
    if quant_flags:  # flags win over the file's [quantization] table and over its per-target tables
        updates["quantization"] = dataclasses.replace(config.quantization or QuantOptions(), **quant_flags)
        updates["target_quantization"] = {t: dataclasses.replace(q, **quant_flags)
                                          for t, q in config.target_quantization.items()}
    updates["metadata"] = config.metadata.merged(BundleMetadata(name=name, licenses=licenses))
    config = dataclasses.replace(config, **updates)
    if config.key is None:
        raise UsageError("no signing key: pass --key KEY.pem (or 'key' under [signing] in the config file)")
    if reference_from is not None and reuse_from is not None:
        raise UsageError("--reference-from and --reuse-from are exclusive (--reuse-from also shares the reference)")
    signing_key = SigningKey.load(config.key, read_password(config.password_file, config.password_env))
    started = time.monotonic()
    with stages(quiet) as progress:
        published = publish_build(
            config, key=signing_key, push=push, earlier=reuse_from or reference_from, reuse=reuse_from is not None,
            trusted=load_trusted_keys(trusted), options=current_registry_options(), force=force, progress=progress)
    elapsed = time.monotonic() - started
    if as_json:
        echo_json({**published.to_dict(), "seconds": round(elapsed, 1)})
        return
    result = published.build
    where = f"wrote {result.output}" if published.kept else "built"
    click.echo(
        f"{where} (tag {result.tag}, {human_size(result.size)}, {elapsed:.1f} s), "
        f"signed with key {result.key_id[:16]}…"
    )
    if result.reference_from is not None:
        click.echo(f"parity reference from {result.reference_from}")
    for target in result.targets:
        reused = f"  (reused from {target.reused_from})" if target.reused_from else ""
        click.echo(f"  {target.target:<16} {target.parity:<7} {human_size(target.size):>10}  {target.manifest_digest}"
                   f"{reused}")
    if published.pushed is not None:
        click.echo(f"pushed to {published.pushed.destination}: bundle index {published.pushed.digest}")


# ------------------------------------------------------------------------------------------------- verify


def _policy(policy_path: Path | None) -> Policy | None:
    from sovpack.verify import Policy

    return Policy.load(policy_path) if policy_path is not None else None


@cli.command()
@click.argument("bundle", type=BUNDLE)
@registry_options
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path), help="Trusted public key (repeatable).")
@click.option("--require-target", "required", multiple=True, help="A target that must be present and valid.")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy file (JSON or TOML).")
@click.option("--tag", help="Which tagged bundle of the layout (default: the only one); must be the signed tag.")
@click.option("--trust-state", type=click.Path(path_type=Path),
              help="Local file remembering the newest release seen per bundle name; older ones are refused.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (also on failure).")
def verify(
    bundle: Path, keys: tuple[Path, ...], required: tuple[str, ...], policy_path: Path | None, tag: str | None,
    trust_state: Path | None, as_json: bool,
) -> None:
    """Verify every blob, manifest, signature, provenance and parity attestation of BUNDLE.

    Exit 0 when everything checks out, 1 with the reason (which blob, target and check) otherwise. Parity
    WARNED is accepted unless the policy's allowed_parity says otherwise.
    """
    from sovpack.transport import bundle_location
    from sovpack.verify import verify_with_policy

    with bundle_location(bundle, current_registry_options()) as source:
        report = verify_with_policy(
            source, key_paths=keys, policy=_policy(policy_path), required_targets=required, tag=tag,
            trust_state=trust_state,
        )
    if as_json:
        echo_json(report.to_dict())
    else:
        for target in report.targets:
            signers = ", ".join(s[:16] + "…" for s in target.signers) or "none"
            parity = target.parity or "?"
            signed = report.release.target(target.name) if report.release is not None else None
            part = f"  (built in part {signed.part.tag})" if signed is not None and signed.part is not None else ""
            click.echo(f"{target.name:<16} parity {parity:<7} signed by {signers}  {target.manifest_digest}{part}")
        if report.ok and report.release is not None:
            release = report.release
            click.echo(f"OK: {report.path}: release {release.name} tag {release.tag} sequence {release.sequence} "
                       f"({len(report.targets)} targets, {report.blobs_checked} blobs, "
                       f"{human_size(report.bytes_checked)} checked)")
    report.raise_for_failures()


# ------------------------------------------------------------------------------------------------ extract


@cli.command()
@click.argument("bundle", type=BUNDLE)
@registry_options
@click.option("-t", "--target", help="The target to extract, e.g. gguf:q8_0 (default: the one a per-target tag "
              "names, or the bundle's only target).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path), help="Trusted public key (repeatable).")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy file (JSON or TOML).")
@click.option("--tag", help="Which tagged bundle of the layout (default: the only one).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def extract(
    bundle: Path, target: str | None, output: Path, keys: tuple[Path, ...], policy_path: Path | None, tag: str | None,
    force: bool, as_json: bool,
) -> None:
    """Verify BUNDLE, then write one target's runnable files and its model-signing signature (model.sig).

    BUNDLE may be opened by a per-target tag (docker://REG/REPO:1.0-gguf-q4_k_m, or --tag 1.0-gguf-q4_k_m): the
    whole bundle it belongs to is verified and that target extracted. The directory then verifies with:
    model_signing verify key --signature DIR/model.sig --public_key PUB DIR
    """
    from sovpack.attest.dsse import load_trusted_keys
    from sovpack.transport import local_bundle, target_of_tag
    from sovpack.verify import Policy, extract_target

    policy = (_policy(policy_path) or Policy()).narrowed(key_paths=keys, tag=tag)
    with local_bundle(bundle, current_registry_options()) as local:
        target = target or target_of_tag(bundle, local, policy.tag)
        result = extract_target(
            local, target, output, keys=load_trusted_keys(policy.keys), tag=policy.tag, policy=policy, force=force
        )
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"{result.target}: wrote {result.out_dir} ({len(result.files)} files + {result.signature.name})")


# ------------------------------------------------------------------------------------------------- parity


@cli.command("parity")
@click.argument("bundle", type=BUNDLE)
@registry_options
@click.option("-t", "--target", "targets", multiple=True, help="Target to re-check (repeatable; default all).")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path), help="Trusted public key (repeatable).")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy file (JSON or TOML).")
@click.option("--tag", help="Which tagged bundle of the layout (default: the only one).")
@click.option("--insecure", is_flag=True, help="Run without a key: nothing is verified (integrity only).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def parity_command(bundle: Path, targets: tuple[str, ...], keys: tuple[Path, ...], policy_path: Path | None,
                   tag: str | None, insecure: bool, as_json: bool) -> None:
    """Re-run parity of BUNDLE's targets on this machine's runtimes, against the reference stored in it.

    No checkpoint needed: the bundle carries the prompts' token ids, the reference greedy tokens and logits.
    With --key the bundle is verified first and the result is compared with the signed report.
    """
    from sovpack.attest.dsse import load_trusted_keys
    from sovpack.transport import local_bundle, target_of_tag
    from sovpack.verify import Policy, recheck_parity

    policy = (_policy(policy_path) or Policy()).narrowed(key_paths=keys, tag=tag)
    with local_bundle(bundle, current_registry_options()) as local:
        named = target_of_tag(bundle, local, policy.tag)
        targets = targets or ((named,) if named is not None else ())
        results = recheck_parity(
            local, targets=targets, keys=load_trusted_keys(policy.keys), tag=policy.tag, policy=policy,
            insecure=insecure,
        )
    if as_json:
        echo_json({"ok": all(r.ok for r in results), "targets": [r.to_dict() for r in results]})
    else:
        if results and not results[0].signature_verified:
            click.echo("UNVERIFIED: no --key, so nothing about these files was verified; the stored report's status "
                       "is only what the file claims", err=True)
        for r in results:
            if r.signature_verified:
                change = f" (signed: {r.signed_status})" if r.changed else ""
            else:
                change = f" (unverified report claims: {r.signed_status})" if r.changed else ""
            click.echo(f"{r.target:<16} {r.status}{change} on {r.runtime.get('runtime', '?')}")
            for line in [*r.reasons, *r.report.notes]:
                click.echo(f"  {line}")
    failed = [r.target for r in results if not r.ok]
    if failed:
        raise ParityError(f"{bundle}: parity re-check FAILED for {', '.join(failed)}")


def embedding_summary(encoder: dict[str, Any] | None) -> str:
    """", 384 dimensions, mean pooling, normalize True, max_seq_length 256" for an encoder; "" for a decoder."""
    if not encoder:
        return ""
    return (f", {encoder['dimension']} dimensions, {encoder['pooling']} pooling, normalize {encoder['normalize']}, "
            f"max_seq_length {encoder['max_seq_length']}")


def render_bundle_info(info: dict[str, Any]) -> None:
    """``sovpack inspect BUNDLE`` as text (the JSON form is the dict itself); digests are never shortened."""
    signed = info.get("signed")
    if signed:
        version = f", version {signed['version']}" if signed.get("version") else ""
        licenses = f", licences {' AND '.join(signed['licenses'])}" if signed.get("licenses") else ""
        click.echo(
            f"bundle {signed['name']} (tag {signed['tag']}, sequence {signed['sequence']}{version}{licenses}), "
            f"{human_size(info['size'])}; release signed by {str(signed['signer'])[:16]}…"
        )
    else:
        unsigned = info.get("unsigned") or {}
        click.echo(
            f"bundle {unsigned.get('name')} (tag {unsigned.get('tag')}), {human_size(info['size'])} — UNSIGNED: "
            "name, tag and annotations are not verified (pass --key PUB.pem to check the signed release)"
        )
    click.echo(f"index {info['index_digest']}")
    for t in info["targets"]:
        parity = (t.get("parity") or {}).get("status", "?")
        signers = ", ".join(s[:16] + "…" for s in t["signers"]) or "none"
        click.echo(
            f"  {t['name']:<16} {t['precision']:<8} {human_size(t['size']):>10}  parity {parity:<7} "
            f"signers (unverified) {signers}"
        )
        click.echo(f"  {'':<16} manifest {t['manifest_digest']}")
        if t.get("model"):
            click.echo(f"  {'':<16} {t['model']} ({t.get('family')}){embedding_summary(t.get('encoder'))}")
    for problem in info.get("problems", []):
        click.echo(f"problem: {problem}")


__all__ = [
    "VerificationError", "build", "extract", "keygen", "parity_command", "render_bundle_info", "stages", "verify",
]
