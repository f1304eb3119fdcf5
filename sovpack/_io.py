"""File mechanics every stage shares: atomic output, hashing while copying, capped reads, progress callbacks,
work split over every core.

Atomic output writes into a temporary sibling, then renames, so no half-written output is ever seen.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from sovpack.errors import SourceError, SovpackError, UsageError, VerificationError

T = TypeVar("T")
R = TypeVar("R")
MAX_BLOCK_THREADS = 4  # ordered_map: past a few threads numpy's own memory bandwidth is the limit

CHUNK = 8 * 1024 * 1024

# A progress callback: (description, completed, total). Long stages call it as they go.
Progress = Callable[[str, int, int], None]


def no_progress(_description: str, _completed: int, _total: int) -> None:
    """The default progress callback: silent."""


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    digest, _ = hashing_copy(path, None)
    return digest


def hashing_copy(source: Path | BinaryIO, dest: Path | BinaryIO | None) -> tuple[str, int]:
    """Copy ``source`` to ``dest`` (or just read it when ``dest`` is None), hashing while copying.

    Returns (``sha256:<hex>``, size); never holds more than one chunk in memory.
    """
    hasher = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
        dst = stack.enter_context(open(dest, "wb")) if isinstance(dest, Path) else dest
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            if dst is not None:
                dst.write(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


def read_capped(
    path: Path, limit: int, *, error: type[SovpackError] = VerificationError, where: str | None = None
) -> bytes:
    """A small document read whole, refused (not slurped) past ``limit`` bytes; only a regular file is opened.

    ``where`` names the file in messages (default: its path).
    """
    display = where or str(path)
    with open_regular(path, error=error, where=display) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as e:
            raise error(f"{display}: cannot read: {e.strerror or e}") from e
    if len(data) > limit:
        raise error(f"{display}: larger than {limit} bytes; refused")
    return data


def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters.

    Untrusted input can hold a key, name or number megabytes long; an int too long to print whole (Python
    refuses past 4300 digits) is described by its size instead.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_relative_path(path: str, where: str, *, error: type[SovpackError] = VerificationError) -> str:
    """A safe relative POSIX path for an extracted file: no absolute, parent, empty or odd components."""
    if not isinstance(path, str) or not path:
        raise error(f"{where}: empty file path")
    if "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path):
        raise error(f"{where}: file path {path!r} contains a backslash or control character")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise error(f"{where}: file path {path!r} is absolute")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise error(f"{where}: file path {path!r} has an empty, '.' or '..' component (path traversal)")
    return path


def check_output_dir(out_dir: Path, *, force: bool) -> None:
    """Refuse to overwrite a non-empty directory unless forced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir}: exists and is not empty (pass --force to replace it)")


def _resolved(path: Path, error: type[SovpackError]) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise error(f"{path}: cannot resolve the path: {e}") from e


def check_not_input(output: Path, inputs: Sequence[Path], *, error: type[SovpackError] = UsageError) -> None:
    """Refuse an output path that equals, contains or lies inside any input path.

    Paths are compared resolved (symlinks followed, ``..`` collapsed), so a link to the input or a path that
    reaches it another way is caught too. Writing there would replace or change the input: ``convert CK -o CK
    --force`` would delete the checkpoint it reads.
    """
    out = _resolved(Path(output), error)
    for given in inputs:
        inp = _resolved(Path(given), error)
        if out == inp:
            raise error(f"{output}: the output is the input {given}; refusing to overwrite an input")
        if out.is_relative_to(inp):
            raise error(f"{output}: the output lies inside the input {given}; refusing to write into an input")
        if inp.is_relative_to(out):
            raise error(f"{output}: the output contains the input {given}; refusing to replace an input")


# NOTE: an OSError about the output (its file name is the output, its temporary sibling or a file in it), or
# one without a file name that can only mean "the destination cannot take it" (full, read-only), becomes one
# message naming the output. Any other OSError (e.g. an input that cannot be read) keeps its own file name
# and reaches the CLI funnel.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _output_failure(out: Path, tmp: Path | None, e: OSError, error: type[SovpackError]) -> SovpackError | None:
    """The SovpackError for an OSError met while writing ``out`` (through ``tmp``), or None if it is not one."""
    if isinstance(e.filename, str | os.PathLike):
        filename = Path(e.filename)
        related = filename == out or filename.parent == out.parent or (
            tmp is not None and filename.is_relative_to(tmp)
        )
        if not related:
            return None
    elif e.errno not in _OUTPUT_ERRNOS:
        return None
    return error(f"{out}: cannot write the output: {e.strerror or e}; nothing was written")


