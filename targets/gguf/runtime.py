"""The two optional packages the gguf target needs, imported lazily, and the llama.cpp glue shared by the
quantizer and the runner: quiet logging, load-error messages, and the AMX workaround."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sovpack.errors import MissingDependencyError, ParityError

# Threads llama.cpp uses for quantizing and for running (the runner's records name it): fixed, so parity runs
# are reproducible and do not oversubscribe a shared machine.
N_THREADS = 2


def import_gguf() -> Any:
    """gguf-py, or a MissingDependencyError naming the ``gguf`` extra."""
    try:
        import gguf
    except ImportError as e:
        raise MissingDependencyError("gguf", "gguf") from e
    return gguf


def import_llama_cpp() -> Any:
    """llama-cpp-python, or a MissingDependencyError naming the ``llama`` extra."""
    # NOTE: llama.cpp's CPU backend runs its threads with OpenMP; the default busy-waiting policy makes every
    # barrier cost a scheduler time slice when the machine is busier than its cores (measured: 2 threads on
    # 2 loaded cores, 0.3 s per decode instead of 1 ms). OpenMP reads this once, when llama.cpp's library is
    # loaded; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependencyError("llama_cpp", "llama") from e
    return llama_cpp


@contextlib.contextmanager
def quiet_llama() -> Iterator[io.StringIO]:
    """Keep llama.cpp's log lines off the console; yields what was logged meanwhile.

    llama.cpp logs through llama-cpp-python's callback, which prints to ``sys.stderr`` when the
    'llama-cpp-python' logger lets the level through. In 0.3.36 that mapping is one step off (ggml's WARN
    arrives as logging.ERROR), so ``Llama(verbose=False)`` -- which sets ERROR while it loads -- still prints
    every warning, into the JSON output of ``sovpack ... --json`` among others. Here the logger is set to
    CRITICAL, and ``sys.stderr`` is captured while the block runs (model loading); llama.cpp failures surface
    as exceptions. The level stays CRITICAL afterwards: llama.cpp also logs from later calls (decode,
    tokenize).
    """
    logger = logging.getLogger("llama-cpp-python")
    logger.setLevel(logging.CRITICAL)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield captured
    finally:
        logger.setLevel(logging.CRITICAL)


@contextlib.contextmanager
def load_errors(path: Path, log: io.StringIO) -> Iterator[None]:
    """llama-cpp-python reports a file llama.cpp refuses as a bare ValueError: name the file, add llama.cpp's
    last log lines."""
    try:
        yield
    except ValueError as e:
        tail = " | ".join(line.strip() for line in log.getvalue().splitlines()[-3:] if line.strip())
        raise ParityError(f"{path}: llama.cpp cannot load this GGUF file ({e}){': ' + tail if tail else ''}") from e


@contextlib.contextmanager
def runtime_errors(path: Path, what: str) -> Iterator[None]:
    """llama-cpp-python reports a failing decode or tokenization as a bare RuntimeError: name the file."""
    try:
        yield
    except RuntimeError as e:
        raise ParityError(f"{path}: llama.cpp failed to {what}: {e}") from e


def extra_buffers_allowed() -> bool:
    """Whether the runner lets llama.cpp use its extra CPU buffer types (AMX, repacked weights).

    llama.cpp's AMX path crashes (SIGSEGV in decode) on q8_0 / q4_0 weights with llama-cpp-python 0.3.36 on
    AMX-capable CPUs; with extra buffer types off, the same file runs on the generic CPU kernels. They stay on
    everywhere else.
    """
    info = import_llama_cpp().llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" not in info


@contextlib.contextmanager
def model_params(*, extra_buffers: bool) -> Iterator[None]:
    """Open models with ``use_extra_bufts`` as given: llama-cpp-python's Llama has no argument for it, so
    the default-params factory it calls is wrapped while a model loads."""
    import llama_cpp.llama_cpp as low

    if extra_buffers:
        yield
        return
    original = low.llama_model_default_params

    def params() -> Any:
        value = original()
        value.use_extra_bufts = False
        return value

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original
