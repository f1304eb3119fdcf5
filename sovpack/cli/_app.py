"""The ``sovpack`` command group and what every command shares: error funnel, JSON output, progress bars.

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
from typing import Any, TypeVar

import click

from sovpack import __version__
from sovpack.errors import SovpackError, UsageError
from sovpack.quantize.options import DEFAULT_INT8_SHARE, METHODS

DEBUG = {"on": False}
_Command = TypeVar("_Command", bound=Callable[..., Any])


def quantization_options(command: _Command) -> _Command:
    """The 4-bit options ``convert`` and ``build`` share. Unset ones stay None, so a build config's
    [quantization] table, or QuantOptions' defaults, decide them (``quantization_flags``)."""
    options = (
        click.option("--quant-method", type=click.Choice(METHODS),
                     help="4-bit rounding: auto (the default: gptq when the model's Hessians fit, else weighted), "
                          "rtn, weighted (calibrated ranges), gptq, awq (activation-aware input scales, then gptq)."),
        click.option("--group-size", type=int,
                     help="4-bit group size of ONNX and OpenVINO (power of two; default: 32, 128 from 6B "
                          "parameters; GGUF's blocks are fixed)."),
        click.option("--sym", "symmetric", is_flag=True, default=None, help="Symmetric 4-bit codes (no zero points)."),
        click.option("--calibration", type=click.Path(path_type=Path),
                     help="UTF-8 calibration text (default: built-in)."),
        click.option("--int8-share", type=float,
                     help=f"Share of linear weights kept at 8 bits, most quantization-sensitive first "
                          f"(default {DEFAULT_INT8_SHARE})."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def quantization_flags(quant_method: str | None, group_size: int | None, symmetric: bool | None,
                       calibration: Path | None, int8_share: float | None) -> dict[str, Any]:
    """The ``quantization_options`` given on the command line, as QuantOptions fields."""
    given = (("method", quant_method), ("group_size", group_size), ("symmetric", symmetric),
             ("calibration", calibration), ("int8_share", int8_share))
    return {field: value for field, value in given if value is not None}


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def stderr_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr (silent when not a terminal or with --json)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _d, _c, _t: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr_console(), transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, completed: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=completed, total=total)

        yield update


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file(s) it names, then the system's reason."""
    reason = e.strerror or str(e) or type(e).__name__
    files = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return f"{' -> '.join(files)}: {reason}" if files else reason


def _one_line(text: str) -> str:
    return " ".join(text.split())  # an error line is one line, whatever a file name or reason contains


class SovpackGroup(click.Group):
    """Turns SovpackError into a one-line message and exit code 1 (UsageError: exit 2).

    The backstop: an OSError (disk full, permission denied, a file vanishing), MemoryError or RecursionError
    that escapes a command is also one line naming the file when known, exit 1. The specific cases are handled
    where they arise; this only keeps a missed one from becoming a traceback. ``--debug`` re-raises all of them.
    """

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
        except OSError as e:
            if DEBUG["on"]:
                raise
            click.echo(f"error: {_one_line(os_error_message(e))}", err=True)
            ctx.exit(1)
        except MemoryError:
            if DEBUG["on"]:
                raise
            click.echo("error: out of memory; the input is larger than this machine can hold", err=True)
            ctx.exit(1)
        except RecursionError:
            if DEBUG["on"]:
                raise
            click.echo("error: input nested too deeply to process (recursion limit reached)", err=True)
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
      sovpack run ./encoder --text "A man is eating food." --text "A man is eating pasta."
      sovpack convert ./checkpoint -t onnx:fp16 -o ./out/onnx-fp16
      sovpack keygen -o keys
      sovpack build ./checkpoint -o model.oci -t onnx:fp16 -t gguf:q8_0 -t openvino:fp16 --key keys/private.pem
      sovpack verify model.oci --key keys/public.pem
      sovpack extract model.oci -t gguf:q8_0 -o ./deploy --key keys/public.pem
    """
    DEBUG["on"] = debug
