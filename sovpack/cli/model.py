"""Commands on checkpoints and artifact directories: inspect, run, convert, targets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sovpack.cli._app import cli, echo_json, progress_bar, quantization_flags, quantization_options
from sovpack.cli.transfer import BUNDLE, current_registry_options, registry_options
from sovpack.errors import SovpackError, UsageError

if TYPE_CHECKING:
    from sovpack.run import EmbedResult


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
    from sovpack.inspection import inspect_bundle_models, inspect_path
    from sovpack.transport import bundle_location

    trusted = load_trusted_keys(keys)
    with bundle_location(path, current_registry_options()) as source:
        info = (inspect_path(source, keys=trusted) if isinstance(source, Path)
                else inspect_bundle_models(source, keys=trusted))
    if as_json:
        echo_json(info)
        return
    if info.get("kind") == "bundle":
        from sovpack.cli.bundle import render_bundle_info

        render_bundle_info(info)
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key in ("kind", "name", "family", "model", "architecture", "target", "parameters", "dtypes", "size"):
        if info.get(key) is not None:
            table.add_row(key, str(info[key]))
    encoder = info.get("encoder")
    if encoder:
        table.add_row("embedding", f"{encoder['dimension']} dimensions")
        for key in ("pooling", "normalize", "max_seq_length"):
            table.add_row(f"  {key}", str(encoder[key]))
    if info.get("parity"):
        table.add_row("parity", str(info["parity"]["status"]))
    if info.get("spec"):
        spec = info["spec"]
        keys_shown = (("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                       "max_position_embeddings", "activation") if encoder else
                      ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "intermediate_size", "rope_theta", "activation"))
        for key in keys_shown:
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
@click.option("--prompt", help="Text prompt, encoded with the model's tokenizer.json (decoders).")
@click.option("--ids", help="Comma-separated prompt token ids, e.g. 1,2,3 (decoders).")
@click.option("--text", "texts", multiple=True,
              help="A text to embed (embedding encoders; repeatable): prints the cosine similarity matrix.")
@click.option("--vectors", is_flag=True, help="With --text --json: include the embedding vectors.")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(0, 4096))
@click.option("--logits-out", type=click.Path(path_type=Path), help="Save prefill logits [tokens, vocab] as .npy.")
@click.option("-t", "--target", help="For a bundle: which target to run, e.g. gguf:q8_0.")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="Trusted public key: a bundle is verified, an extracted directory checked against its model.sig.")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), help="Policy file (JSON or TOML).")
@click.option("--insecure", is_flag=True, help="Run a bundle without a key (nothing is verified).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def run(path: Path, prompt: str | None, ids: str | None, texts: tuple[str, ...], vectors: bool, max_new_tokens: int,
        logits_out: Path | None, target: str | None, keys: tuple[Path, ...], policy_path: Path | None,
        insecure: bool, as_json: bool) -> None:
    """Run a checkpoint (numpy reference), an artifact directory or a bundle (its runtime).

    A decoder greedy-generates from --prompt or --ids; an embedding encoder embeds each --text and prints the
    embeddings' shape, pooling and the texts' cosine similarity matrix.

    With --key, a bundle is verified and an extracted directory is checked against its model.sig before anything
    is loaded (and only a private, hashed copy is run); without, a bundle needs --insecure.
    """
    from sovpack.attest.dsse import load_trusted_keys
    from sovpack.transport import local_bundle, target_of_tag
    from sovpack.verify import Policy

    if not texts and prompt is None and ids is None:
        raise UsageError("give --prompt or --ids (a decoder generates), or --text (an embedding encoder embeds)")
    if texts and (prompt is not None or ids is not None):
        raise UsageError("--text embeds with an embedding encoder, --prompt/--ids generate with a decoder: give one")
    if texts and logits_out is not None:
        raise UsageError("--logits-out saves a decoder's logits; an embedding run (--text) has none")
    if vectors and not (texts and as_json):
        raise UsageError("--vectors adds the embedding vectors to the JSON of an embedding run: use it with --text "
                         "and --json")
    if logits_out is not None:
        _check_logits_out(logits_out, path)
    policy = Policy.load(policy_path).narrowed(key_paths=keys) if policy_path is not None else None
    trusted = load_trusted_keys(policy.keys if policy is not None else keys)
    if texts:
        from sovpack.run import embed

        with local_bundle(path, current_registry_options()) as local:
            embedded = embed(local, texts, target=target or target_of_tag(path, local), keys=trusted, policy=policy,
                             insecure=insecure)
        if embedded.verified is False:
            click.echo(f"warning: {path}: nothing was verified (no --key): running the files as they are", err=True)
        if as_json:
            echo_json(embedded.to_dict(vectors=vectors))
            return
        render_embeddings(embedded)
        return
    from sovpack.run import run as run_model

    with local_bundle(path, current_registry_options()) as local:
        result = run_model(
            local, prompt=prompt, ids=_parse_ids(ids) if ids is not None else None, max_new_tokens=max_new_tokens,
            target=target or target_of_tag(path, local), keys=trusted, policy=policy, insecure=insecure,
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


def pipeline_line(facts: dict[str, Any]) -> str:
    """An encoder's pipeline in words: "mean pooling, L2-normalised, max 256 tokens"."""
    parts = [f"{facts['pooling']} pooling", "L2-normalised" if facts["normalize"] else "not normalised"]
    if facts.get("max_input_tokens") is not None:
        parts.append(f"max {facts['max_input_tokens']} tokens")
    return ", ".join(parts)