@contextlib.contextmanager
def atomic_directory(
    out_dir: Path,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    error: type[SovpackError] = SovpackError,
) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; on success it replaces ``out_dir``, on error it is removed.

    ``inputs``: paths the caller reads; an ``out_dir`` that equals, contains or is inside one is refused
    (UsageError) before anything is touched. A destination that cannot take the output (read-only, full, no
    permission) raises ``error`` naming ``out_dir``, with the temporary directory removed.
    """
    check_not_input(out_dir, inputs)
    check_output_dir(out_dir, force=force)
    tmp: Path | None = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except OSError:
                old.rename(out_dir)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        failure = _output_failure(out_dir, tmp, e, error)
        if failure is None:
            raise
        raise failure from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH in seconds, or None: timestamps only when reproducibly pinned."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, got {raw!r}") from None


def source_date() -> str | None:
    """RFC 3339 UTC time from SOURCE_DATE_EPOCH, or None."""
    seconds = source_date_epoch()
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------- untrusted JSON

MAX_JSON_DEPTH = 64  # real configs, manifests and signatures nest a handful of levels


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iteratively (no recursion of our own) whether containers nest deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(data: bytes | str, where: str, *, error: type[SovpackError] = SourceError) -> Any:
    """Parse an untrusted JSON document: standard JSON only, unique keys, bounded nesting; else ``error``.

    Duplicate keys are refused because two parsers may keep different ones (a signed document would then
    mean two things); NaN/Infinity because they are not JSON; deep nesting because it exhausts the stack of
    whatever walks the value next.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise error(f"{where}: invalid JSON: {e}") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def open_regular(path: Path, *, error: type[SovpackError] = SourceError, where: str | None = None) -> BinaryIO:
    """Open a file for reading only if it is a regular file (a FIFO or device named like one would block).

    ``where`` names the file in messages (default: the path).
    """
    display = where or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{display}: cannot read: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{display}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json_file(path: Path, limit: int, *, where: str | None = None, error: type[SovpackError] = SourceError
                   ) -> Any:
    """A local JSON document: a regular file, at most ``limit`` bytes, parsed by :func:`parse_json`."""
    display = where or str(path)
    return parse_json(read_capped(path, limit, error=error, where=display), display, error=error)


def return_freed_memory() -> None:
    """Hand the heap pages freed by the last stage back to the system (glibc keeps them otherwise).

    A build runs stages one after another in one process (reference, each target's conversion and runtime);
    without this, what one stage freed stays in its process's anonymous memory while the next one peaks.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` on a few threads, results in input order, one item more than threads in flight.

    For numpy work that releases the GIL (casts, block quantizers) on a stream of blocks: every core busy on one
    tensor while its memory stays bounded. An error in ``fn`` is raised where its result would have come.
    """
    workers = workers or min(os.cpu_count() or 1, MAX_BLOCK_THREADS)
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


COPY_BLOCK_BYTES = 32 * 2**20  # parallel_copyto: rows per task


def parallel_copyto(dst: Any, src: Any) -> None:
    """``np.copyto(dst, src, casting="unsafe")`` split by rows over every core (a bfloat16 -> float16 cast runs
    ~2.5x faster on two). Both arrays have the same shape; overflow to Inf is the caller's to check."""
    import numpy as np

    rows = dst.shape[0] if dst.ndim else 1
    step = max(1, COPY_BLOCK_BYTES // max(1, dst.nbytes // max(rows, 1)))
    if dst.ndim == 0 or rows <= step:
        with np.errstate(over="ignore"):
            np.copyto(dst, src, casting="unsafe")
        return

    def part(start: int) -> None:
        with np.errstate(over="ignore"):
            np.copyto(dst[start : start + step], src[start : start + step], casting="unsafe")

    for _ in ordered_map(part, range(0, rows, step)):
        pass


# The exponent bits of the 16-bit floats: a value is Inf or NaN exactly when all of them are set.
HALF_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}
FINITE_PIECE = 2**16  # values tested at a time (128 KiB of scratch)


def all_finite(array: Any) -> bool:
    """``np.isfinite(array).all()``; for float16 and bfloat16 a test of the exponent bits, as numpy's float16
    isfinite is a scalar loop (4x slower; it was 4% of a three-target build's CPU time)."""
    import numpy as np

    exponent = HALF_EXPONENT_BITS.get(array.dtype.name)
    if exponent is None:
        return bool(np.isfinite(array).all())
    if not array.size:
        return True
    # NOTE: in small pieces through one scratch buffer: a temporary the size of the array would be fresh memory
    # each time, which the kernel zeroes first (on this project's VMs, ~1 GB/s: more than the test itself). A
    # strided view is flattened into a copy first (no writer passes one).
    flat = array.view(np.uint16).reshape(-1)
    scratch = np.empty(min(flat.size, FINITE_PIECE), dtype=np.uint16)
    for start in range(0, flat.size, FINITE_PIECE):
        piece = flat[start : start + FINITE_PIECE]
        masked = np.bitwise_and(piece, 0x7FFF, out=scratch[: piece.size])
        if masked.max() >= exponent:
            return False
    return True


def parallel_all_finite(array: Any) -> bool:
    """``all_finite(array)`` split by rows over every core (the check every weight copy gets)."""
    rows = array.shape[0] if array.ndim else 1
    step = max(1, COPY_BLOCK_BYTES // max(1, array.nbytes // max(rows, 1)))
    if array.ndim == 0 or rows <= step:
        return all_finite(array)
    return all(ordered_map(lambda start: all_finite(array[start : start + step]), range(0, rows, step)))
