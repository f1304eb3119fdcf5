"""The machinery of tests/hostile/test_transport.py, apart from the attacks themselves.

``Run`` is what an attack case returns (the CLI arguments and what a clean outcome looks like), ``@case`` files a
case under its test id in ``CASES``, and the helpers build what many cases need: fake registries, layouts, edited
bundle indexes and hand-made tar / gzip streams. Kept here so the test module holds only the cases and stays
short; not named ``test_*`` so pytest does not collect it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.hostile.harness import Outcome
from tests.transport.fake_registry import MT_INDEX, FakeBundle, FakeRegistry, Rule, add_member, canonical

GIB = 1024**3
ZERO_GIB_SHA256 = "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"  # sha256 of 2**30 zero bytes
STALL = ("--plain-http", "--stall-timeout", "1")
STALL_SECONDS = 15.0  # a stalled registry must be given up on well within this (the stall timeout is 1 s)


@dataclass
class Run:
    """One attack, ready to run: the CLI arguments and what a clean outcome looks like."""

    args: list[str]
    mentions: tuple[str, ...] = ()
    usage: bool = False
    succeeds: bool = False  # the right answer is to go on (and the check proves the harm was not done)
    unchanged: list[Path] = field(default_factory=list)  # trees outside the output that must not change
    absent: list[Path] = field(default_factory=list)  # paths that must not exist afterwards
    check: Callable[[Outcome], None] | None = None
    max_seconds: float | None = None


Case = Callable[[Path, contextlib.ExitStack], Run]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------------------ helpers


def layout(tmp: Path, bundle: FakeBundle | None = None, name: str = "src") -> Path:
    return (bundle or FakeBundle()).write_layout(tmp / name)


def registry(stack: contextlib.ExitStack, *rules: Rule, bundle: FakeBundle | None = None) -> FakeRegistry:
    reg = FakeRegistry(bundle, rules=list(rules))
    stack.callback(reg.close)
    return reg


def blob_rule(digest: str, kind: str, **kwargs: object) -> Rule:
    return Rule("GET", f"/blobs/{digest}$", kind, **kwargs)  # type: ignore[arg-type]


def retop(bundle: FakeBundle, edit: Callable[[dict], None]) -> FakeBundle:
    """The bundle with its bundle index edited (and re-hashed): what a forger can produce."""
    doc = json.loads(bundle.blobs[bundle.top])
    edit(doc)
    bundle.top = bundle.add(canonical(doc), MT_INDEX)
    return bundle


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """Plain tar bytes of ``members``, in that order (duplicates and all)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return out.getvalue()


def gzip_bomb(path: Path, bundle: FakeBundle) -> Path:
    """One gzip stream (about 1 MB) of a tar whose first member is 1 GiB of zeros named as the valid blob it is.

    Built without compressing a gibibyte: after a full flush deflate restarts from nothing, so compressing
    1 MiB of zeros gives the same bytes every time and they are repeated 1024 times.
    """
    info = tarfile.TarInfo(f"blobs/sha256/{ZERO_GIB_SHA256}")
    info.size = GIB
    head = info.tobuf(format=tarfile.USTAR_FORMAT)
    rest = io.BytesIO()
    with tarfile.open(fileobj=rest, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in bundle.members():
            add_member(tar, name, data)
    tail = rest.getvalue()
    mib = bytes(1024 * 1024)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)]
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    body += [block] * 1024
    body.append(deflate.compress(tail) + deflate.flush(zlib.Z_FINISH))
    crc = zlib.crc32(head)
    for _ in range(1024):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + GIB + len(tail)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    path.write_bytes(header + b"".join(body) + crc.to_bytes(4, "little") + (size % 2**32).to_bytes(4, "little"))
    return path


def archive_with(tmp: Path, *extra: tarfile.TarInfo | tuple[str, bytes], bundle: FakeBundle | None = None) -> Path:
    return (bundle or FakeBundle()).write_archive(tmp / "bundle.tar", list(extra))


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def unpack(tmp: Path, archive: Path, *mentions: str, **kwargs: object) -> Run:
    """``copy oci-archive:ARCHIVE DEST``: refused, and nothing written anywhere."""
    dest = tmp / "out"
    return Run(["copy", f"oci-archive:{archive}", dest], mentions=mentions, absent=[dest],
               unchanged=[archive.parent], **kwargs)  # type: ignore[arg-type]


def outside(tmp: Path) -> Path:
    """A directory of the victim's, outside every output: nothing may land in it."""
    victim = tmp / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    return victim


def no_staging(directory: Path) -> Callable[[Outcome], None]:
    def check(_outcome: Outcome) -> None:
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], os.listdir(directory)

    return check
