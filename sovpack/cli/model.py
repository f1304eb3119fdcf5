"""Commands on checkpoints and artifact directories: inspect, run, convert, targets."""

from __future__ import annotations

from pathlib import Path

import click

from sovpack.cli._app import cli, echo_json, progress_bar
from sovpack.cli.transfer import BUNDLE, current_registry_options, registry_options
from sovpack.errors import SovpackError, UsageError


@cli.command()
@click.argument("path", type=BUNDLE)
@registry_options
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="For a bundle: check the signed release with this public key and report its facts as signed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Describe a checkpoint, artifact directory or bundle (directory, oci-archive: or docker:// reference).

    A bundle's name, tag and licences are reported as signed only with --key; without, they are marked unsigned.
    """
    from sovpack.attest.dsse import load_trusted_keys
    from sovpack.inspection import inspect_path
    from sovpack.transport import bundle_location
    from sovpack.verify import inspect_bundle

    trusted = load_trusted_keys(keys)
    with bundle_location(path, current_registry_options()) as source:
        info = inspect_path(source, keys=trusted) if isinstance(source, Path) else inspect_bundle(source, keys=trusted)
    if as_json:
        echo_json(info)
        return
    if info.get("kind") == "bundle":
        from sovpack.cli.bundle import render_bundle_info

        render_bundle_info(info)
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key in ("kind", "name", "family", "architecture", "target", "parameters", "dtypes", "size"):
        if info.get(key) is not None:
            table.add_row(key, str(info[key]))
    if info.get("parity"):
        table.add_row("parity", str(info["parity"]["status"]))
    if info.get("spec"):
        spec = info["spec"]
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "rope_theta", "activation"):
            table.add_row(f"  {key}", str(spec[key]))
        if spec.get("rope_scaling", {}).get("kind", "none") != "none":
            table.add_row("  rope_scaling", str(spec["rope_scaling"]))
    for f in info.get("files", []):
        table.add_row("file", f"{f['path']} ({f['size']} bytes)")
    for f in info.get("source_files", []):
        table.add_row("source", f"{f['path']} sha256:{f['sha256'][:16]}… ({f['size']} bytes)")
    from rich.console import Console

    Console().print(table)


def _check_logits_out(logits_out: Path, source: Path | str) -> None:
    """Refuse, before running anything, a --logits-out that is a directory or would overwrite the input."""
    from sovpack._io import check_not_input

    if logits_out.is_dir():
        raise UsageError(f"{logits_out}: --logits-out names a directory; give a file name such as logits.npy")
    if isinstance(source, Path) and source.exists():
        check_not_input(logits_out, [source])


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UsageError(f"--ids must be comma-separated integers, got {text!r}") from None


@cli.command()
@click.argument("path", type=BUNDLE)
@registry_options
@click.option("--prompt", help="Text prompt, encoded with the model's tokenizer.json.")
@click.option("--ids", help="Comma-separated prompt token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(0, 4096))
@click.option("--logits-out", type=click.Path(path_type=Path), help="Save prefill logits [tokens, vocab] as .npy.")
@click.option("-t", "--target", help="For a bundle: which target to run, e.g. gguf:q8_0.")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="Trusted public key: a bundle is verified, an extracted directory checked against its model.sig.")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy file (JSON or TOML).")
@click.option("--insecure", is_flag=True, help="Run a bundle without a key (nothing is verified).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def run(path: Path, prompt: str | None, ids: str | None, max_new_tokens: int, logits_out: Path | None,
        target: str | None, keys: tuple[Path, ...], policy_path: Path | None, insecure: bool, as_json: bool) -> None:
    """Greedy-generate from a checkpoint (numpy reference), an artifact directory or a bundle (its runtime).

    With --key, a bundle is verified and an extracted directory is checked against its model.sig before anything
    is loaded (and only a private, hashed copy is run); without, a bundle needs --insecure.
    """
    from sovpack.attest.dsse import load_trusted_keys
    from sovpack.run import run as run_model
    from sovpack.transport import local_bundle
    from sovpack.verify import Policy

    if logits_out is not None:
        _check_logits_out(logits_out, path)
    policy = Policy.load(policy_path).narrowed(key_paths=keys) if policy_path is not None else None
    trusted = load_trusted_keys(policy.keys if policy is not None else keys)
    with local_bundle(path, current_registry_options()) as local:
        result = run_model(
            local, prompt=prompt, ids=_parse_ids(ids) if ids is not None else None, max_new_tokens=max_new_tokens,
            target=target, keys=trusted, policy=policy, insecure=insecure,
        )
    if result.verified is False:
        click.echo(f"warning: {path}: nothing was verified (no --key): running the files as they are", err=True)
    if logits_out is not None:
        import io

        import numpy as np

        from sovpack._io import atomic_write_bytes

        buffer = io.BytesIO()
        np.save(buffer, result.logits.astype(np.float32))
        try:
            atomic_write_bytes(logits_out, buffer.getvalue())
        except OSError as e:  # full, read-only, no permission: nothing is left behind by atomic_write_bytes
            raise SovpackError(f"{logits_out}: cannot write the logits: {e.strerror or e}") from e
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.text if result.text is not None else " ".join(map(str, result.generated_ids)))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target", required=True, help="FORMAT:PRECISION, e.g. onnx:fp16, gguf:q8_0.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--no-parity", is_flag=True, help="Skip the parity check on the target runtime.")
@click.option("--prompt", "prompts", multiple=True, help="Extra parity prompt (repeatable; replaces built-ins).")
@click.option("--threshold", "thresholds", multiple=True, help="Override a parity threshold: NAME=VALUE.")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights that contain NaN or Inf.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert(checkpoint: Path, target: str, output: Path, no_parity: bool, prompts: tuple[str, ...],
            thresholds: tuple[str, ...], allow_nonfinite: bool, force: bool, as_json: bool) -> None:
    """Convert a checkpoint into one runnable artifact directory and check parity on its runtime."""
    from sovpack.convert import convert as convert_model
    from sovpack.parity import parse_threshold_overrides

    with progress_bar(not as_json) as progress:
        result = convert_model(
            checkpoint, target, output, parity=not no_parity, prompts=prompts,
            threshold_overrides=parse_threshold_overrides(thresholds), allow_nonfinite=allow_nonfinite, force=force,
            progress=progress,
        )
    report = result.parity
    lines = [] if report is None else [*report.reasons, *report.notes]
    summary = {
        "target": result.target,
        "output": str(result.out_dir),
        "files": list(result.files),
        "parity": None if result.parity is None else result.parity.status,
        "reasons": [] if result.parity is None else list(result.parity.reasons),
        "notes": [] if result.parity is None else list(result.parity.notes),
    }
    if as_json:
        echo_json(summary)
        return
    parity = summary["parity"] or "skipped"
    click.echo(f"{result.target}: wrote {result.out_dir} ({len(result.files)} files), parity {parity}")
    for line in lines:
        click.echo(f"  {line}")


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_targets(as_json: bool) -> None:
    """List the output formats and their precisions."""
    from sovpack.targets import TARGETS
    data = {name: {"precisions": list(t.precisions), "default": t.default_precision} for name, t in TARGETS}
    if as_json:
        echo_json(data)
        return
    for name, info in data.items():
        click.echo(f"{name}: {', '.join(info['precisions'])} (default {info['default']})")