def render_embeddings(result: EmbedResult) -> None:
    """Shape, pipeline and runtime on one line, the texts numbered, then their cosine similarity matrix."""
    count, dimension = result.embeddings.shape
    verified = {None: "", True: ", verified", False: ", unverified"}[result.verified]
    click.echo(f"{result.family} embeddings: {count} x {dimension} ({pipeline_line(result.to_dict())}) on "
               f"{result.runtime}{verified}")
    width = len(str(count))
    for i, (text, tokens) in enumerate(zip(result.texts, result.tokens, strict=True), start=1):
        shown = " ".join(text.split())
        shown = shown if len(shown) <= 72 else shown[:71] + "…"
        counted = f" ({tokens} tokens)" if tokens is not None else ""
        click.echo(f"  [{i:>{width}}] {shown}{counted}")
    click.echo("cosine similarity")
    label = 4 + width
    click.echo(" " * label + "".join(f"{f'[{j}]':>9}" for j in range(1, count + 1)))
    for i, row in enumerate(result.cosine, start=1):
        click.echo(f"{f'[{i}]':>{label}}" + "".join(f"{c:>9.4f}" for c in row))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target", required=True, help="FORMAT:PRECISION, e.g. onnx:fp16, gguf:q8_0.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--no-parity", is_flag=True, help="Skip the parity check on the target runtime.")
@click.option("--prompt", "prompts", multiple=True, help="Extra parity prompt (repeatable; replaces built-ins).")
@click.option("--threshold", "thresholds", multiple=True, help="Override a parity threshold: NAME=VALUE.")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights that contain NaN or Inf.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@quantization_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert(checkpoint: Path, target: str, output: Path, no_parity: bool, prompts: tuple[str, ...],
            thresholds: tuple[str, ...], allow_nonfinite: bool, force: bool, quant_method: str | None,
            group_size: int | None, symmetric: bool | None, calibration: Path | None, int8_share: float | None,
            as_json: bool) -> None:
    """Convert a checkpoint into one runnable artifact directory and check parity on its runtime.

    \b
    Example:
      sovpack convert ./ckpt -t gguf:q8_0 -o out/gguf
      sovpack convert ./ckpt -t onnx:int4 --quant-method gptq --calibration domain.txt -o out/onnx-int4
    """
    from sovpack.convert import convert as convert_model
    from sovpack.parity import parse_threshold_overrides
    from sovpack.quantize.options import QuantOptions

    quant = QuantOptions(**quantization_flags(quant_method, group_size, symmetric, calibration, int8_share))

    with progress_bar(not as_json) as progress:
        result = convert_model(
            checkpoint, target, output, parity=not no_parity, prompts=prompts,
            threshold_overrides=parse_threshold_overrides(thresholds), allow_nonfinite=allow_nonfinite, force=force,
            progress=progress, quant=quant,
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
