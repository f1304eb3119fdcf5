"""The ``sovpack`` command line: a thin shell over the library API.

Each command parses options, calls one library function and renders its result (a table, or one JSON
object with ``--json``). Only SovpackError is caught: its message goes to stderr and the exit code is 1.
Usage errors exit 2 (click's convention). Command modules register themselves on the group in ``_app``.
"""

from __future__ import annotations

from sovpack.cli import assemble, bundle, model, transfer
from sovpack.cli._app import cli

__all__ = ["assemble", "bundle", "cli", "main", "model", "transfer"]


def main() -> None:
    cli(prog_name="sovpack")
