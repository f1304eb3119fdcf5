"""``extract`` and ``run`` from a bundle: a verified target written out as the runnable files it was built as.

Runtimes need real files with their names, so ``run`` (and ``parity``) extract a verified copy to a
temporary directory and remove it afterwards. Every file is hashed while it is copied; a blob that changed
since verification raises before anything is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sovpack._io import atomic_directory, check_not_input, check_relative_path, hashing_copy
from sovpack._protocols import EmbeddingRunner, Embeddings, Runner
from sovpack.artifact import ARTIFACT_FILE, ArtifactMetadata
from sovpack.attest import oms
from sovpack.attest.dsse import VerifyingKey, verify_bundle_signature
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.reader import Layout
from sovpack.verify.check import normalize_targets, verify_view
from sovpack.verify.policy import Policy
from sovpack.verify.view import BundleView, TargetEntry, read_bundle


@dataclass(frozen=True, kw_only=True, slots=True)
class ExtractResult:
    """What ``extract_target`` wrote."""

    target: str
    out_dir: Path
    manifest_digest: str
    files: tuple[str, ...]
    signature: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "output": str(self.out_dir),
            "manifest_digest": self.manifest_digest,
            "files": list(self.files),
            "signature": str(self.signature),
        }


def _copy_verified(layout: Layout, layer: Descriptor, dest: Path, where: str) -> None:
    """Copy a blob to ``dest`` (a new file), hashing while copying; a mismatch raises before anything is used."""
    source = layout.blob_path(layer.digest)
    if source.is_symlink() or not source.is_file():
        raise VerificationError(f"{where}: blob {layer.digest} is missing (or a symbolic link)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(dest, flags, 0o644)
    with os.fdopen(fd, "wb") as dst:
        actual, size = hashing_copy(source, dst)
    if actual != layer.digest or size != layer.size:
        dest.unlink()
        raise VerificationError(f"{where}: blob {layer.digest} changed while copying (got {actual}, {size} bytes)")


def write_target_files(view: BundleView, target: TargetEntry, tmp: Path, signature: bytes | None) -> list[str]:
    """Write a target's files (and model.sig) into the fresh directory ``tmp``; paths are re-checked here."""
    layout = view.local_layout()
    written: list[str] = []
    root = tmp.resolve()
    for path, layer in sorted(target.files.items()):
        where = f"target {target.name} file {path!r}"
        check_relative_path(path, where)
        if path == oms.SIGNATURE_FILE:
            raise VerificationError(f"{where}: the name is reserved for the signature")
        dest = tmp / path
        parent = dest.parent
        parent.mkdir(parents=True, exist_ok=True)
        real_parent = parent.resolve()
        if parent.is_symlink() or not (real_parent == root or real_parent.is_relative_to(root)):
            raise VerificationError(f"{where}: resolves outside the output directory")
        try:
            _copy_verified(layout, layer, dest, where)
        except FileExistsError:
            raise VerificationError(f"{where}: written twice") from None
        written.append(path)
    if signature is not None:
        fd = os.open(tmp / oms.SIGNATURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signature)
    return written


def _signature_bytes(view: BundleView, target: TargetEntry, keys: Sequence[VerifyingKey]) -> bytes:
    """The verified OMS Sigstore bundle of a target, as stored (it becomes model.sig)."""
    for att in view.attestations:
        if att.subject != target.descriptor.digest:
            continue
        # NOTE: the bundle was verified as a whole already; an attestation no trusted key signed is simply
        # not the one we are looking for (several signers may attest one target).
        try:
            verified = verify_bundle_signature(att.bundle, keys)
        except VerificationError:
            continue
        if verified.statement.predicate_type == oms.PREDICATE_TYPE:
            return view.layout.read(att.layer, f"target {target.name} signature")
    raise VerificationError(f"target {target.name}: no model-signing signature by a trusted key")


def _verified_view(
    path: str | Path,
    target: str,
    keys: Sequence[VerifyingKey],
    *,
    tag: str | None,
    policy: Policy | None,
) -> tuple[BundleView, TargetEntry]:
    """The whole bundle verified (under ``policy``), before any of its bytes is used."""
    (name,) = normalize_targets([target])
    effective = policy or Policy()
    view = read_bundle(path, tag=tag or effective.tag, deep=True)
    report = verify_view(
        view, keys, required_targets=(*effective.required_targets, name), allowed_parity=effective.allowed_parity,
        policy=effective,
    )
    report.raise_for_failures()
    return view, view.target(name)


def copy_verified_blob(view: BundleView, layer: Descriptor, dest: Path, where: str) -> None:
    """A blob copied into a private file, hashed while copied: what a runtime then reads cannot change under it."""
    _copy_verified(view.local_layout(), layer, dest, where)


