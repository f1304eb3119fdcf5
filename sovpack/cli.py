"""The ``sovpack`` command line: a thin shell over the library API.

Each command parses options, calls one library function and renders its result (a table, or one JSON
object with ``--json``). Only SovpackError is caught: its message goes to stderr and the exit code is 1.
Usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from sovpack import __version__
from sovpack.cli_registry import BUNDLE, copy_command, current_registry_options, registry_options
from sovpack.errors import SovpackError, UsageError

DEBUG = {"on": False}


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr (silent when not a terminal or with --json)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _d, _c, _t: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_console(), transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, completed: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=completed, total=total)

        yield update


class SovpackGroup(click.Group):
    """Turns SovpackError into a one-line message and exit code 1 (UsageError: exit 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            if DEBUG["on"]:
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except SovpackError as e:
            if DEBUG["on"]:
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=SovpackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sovpack")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Package open-weight models into signed, parity-checked artifacts for ONNX Runtime, llama.cpp and
    OpenVINO.

    \b
    Typical flow:
      sovpack inspect ./checkpoint
      sovpack run ./checkpoint --prompt "Hello"
      sovpack convert ./checkpoint -t onnx:fp16 -o ./out/onnx-fp16
      sovpack keygen -o keys
      sovpack build ./checkpoint -o model.oci -t onnx:fp16 -t gguf:q8_0 -t openvino:fp16 --key keys/private.pem
      sovpack verify model.oci --key keys/public.pem
      sovpack extract model.oci -t gguf:q8_0 -o ./deploy --key keys/public.pem
    """
    DEBUG["on"] = debug


@cli.command()
@click.argument("path", type=BUNDLE)
@registry_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe a checkpoint, artifact directory or bundle (directory, oci-archive: or docker:// reference)."""
    from sovpack.inspect import inspect_path
    from sovpack.transfer import bundle_location
    from sovpack.verify import inspect_bundle

    with bundle_location(path, current_registry_options()) as source:
        info = inspect_path(source) if isinstance(source, Path) else inspect_bundle(source)
    if as_json:
        _echo_json(info)
        return
    if info.get("kind") == "bundle":
        from sovpack.cli_bundle import render_bundle_info

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
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path), help="For a bundle: trusted public key.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def run(path: Path, prompt: str | None, ids: str | None, max_new_tokens: int, logits_out: Path | None,
        target: str | None, keys: tuple[Path, ...], as_json: bool) -> None:
    """Greedy-generate from a checkpoint (numpy reference), an artifact directory or a bundle (its runtime)."""
    from sovpack.run import run as run_model
    from sovpack.signing import load_trusted_keys
    from sovpack.transfer import local_bundle

    with local_bundle(path, current_registry_options()) as local:
        result = run_model(
            local, prompt=prompt, ids=_parse_ids(ids) if ids is not None else None, max_new_tokens=max_new_tokens,
            target=target, keys=load_trusted_keys(keys),
        )
    if logits_out is not None:
        import io

        import numpy as np

        from sovpack.fsutil import atomic_write_bytes

        buffer = io.BytesIO()
        np.save(buffer, result.logits.astype(np.float32))
        atomic_write_bytes(logits_out, buffer.getvalue())
    if as_json:
        _echo_json(result.to_dict())
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

    with _progress(not as_json) as progress:
        result = convert_model(
            checkpoint, target, output, parity=not no_parity, prompts=prompts,
            threshold_overrides=parse_threshold_overrides(thresholds), allow_nonfinite=allow_nonfinite, force=force,
            progress=progress,
        )
    summary = {
        "target": result.target,
        "output": str(result.out_dir),
        "files": list(result.files),
        "parity": None if result.parity is None else result.parity.status,
    }
    if as_json:
        _echo_json(summary)
        return
    parity = summary["parity"] or "skipped"
    click.echo(f"{result.target}: wrote {result.out_dir} ({len(result.files)} files), parity {parity}")


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_targets(as_json: bool) -> None:
    """List the output formats and their precisions."""
    from sovpack.targets import TARGETS, load_targets

    load_targets()
    data = {name: {"precisions": list(t.precisions), "default": t.default_precision} for name, t in TARGETS}
    if as_json:
        _echo_json(data)
        return
    for name, info in data.items():
        click.echo(f"{name}: {', '.join(info['precisions'])} (default {info['default']})")


def main() -> None:
    cli(prog_name="sovpack")


cli.add_command(copy_command)


from sovpack import cli_bundle  # noqa: E402,F401  (registers bundle commands)
