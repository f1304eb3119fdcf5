"""Throughput and peak memory of ``sovpack copy`` with a multi-GB blob: push, pull, and the oci-archive trip.

An OCI layout is built directly (no model conversion): one random blob of ``--size-gb`` GiB (default 2) as
the layer of an image manifest, listed by an index tagged ``v1``. A Distribution registry
(``docker-registry``, Debian package) is started on a free loopback port with temporary storage, unless
``--registry HOST:PORT`` names a running plain-HTTP one. Each operation runs as ``python -m sovpack copy`` in a
fresh process, and the parent records its wall time and peak RSS (``os.wait4`` rusage) for that child alone:

    push     layout dir  -> docker://127.0.0.1:PORT/bench/blob:v1   (chunked PATCH uploads, hashed as sent)
    pull     docker://   -> fresh layout dir                        (streamed, hashed, renamed when verified)
    re-push  layout dir  -> the same tag                            (HEAD finds every blob: nothing sent)
    archive  layout dir  -> oci-archive:bundle.tar                  (deterministic tar, hashed as written)
    unpack   oci-archive -> fresh layout dir                        (streamed, every blob checked)

Peak RSS staying flat while the blob is GBs is the point: nothing holds a blob in memory (the upload chunk,
``--chunk-mb``, 16 MiB by default, is the largest buffer).

Usage: python benchmarks/registry_transfer.py [--size-gb 2] [--chunk-mb 16] [--registry HOST:PORT] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIECE = 16 * 1024 * 1024


def canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def make_layout(root: Path, size: int) -> str:
    """An OCI layout whose one layer is ``size`` random bytes; returns the layer digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    hasher = hashlib.sha256()
    tmp = blobs / ".big"
    with open(tmp, "wb") as out:
        left = size
        while left:
            piece = os.urandom(min(PIECE, left))
            hasher.update(piece)
            out.write(piece)
            left -= len(piece)
    layer = f"sha256:{hasher.hexdigest()}"
    tmp.rename(blobs / layer.split(":")[1])
    config_digest, config_size = put_blob(blobs, b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.sovpack.benchmark.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": size,
                    "annotations": {"org.opencontainers.image.title": "random.bin"}}],
    }
    m_digest, m_size = put_blob(blobs, canonical(manifest))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m_digest,
                            "size": m_size}], "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    i_digest, i_size = put_blob(blobs, canonical(index))
    top = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
           "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": i_digest, "size": i_size,
                          "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    (root / "index.json").write_bytes(canonical(top))
    (root / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    return layer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        raise SystemExit("needs docker-registry (apt-get install -y docker-registry) or --registry HOST:PORT")
    port = free_port()
    storage = directory / "storage"
    storage.mkdir(parents=True)
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {storage}\n  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: benchmark\n"
    )
    log = open(directory / "registry.log", "wb")  # noqa: SIM115  (kept open for the registry's lifetime)
    process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(400):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise SystemExit("the registry did not start")


def timed_copy(source: str, destination: str, chunk_mb: int) -> tuple[float, int, dict[str, object]]:
    """Run ``sovpack copy`` in a fresh interpreter: (seconds, peak RSS bytes, its --json result)."""
    args = [sys.executable, "-m", "sovpack", "copy", source, destination, "--plain-http", "--chunk-size",
            str(chunk_mb), "--json", "-q"]
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out = process.stdout.read() if process.stdout else b""
    err = process.stderr.read() if process.stderr else b""
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sovpack copy {source} {destination} failed: {err.decode()}")
    return seconds, usage.ru_maxrss * 1024, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the random blob in GiB")
    parser.add_argument("--chunk-mb", type=int, default=16, help="upload chunk size in MiB")
    parser.add_argument("--registry", help="use a running plain-HTTP registry at HOST:PORT (loopback)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    size = int(args.size_gb * 1024**3)
    work = args.keep or Path(tempfile.mkdtemp(prefix="sovpack-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    registry_process = None
    try:
        started = time.monotonic()
        make_layout(work / "source", size)
        print(f"built a {size / 1024**3:.2f} GiB layout in {time.monotonic() - started:.1f} s", file=sys.stderr)
        if args.registry:
            host = args.registry
        else:
            registry_process, host = start_registry(work / "registry")
        ref = f"docker://{host}/bench/blob:v1"
        runs = [
            ("push", str(work / "source"), ref),
            ("pull", ref, str(work / "pulled")),
            ("re-push (all skipped)", str(work / "source"), ref),
            ("archive (dir -> tar)", str(work / "source"), f"oci-archive:{work / 'bundle.tar'}"),
            ("unpack (tar -> dir)", f"oci-archive:{work / 'bundle.tar'}", str(work / "unpacked")),
        ]
        rows = []
        for name, source, destination in runs:
            seconds, rss, result = timed_copy(source, destination, args.chunk_mb)
            moved = int(result["bytes_transferred"])  # type: ignore[call-overload]
            rows.append((name, moved, seconds, rss, result.get("stats", {})))
        for directory in ("pulled", "unpacked"):
            for path in (work / "source" / "blobs" / "sha256").iterdir():
                copy = work / directory / "blobs" / "sha256" / path.name
                if not copy.is_file() or copy.stat().st_size != path.stat().st_size:
                    raise SystemExit(f"{directory}: blob {path.name} missing or wrong size")
        print()
        print(f"blob size {size / 1024**2:.0f} MiB, chunk {args.chunk_mb} MiB, registry {host} (Distribution, "
              "filesystem storage, loopback, plain HTTP)")
        print(f"| {'operation':<24} | {'bytes moved':>12} | {'seconds':>8} | {'MB/s':>8} | {'peak RSS MiB':>12} |")
        print(f"|{'-' * 26}|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 14}|")
        for name, moved, seconds, rss, _stats in rows:
            rate = moved / seconds / 1e6 if moved else 0.0
            print(f"| {name:<24} | {moved:>12} | {seconds:>8.1f} | {rate:>8.1f} | {rss / 1024**2:>12.1f} |")
    finally:
        if registry_process is not None:
            registry_process.terminate()
            registry_process.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