def extract_target(
    path: str | Path,
    target: str | None,
    out_dir: str | Path,
    *,
    keys: Sequence[VerifyingKey],
    tag: str | None = None,
    policy: Policy | None = None,
    force: bool = False,
) -> ExtractResult:
    """Verify the bundle, then write the target's runnable files plus model.sig, atomically.

    ``target`` None: the one a per-target ``tag`` names, or the bundle's only one. The output may not be (or
    contain, or lie inside) the bundle itself.
    """
    check_not_input(Path(out_dir), [Path(path)])
    name = _single_target(path, target, tag or (policy.tag if policy is not None else None))
    view, entry = _verified_view(path, name, keys, tag=tag, policy=policy)
    signature = _signature_bytes(view, entry, keys)
    out = Path(out_dir)
    with atomic_directory(out, force=force, inputs=[Path(path)]) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal directory, not the private mode of a temporary one
        files = write_target_files(view, entry, tmp, signature)
    return ExtractResult(
        target=entry.name,
        out_dir=out,
        manifest_digest=entry.descriptor.digest,
        files=tuple(files),
        signature=out / oms.SIGNATURE_FILE,
    )


@contextlib.contextmanager
def extracted_target(
    path: str | Path,
    target: str,
    *,
    keys: Sequence[VerifyingKey],
    tag: str | None = None,
    verify: bool = True,
    policy: Policy | None = None,
) -> Iterator[tuple[Path, BundleView, TargetEntry]]:
    """A verified copy of one target in a private temporary directory, removed on exit.

    ``verify=False`` (``--insecure``) only checks digests: nothing is known about who made the bytes.
    """
    if verify:
        view, entry = _verified_view(path, target, keys, tag=tag, policy=policy)
    else:
        (name,) = normalize_targets([target])
        view = read_bundle(path, tag=tag, deep=True)
        if view.problems:
            raise VerificationError(f"{path}: {view.problems[0]}")
        entry = view.target(name)
    tmp = Path(tempfile.mkdtemp(prefix="sovpack-target-"))
    try:
        write_target_files(view, entry, tmp, None)
        yield tmp, view, entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def artifact_metadata(directory: Path, entry: TargetEntry, missing: str) -> ArtifactMetadata:
    """The extracted target's ``sovpack-artifact.json``; ``missing`` ends the error when the bundle has none."""
    if not (directory / ARTIFACT_FILE).is_file():
        raise VerificationError(f"target {entry.name}: {missing}")
    return ArtifactMetadata.load(directory)


def open_target_runner(directory: Path, entry: TargetEntry, metadata: ArtifactMetadata) -> Runner:
    """A runner on an extracted target, on the runtime of the format the bundle says it is."""
    from sovpack.targets.base import TARGETS

    if metadata.spec.encoder is not None:
        raise UsageError(f"target {entry.name} is an embedding encoder ({metadata.spec.family}): it embeds texts "
                         "and generates none (embed with --text)")
    return TARGETS.get(entry.format).open_runner(directory, metadata)


def open_target_embedding_runner(directory: Path, entry: TargetEntry, metadata: ArtifactMetadata
                                 ) -> EmbeddingRunner:
    """An embedding runner on an extracted encoder target, on the runtime of the format the bundle says it is."""
    from sovpack.targets.base import TARGETS

    if metadata.spec.encoder is None:
        raise UsageError(f"target {entry.name} is a text generator ({metadata.spec.family}), not an embedding "
                         "encoder: it has no embeddings to give (run it with --prompt)")
    return TARGETS.get(entry.format).open_embedding_runner(directory, metadata)


# ------------------------------------------------------------------------------------------------ run


def _single_target(path: str | Path, target: str | None, tag: str | None) -> str:
    """``target``, else the one a per-target tag names, else the bundle's only target; UsageError otherwise."""
    if target is not None:
        return target
    view = read_bundle(path, tag=tag, deep=False)
    if view.named_target is not None:
        return view.named_target[0]
    if len(view.targets) == 1:
        return view.targets[0].name
    names = ", ".join(t.name for t in view.targets)
    raise UsageError(f"{path}: the bundle holds several targets ({names}); choose one with -t")


def _need_keys(keys: Sequence[VerifyingKey], insecure: bool) -> None:
    if not keys and not insecure:
        raise UsageError(
            "running from a bundle verifies it first: pass --key PUB.pem (or --insecure to run unverified files)"
        )


R = TypeVar("R")


