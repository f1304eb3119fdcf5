"""Helpers the bundle test modules share: the targets to build, a CLI build, raw access to a bundle's layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sovpack.attest.dsse import VerifyingKey
from sovpack.oci.media import ANN_ATTESTATION, ANN_KIND, ANN_TARGET
from sovpack.targets import TARGETS, load_targets
from sovpack.verify import verify_bundle

WANTED = ("onnx:fp32", "onnx:fp16", "gguf:q8_0", "openvino:fp16")


def available_targets() -> list[str]:
    load_targets()
    names = {name for name, _ in TARGETS}
    return [t for t in WANTED if t.split(":")[0] in names]


class Layout:
    """Test-side access to a bundle's raw JSON, for crafting tampered copies."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def json(self, digest: str) -> dict[str, Any]:
        return json.loads(self.blob(digest).read_bytes())

    def put(self, data: bytes) -> tuple[str, int]:
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return digest, len(data)

    def put_json(self, doc: Any) -> tuple[str, int]:
        return self.put(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    @property
    def index_json(self) -> dict[str, Any]:
        return json.loads((self.root / "index.json").read_text())

    @property
    def bundle_index_digest(self) -> str:
        return str(self.index_json["manifests"][0]["digest"])

    @property
    def bundle_index(self) -> dict[str, Any]:
        return self.json(self.bundle_index_digest)

    def set_bundle_index(self, doc: dict[str, Any]) -> None:
        digest, size = self.put_json(doc)
        top = self.index_json
        top["manifests"][0].update(digest=digest, size=size)
        (self.root / "index.json").write_text(json.dumps(top))

    def entries(self, kind: str, target: str | None = None, attestation: str | None = None) -> list[dict[str, Any]]:
        out = []
        for entry in self.bundle_index["manifests"]:
            ann = entry.get("annotations", {})
            if ann.get(ANN_KIND) != kind:
                continue
            if target is not None and ann.get(ANN_TARGET) != target:
                continue
            if attestation is not None and ann.get(ANN_ATTESTATION) != attestation:
                continue
            out.append(entry)
        return out

    def target_digest(self, target: str) -> str:
        return str(self.entries("target", target)[0]["digest"])

    def replace_entry(self, old_digest: str, new_doc: dict[str, Any] | None, **annotation_updates: str) -> str | None:
        """Swap the manifest an index entry points to (or drop the entry); returns the new digest."""
        index = self.bundle_index
        new_digest = None
        kept = []
        for entry in index["manifests"]:
            if entry["digest"] != old_digest:
                kept.append(entry)
                continue
            if new_doc is None:
                continue
            new_digest, size = self.put_json(new_doc)
            entry.update(digest=new_digest, size=size)
            entry.setdefault("annotations", {}).update(annotation_updates)
            kept.append(entry)
        index["manifests"] = kept
        self.set_bundle_index(index)
        return new_digest


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def failures(root: Path, key: VerifyingKey, **kwargs: Any) -> str:
    report = verify_bundle(root, keys=[key], **kwargs)
    assert not report.ok, "verification unexpectedly passed"
    return "\n".join(report.failures)


def cli_build(checkpoint: Path, out: Path, private_key: Path, targets: list[str], *extra: str) -> Any:
    """``sovpack build`` in a fresh process, as a release pipeline runs it; the --json result as attributes."""
    args = [sys.executable, "-m", "sovpack", "build", str(checkpoint), "-o", str(out), "--key", str(private_key)]
    for target in targets:
        args += ["-t", target]
    result = subprocess.run([*args, *extra, "--json"], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    targets_ns = tuple(SimpleNamespace(**{**t, "files": tuple(t["files"])}) for t in data["targets"])
    return SimpleNamespace(**{**data, "output": Path(data["output"]), "targets": targets_ns})


BUILD_OPTIONS = ("--tag", "v1", "--license", "Apache-2.0")