def _open_extracted(
    path: str | Path,
    target: str | None,
    keys: Sequence[VerifyingKey],
    tag: str | None,
    policy: Policy | None,
    insecure: bool,
    opener: Callable[[Path, TargetEntry, ArtifactMetadata], R],
) -> tuple[R, Path, TargetEntry, ArtifactMetadata, Callable[[], object]]:
    """Verify (keys required unless ``insecure``), extract one target privately and open it with ``opener``;
    also returns the call that removes the extracted copy (the caller's, once the runner is done)."""
    _need_keys(keys, insecure)
    name = _single_target(path, target, tag)
    manager = extracted_target(path, name, keys=keys, tag=tag, policy=policy, verify=bool(keys))
    directory, _view, entry = manager.__enter__()
    try:
        metadata = artifact_metadata(directory, entry, "no sovpack-artifact.json in the bundle")
        runner = opener(directory, entry, metadata)
    except BaseException:
        manager.__exit__(None, None, None)
        raise
    return runner, directory, entry, metadata, lambda: manager.__exit__(None, None, None)


def open_bundle_runner(
    path: str | Path,
    target: str | None,
    keys: Sequence[VerifyingKey],
    tag: str | None = None,
    *,
    policy: Policy | None = None,
    insecure: bool = False,
) -> tuple[Runner, Path | None, tuple[int, ...]]:
    """A runner on a verified, extracted copy of one target (removed when the runner is garbage-collected).

    Returns what ``sovpack.run.open_runner`` returns: the runner, its tokenizer.json (if any) and stop ids.
    The caller owns the runner and closes it. An embedding-encoder target is a UsageError naming it.
    """
    runner, directory, _entry, metadata, remove = _open_extracted(
        path, target, keys, tag, policy, insecure, open_target_runner
    )
    # NOTE: the runner outlives this call, so the extracted copy cannot be a ``with`` block here: it is removed
    # when the runner is garbage-collected (or at exit), never while the runner may still read it.
    cleanup = weakref.finalize(runner, remove)
    cleanup.atexit = True
    tokenizer = directory / "tokenizer.json"
    stop = tuple(int(i) for i in metadata.spec.eos_token_ids)
    return runner, tokenizer if tokenizer.is_file() else None, stop


class BundleEmbeddingRunner:
    """An embedding runner on a verified, extracted copy of one bundle target; ``close()`` also removes the copy.

    Delegates every member of :class:`~sovpack._protocols.EmbeddingRunner` to the target's own runner.
    ``target`` and ``metadata`` say what was opened (inspect and ``run --text`` print them); ``directory`` is
    the private extracted copy (gone after ``close()``).
    """

    def __init__(self, runner: EmbeddingRunner, entry: TargetEntry, metadata: ArtifactMetadata, directory: Path,
                 cleanup: Callable[[], object]) -> None:
        self._runner = runner
        self.directory = directory
        self.name = runner.name
        self.traits = runner.traits
        self.target = entry.name
        self.manifest_digest = entry.descriptor.digest
        self.metadata = metadata
        # NOTE: like open_bundle_runner's, the copy is also removed if the caller forgets close() (GC or exit).
        self._cleanup = weakref.finalize(self, cleanup)
        self._cleanup.atexit = True

    def tokenize(self, text: str) -> list[int] | None:
        return self._runner.tokenize(text)

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Embeddings:
        return self._runner.embed_ids(batch)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        return self._runner.embed_texts(texts)

    def runtime_info(self) -> dict[str, str]:
        return self._runner.runtime_info()

    def close(self) -> None:
        """Close the runtime first, then remove the extracted files it read (idempotent)."""
        if not self._cleanup.alive:
            return
        try:
            self._runner.close()
        finally:
            self._cleanup()


def open_bundle_embedding_runner(
    path: str | Path,
    target: str | None,
    keys: Sequence[VerifyingKey],
    *,
    tag: str | None = None,
    policy: Policy | None = None,
    insecure: bool = False,
) -> BundleEmbeddingRunner:
    """An embedding runner on a verified, extracted copy of one encoder target of a bundle.

    The bundle is verified first (under ``policy``; without keys only with ``insecure=True``), the target
    (``None``: the only one) is copied privately, hashed while copied, and opened on its runtime with
    ``open_embedding_runner``. A decoder target is a UsageError naming it. The caller owns the runner and
    closes it, which also removes the copy.
    """
    runner, directory, entry, metadata, remove = _open_extracted(
        path, target, keys, tag, policy, insecure, open_target_embedding_runner
    )
    return BundleEmbeddingRunner(runner, entry, metadata, directory, remove)


__all__ = [
    "BundleEmbeddingRunner",
    "ExtractResult",
    "artifact_metadata",
    "copy_verified_blob",
    "extract_target",
    "extracted_target",
    "open_bundle_embedding_runner",
    "open_bundle_runner",
    "open_target_embedding_runner",
    "open_target_runner",
    "write_target_files",
]
